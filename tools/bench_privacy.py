"""Benchmark: what activation protection (per-sample clipping and noise on every release) adds
to an epoch. The same split model trains in process with and without the filter at the cut,
alternating, so that both see the same machine; prints the epoch times and their ratio.

    python -m tools.bench_privacy [--train 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clicooper_bus.ml.data import load_dataset
from clicooper_bus.ml.models import default_cuts, model_spec
from clicooper_bus.ml.reference import train_reference
from clicooper_bus.privacy.release import ActivationFilter, FilterSpec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--train", type=int, default=20000, help="training samples per epoch")
    ap.add_argument("--repeats", type=int, default=3)
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
    for r in range(args.repeats):
        for name, f in filters.items():
            release = (lambda a, ids, step, f=f: f(a, ids=ids, step=step)) if f else None
            t0 = time.perf_counter()
            train_reference(data, spec, cuts, seed=0, epochs=1, batch_size=128, lr=1e-3,
                            evaluate_each_epoch=False, release=release)
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {r + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    base = statistics.median(times["none"])
    print(f"epoch of {args.train} {args.dataset} samples, small CNN, {args.threads} threads, "
          f"median of {args.repeats}:")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:18s} {m:6.2f} s   x{m / base:.3f}   ({(m / base - 1) * 100:+.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
