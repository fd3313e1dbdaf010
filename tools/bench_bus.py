"""Benchmarks of the bus (numbers, not pass/fail): `python -m tools.bench_bus`.

1. Epoch wall time of training over the bus (broker, notary, owner, three trainers: every
   message signed, verified and logged) against the in-process reference of the same split
   model, measured in the same invocation, as a ratio (target <= 1.3). Training time only; the
   evaluation after the epoch is excluded from both.
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
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

PAYLOAD = 128 * 1568 * 4  # one activation batch of the small CNN: 802,816 bytes


def _raw_pub(addr: str, n: int, ready, via_broker: bool) -> None:
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
    for _ in range(n):
        s.send_multipart([b"t", body])
    s.close(linger=5000)
    ctx.term()


def _raw_sub(addr: str, n: int, ready, out, via_broker: bool) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, 16)
    s.setsockopt(zmq.SUBSCRIBE, b"t")
    s.setsockopt(zmq.RCVTIMEO, 20000)  # a lost message ends the measurement, not the program
    s.connect(addr)
    ready.set()
    got = 0
    try:
        s.recv_multipart()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            s.recv_multipart(copy=False)
            got += 1
        out.put(got / (time.perf_counter() - t0))
    except zmq.Again:
        out.put(float("nan"))
    s.close()
    ctx.term()


def raw_throughput(n: int, via_broker: bool) -> float:
    ready, out = mp.Event(), mp.Queue()
    if via_broker:
        from clicooper_bus.forwarder import Forwarder

        fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()
        pub_addr, sub_addr = fwd.pub_addr, fwd.sub_addr
    else:
        from tools.run import free_port

        pub_addr = sub_addr = f"tcp://127.0.0.1:{free_port()}"
    ps = [mp.Process(target=_raw_pub, args=(pub_addr, n, ready, via_broker)),
          mp.Process(target=_raw_sub, args=(sub_addr, n, ready, out, via_broker))]
    for p in ps:
        p.start()
    rate = out.get(timeout=300)
    for p in ps:
        p.join()
    if via_broker:
        fwd.close()
    return rate


def _bus_peer(role: str, addr, keys, n: int, out) -> None:
    from clicooper_bus.bus import Bus
    from clicooper_bus.verifier import Verifier

    pubs = {k.key_id: k.public for k in keys.values()}
    me = keys[role]
    bus = Bus(me, "bench", addr, Verifier(pubs, "bench", partial=True), timeout_s=30)
    if role == "sub":
        bus.subscribe(bus.topic("fwd", "sub"))
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
    from clicooper_bus.bus import BusAddress
    from clicooper_bus.forwarder import Forwarder
    from clicooper_bus.identity import Identity

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


def epoch_ratio(workdir: Path, train_limit: int) -> dict:
    import torch

    from clicooper_bus.config import load_config
    from clicooper_bus.ml.data import load_dataset
    from clicooper_bus.ml.models import default_cuts, model_spec
    from clicooper_bus.ml.reference import train_reference
    from tools.run import run

    over = {"run": {"epochs": 1, "eval_every": 0, "id": "bench"},
            "data": {"train_limit": train_limit, "test_limit": 1000}}
    cfg_path = workdir / "bench.toml"
    cfg = load_config(None, over)
    cfg.participants.keys = str(workdir / "keys")
    cfg.run.out_dir = str(workdir / "runs")
    cfg_path.write_text(cfg.to_toml())
    assert run(str(cfg_path), echo=False, timeout_s=900) == 0
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    bus_s = summary["per_epoch"][0]["wall_s"]
    data = load_dataset(cfg.data.name, None, 0).limit(train_limit or None, 1000)
    spec = model_spec(cfg.model.name, data.input_shape, data.classes)
    torch.set_num_threads(cfg.run.threads)
    ref = train_reference(data, spec, default_cuts(spec, 3), seed=0, epochs=1,
                          batch_size=cfg.run.batch_size, lr=cfg.run.lr, evaluate_each_epoch=False)
    ref_s = ref.per_epoch[0]["wall_s"]
    return {"samples": len(data.x_train), "bus_s": bus_s, "reference_s": ref_s,
            "ratio": bus_s / ref_s, "bus_accuracy": summary["test_accuracy"],
            "reference_accuracy": ref.test_accuracy}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = p.parse_args(argv)
    n = 50 if args.quick else 2000
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    raw = raw_throughput(n, via_broker=False)
    brk = raw_throughput(n, via_broker=True)
    bus = bus_throughput(n)
    mb = PAYLOAD / 1e6
    print(f"\n| path, {PAYLOAD:,}-byte messages | messages/s | MB/s | ratio to raw PUB/SUB |")
    print("|---|---|---|---|")
    for label, r in (("raw pyzmq PUB -> SUB", raw), ("PUB -> broker -> SUB", brk),
                     ("Bus -> broker -> Bus (signed, verified)", bus)):
        print(f"| {label} | {r:,.0f} | {r * mb:,.0f} | {r / raw:.2f} |", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="clicooper-bench-bus-"))
    try:
        r = epoch_ratio(workdir, 3000 if args.quick else 0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nepoch over the bus (3 trainers, signed, verified, logged) vs in-process reference, "
          f"{r['samples']} samples: {r['bus_s']:.1f} s vs {r['reference_s']:.1f} s, ratio "
          f"{r['ratio']:.2f} (test accuracy {r['bus_accuracy']:.4f} vs "
          f"{r['reference_accuracy']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
