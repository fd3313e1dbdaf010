"""Benchmarks of the bus (numbers, not pass/fail): `python -m clicooper_bus.tools.bench_bus`.

1. Epoch wall time of training over the bus (broker, notary, owner, three trainers: every
   message signed, verified and logged) against the in-process reference of the same split
   model, measured in the same invocation, as a ratio (target <= 1.3): synchronous
   (`in_flight = 1`, the reference's exact arithmetic) and pipelined (`in_flight = 2`, the
   head's gradients one step late). Training time only; the evaluation after the epoch is
   excluded from all.
2. Throughput of 0.8 MB tensors: raw pyzmq PUB -> SUB directly, then through the broker
   (`Forwarder`, XPUB_NODROP), then through the broker with `Bus` (each message hashed and
   signed by the sender, verified by the receiver); the broker's ratio to raw PUB/SUB is the
   one with a target (>= 0.8).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from clicooper_bus.layout import RunLayout

PAYLOAD = 128 * 1568 * 4  # one activation batch of the small CNN: 802,816 bytes


def _raw_pub(addr: str, n: int, ready, via_broker: bool, cpu) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 16)
    s.setsockopt(zmq.XPUB_NODROP, 1)  # PUB accepts it: block instead of dropping at the HWM
    if via_broker:
        s.connect(addr)
    else:
        s.bind(addr)
    ready.wait()
    time.sleep(0.5)  # slow joiner: the subscription must be in place
    body = np.ones(PAYLOAD, np.uint8).tobytes()
    c0 = time.process_time()  # every thread of the process: the I/O thread does the copying
    for _ in range(n):
        s.send_multipart([b"t", body])
    s.close(linger=5000)
    ctx.term()
    cpu.put(time.process_time() - c0)


def _raw_sub(addr: str, n: int, ready, out, via_broker: bool, cpu) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 16)
    s.setsockopt(zmq.SUBSCRIBE, b"t")
    s.setsockopt(zmq.RCVTIMEO, 20000)  # a lost message ends the measurement, not the program
    s.connect(addr)
    ready.set()
    got = 0
    c0 = time.process_time()
    try:
        s.recv_multipart()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            s.recv_multipart(copy=False)
            got += 1
        out.put(got / (time.perf_counter() - t0))
    except zmq.Again:
        out.put(float("nan"))
    cpu.put(time.process_time() - c0)
    s.close()
    ctx.term()


def raw_throughput(n: int, via_broker: bool) -> tuple[float, float]:
    """(messages a second, CPU seconds per message over every process involved)."""
    ready, out, cpu = mp.Event(), mp.Queue(), mp.Queue()
    c0 = time.process_time()  # this process hosts the broker's forwarder thread
    if via_broker:
        from clicooper_bus.net.forwarder import Forwarder

        fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()
        pub_addr, sub_addr = fwd.pub_addr, fwd.sub_addr
    else:
        from clicooper_bus.tools.run import free_port

        pub_addr = sub_addr = f"tcp://127.0.0.1:{free_port()}"
    ps = [mp.Process(target=_raw_pub, args=(pub_addr, n, ready, via_broker, cpu)),
          mp.Process(target=_raw_sub, args=(sub_addr, n, ready, out, via_broker, cpu))]
    for p in ps:
        p.start()
    rate = out.get(timeout=300)
    for p in ps:
        p.join()
    spent = cpu.get() + cpu.get()
    if via_broker:
        spent += time.process_time() - c0
        fwd.close()
    return rate, spent / n


def _bus_peer(role: str, addr, keys, n: int, out) -> None:
    from clicooper_bus.net.bus import Bus
    from clicooper_bus.net.verifier import Verifier

    pubs = {k.key_id: k.public for k in keys.values()}
    me = keys[role]
    bus = Bus(me, "bench", addr, Verifier(pubs, "bench", partial=True), timeout_s=30)
    if role == "sub":
        bus.subscribe(bus.topics.to("fwd", "sub"))
        bus.announce()
        bus.recv(60)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            bus.recv(60)
        out.put((n - 1) / (time.perf_counter() - t0))
    else:
        bus.wait_for_subscribers("hello", ["sub"], 60)
        arr = np.ones(PAYLOAD // 4, np.float32)
        for i in range(n):
            bus.send_array("fwd", "sub", arr, step=i)
        time.sleep(1)
    bus.close()


def bus_throughput(n: int) -> float:
    from clicooper_bus.net.bus import BusAddress
    from clicooper_bus.net.forwarder import Forwarder
    from clicooper_bus.net.identity import Identity

    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()
    keys = {"pub": Identity.generate("pub"), "sub": Identity.generate("sub")}
    out = mp.Queue()
    addr = BusAddress(fwd.pub_addr, fwd.sub_addr)
    ps = [mp.Process(target=_bus_peer, args=(r, addr, keys, n, out)) for r in ("sub", "pub")]
    for p in ps:
        p.start()
    rate = out.get(timeout=300)
    for p in ps:
        p.join()
    fwd.close()
    return rate


def bench_overrides(workdir: Path, train_limit: int, in_flight: int, tag: str) -> dict:
    """The benchmark run's config overrides: one epoch of the small CNN over three trainers,
    evaluated once at the end on 1,000 test images, watermarks off (the reference embeds none,
    and the ratio is the bus's cost alone); keys in workdir/keys, output in workdir/runs."""
    return {"run": {"epochs": 1, "eval_every": 0, "id": f"bench-{tag}", "in_flight": in_flight,
                    "out_dir": str(workdir / "runs")},
            "data": {"train_limit": train_limit, "test_limit": 1000},
            "participants": {"keys": str(workdir / "keys"),
                             "trainers": ["trainer-1", "trainer-2", "trainer-3"]},
            "watermark": {"enabled": False}}


def training_epoch(run_dir: Path) -> tuple[float, float]:
    """A finished run's first epoch: (training wall seconds, evaluation excluded; test
    accuracy)."""
    summary = json.loads(RunLayout(run_dir).summary.read_text())
    return summary["per_epoch"][0]["wall_s"], summary["test_accuracy"]


def bus_epoch(workdir: Path, train_limit: int, in_flight: int, tag: str) -> tuple[float, float]:
    """One training epoch over the bus: (training wall seconds, test accuracy)."""
    from clicooper_bus.config import load_config
    from clicooper_bus.tools.run import run

    cfg = load_config(None, bench_overrides(workdir, train_limit, in_flight, tag))
    cfg_path = workdir / f"bench-{tag}.toml"
    cfg_path.write_text(cfg.to_toml())
    if run(str(cfg_path), echo=False, timeout_s=900) != 0:
        raise SystemExit(f"the benchmark run {tag} failed: see {cfg.run_dir}")
    epoch = training_epoch(cfg.run_dir)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return epoch


def reference_epoch(train_limit: int) -> tuple[float, float]:
    """The same epoch in one process (2 threads, like the owner): (seconds, test accuracy)."""
    import torch

    from clicooper_bus.config import load_config
    from clicooper_bus.ml.data import load_dataset
    from clicooper_bus.ml.models import default_cuts, model_spec
    from clicooper_bus.ml.reference import train_reference

    cfg = load_config(None)
    data = load_dataset(cfg.data.name, None, 0).limit(train_limit or None, 1000)
    spec = model_spec(cfg.model.name, data.input_shape, data.classes)
    torch.set_num_threads(cfg.run.threads)
    ref = train_reference(data, spec, default_cuts(spec, 3), seed=0, epochs=1,
                          batch_size=cfg.run.batch_size, lr=cfg.run.lr, evaluate_each_epoch=False)
    return ref.per_epoch[0]["wall_s"], ref.test_accuracy


def epoch_ratios(workdir: Path, train_limit: int, repeats: int) -> dict[str, list]:
    """Reference, synchronous and pipelined epochs, interleaved `repeats` times (this machine's
    timings drift by a third between minutes: interleaving puts each mode under the same
    drift)."""
    out: dict[str, list] = {"reference": [], "in_flight=1": [], "in_flight=2": []}
    for r in range(repeats):
        # a fresh process each time, as each run's owner is; OpenMP left at its defaults
        with mp.get_context("spawn").Pool(1) as pool:
            out["reference"].append(pool.apply(reference_epoch, (train_limit,)))
        for n in (1, 2):
            out[f"in_flight={n}"].append(bus_epoch(workdir, train_limit, n, f"{n}-{r}"))
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(
            f"{k} {v[-1][0]:.1f} s" for k, v in out.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the epochs")
    args = p.parse_args(argv)
    n = 50 if args.quick else 2000
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    raw, raw_cpu = raw_throughput(n, via_broker=False)
    brk, brk_cpu = raw_throughput(n, via_broker=True)
    bus = bus_throughput(n)
    mb = PAYLOAD / 1e6
    print(f"\n| path, {PAYLOAD:,}-byte messages | messages/s | MB/s | ratio to raw PUB/SUB | "
          f"CPU per message, all processes |")
    print("|---|---|---|---|---|")
    for label, r, c in (("raw pyzmq PUB -> SUB", raw, raw_cpu),
                        ("PUB -> broker -> SUB", brk, brk_cpu),
                        ("Bus -> broker -> Bus (signed, verified)", bus, None)):
        used = f"{c * 1e3:.3f} ms" if c is not None else ""
        print(f"| {label} | {r:,.0f} | {r * mb:,.0f} | {r / raw:.2f} | {used} |", flush=True)
    cores = os.cpu_count() or 1
    ceiling = cores / brk_cpu  # messages a second with every core doing nothing but this
    caveat = "(50 messages: start-up costs dominate these CPU figures) " if args.quick else ""
    print(f"\n{caveat}busy cores: raw {raw * raw_cpu:.2f}, through the broker {brk * brk_cpu:.2f} of "
          f"{cores}. The broker's hop costs {brk_cpu / raw_cpu:.2f} times the CPU of a direct "
          f"message; even with all {cores} cores on it the broker path would pass at most "
          f"{ceiling:,.0f} messages/s, {ceiling / raw:.2f} of the measured raw rate.")
    workdir = Path(tempfile.mkdtemp(prefix="clicooper-bench-bus-"))
    samples = 3000 if args.quick else 60000
    print(f"\nepochs of {samples:,} samples: in-process reference and over the bus (3 trainers, "
          f"every message signed, verified and logged), {args.repeats} interleaved repeats")
    try:
        r = epoch_ratios(workdir, 3000 if args.quick else 0, args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    refs = [t for t, _ in r["reference"]]
    print("\n| mode | epoch, median (min to max) | ratio to the reference of the same repeat, "
          "median (each) | test accuracy |")
    print("|---|---|---|---|")
    for mode, rows in r.items():
        ts = [t for t, _ in rows]
        ratios = [t / ref for t, ref in zip(ts, refs, strict=True)]
        acc = ", ".join(f"{a:.3f}" for _, a in rows)
        print(f"| {mode} | {statistics.median(ts):.1f} s ({min(ts):.1f} to {max(ts):.1f}) | "
              f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}) | "
              f"{acc} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
