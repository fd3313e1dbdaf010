"""Benchmark: what activation protection (per-sample clipping and noise on every release) adds
to an epoch. The same split model trains in process with and without the filter at the cut,
interleaved, the order rotated every repeat (whatever runs first in a round pays for warming
caches), so that all see the same machine; prints the median epoch times, their ratio and the
spread. It also times the filter alone per step (forward and backward through it), the cost
the owner adds to each step of a run over the bus, and issue 15's per-step label levers
(randomised labels, the label and NoPeek distance-correlation penalties, the secret batch
order). The owner's
fine-tune runs after the run: its wall time and FLOPs are in each run's summary.

    python -m clicooper_bus.tools.bench_privacy [--train 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clicooper_bus.ml.data import load_dataset
from clicooper_bus.ml.models import default_cuts, model_spec
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec
from clicooper_bus.ml.reference import train_reference


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--train", type=int, default=20000, help="training samples per epoch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, None, 0).limit(args.train, 1000)
    spec = model_spec("small-cnn", data.input_shape, data.classes)
    cuts = default_cuts(spec, 2)
    filters = {
        "none": None,
        "gaussian per-step": ActivationFilter(FilterSpec("gaussian", 1.0, 0.3), bytes(32)),
        "laplace per-step": ActivationFilter(FilterSpec("laplace", 1.0, 0.01), bytes(32)),
        "gaussian once": ActivationFilter(FilterSpec("gaussian", 1.0, 0.3, "once"), bytes(32)),
    }
    times: dict[str, list[float]] = {k: [] for k in filters}
    names = list(filters)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            f = filters[name]
            release = (lambda a, ids, step, f=f: f(a, ids=ids, step=step)) if f else None
            t0 = time.perf_counter()
            train_reference(data, spec, cuts, seed=0, epochs=1, batch_size=128, lr=1e-3,
                            evaluate_each_epoch=False, release=release)
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {r + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    base = statistics.median(times["none"])
    steps = -(-args.train // 128)
    print(f"epoch of {args.train} {args.dataset} samples ({steps} steps of 128), small CNN, "
          f"{args.threads} threads, median of {args.repeats} (min to max):")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:18s} {m:6.2f} s ({min(ts):.2f} to {max(ts):.2f})   x{m / base:.3f}   "
              f"({(m / base - 1) * 100:+.1f} %)")
    print("the filter alone, per step of 128 activations of 1,568 values (forward, backward):")
    step_ms = base / steps * 1e3
    for name, f in filters.items():
        if f is None:
            continue
        ms = _filter_ms(f)
        print(f"  {name:18s} {ms:5.2f} ms = {ms / step_ms * 100:4.1f} % of an in-process step "
              f"({step_ms:.1f} ms)")
    _label_levers(step_ms)
    return 0


def _label_levers(step_ms: float, n: int = 50) -> None:
    """Issue 15's per-step levers alone: randomised labels for a batch of 128 (keyed PRF
    draws), and the head's distance-correlation penalties on a 128-row release of the demo
    cut's shape (16 x 14 x 14), forward and backward."""
    import numpy as np

    from clicooper_bus.ml.privacy.nopeek import HeadPenalty
    from clicooper_bus.ml.privacy.randomised_response import RandomisedResponse

    rr = RandomisedResponse(bytes(32), 10, 0.5,
                            np.arange(n * 128, dtype=np.uint32).view(np.uint8).reshape(-1, 4))
    ids, y = np.arange(128), np.arange(128) % 10
    t0 = time.perf_counter()
    for i in range(n):
        rr.labels(ids + i * 128, y)
    rr_ms = (time.perf_counter() - t0) / n * 1e3
    t0 = time.perf_counter()
    for i in range(n):  # the same images again: a later epoch, the draws memoised
        rr.labels(ids + i * 128, y)
    again_ms = (time.perf_counter() - t0) / n * 1e3
    print("the label levers alone, per step of 128:")
    print(f"  {'randomised labels':18s} {rr_ms:5.2f} ms = {rr_ms / step_ms * 100:4.1f} % of an "
          f"in-process step in an image's first epoch; {again_ms:5.2f} ms = "
          f"{again_ms / step_ms * 100:4.1f} % after it")
    _secret_order(step_ms)
    x = torch.rand(128, 1, 28, 28)
    for name, pen in (("label dCor", HeadPenalty(0.0, 1.0, 10)),
                      ("NoPeek", HeadPenalty(1.0, 0.0, 10))):
        a = torch.randn(128, 16, 14, 14, requires_grad=True)
        t0 = time.perf_counter()
        for i in range(n):
            pen.labels(i, y)
            pen(x, a, i).backward()
        ms = (time.perf_counter() - t0) / n * 1e3
        print(f"  {name:18s} {ms:5.2f} ms = {ms / step_ms * 100:4.1f} % of an in-process step")


def _filter_ms(f: ActivationFilter, n: int = 100) -> float:
    import numpy as np

    a = torch.randn(128, 32, 7, 7, requires_grad=True)
    ids = np.arange(128)
    f(a, ids=ids, step=0).sum().backward()
    t0 = time.perf_counter()
    for i in range(n):
        f(a, ids=ids, step=i).sum().backward()
    return (time.perf_counter() - t0) / n * 1e3



def _secret_order(step_ms: float, n_train: int = 60000, repeats: int = 3) -> None:
    """Lever 1: the secret batch order, computed once per epoch for the full Fashion-MNIST
    training set (keyed BLAKE2b of every index, sorted), beside the public order."""
    from clicooper_bus.ml.data import batch_order

    def median_s(key: bytes | None) -> float:
        ts = []
        for e in range(repeats):
            t0 = time.perf_counter()
            batch_order(n_train, 128, 0, e, key)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    secret, public = median_s(bytes(32)), median_s(None)
    steps = -(-n_train // 128)
    print(f"the batch order, once per epoch of {n_train} (median of {repeats}):")
    print(f"  {'secret order':18s} {secret * 1e3:7.1f} ms (public {public * 1e3:.1f} ms) = "
          f"{secret / steps * 1e3:5.3f} ms a step, {secret / steps * 1e3 / step_ms * 100:4.2f} % "
          f"of an in-process step")


if __name__ == "__main__":
    raise SystemExit(main())
