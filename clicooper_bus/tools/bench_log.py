"""Benchmarks of the provenance log (numbers, not pass/fail): `python -m clicooper_bus.tools.bench_log`.

1. append rate for 1 KiB and 1 MiB bodies, retention all/none, fsync never/always: the log's
   own cost per entry, envelopes signed and verified beforehand (the notary verifies each
   message before appending; that cost, about 50 us per message, is reported separately);
2. a member's outbox (`net.outbox`): what writing each message before sending it costs, and
   reading it back after a restart;
3. `log verify` throughput in MB/s of bodies, on a log of 1 MiB bodies;
4. proof sizes and verification times at 1,000,000 leaves.
Prints a Markdown table; docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from clicooper_bus.net.identity import Identity
from clicooper_bus.net.outbox import Outbox
from clicooper_bus.net.refill import KEEP_SENT, KEEP_SENT_BYTES
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope, Sender
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tlog.merkle import MerkleTree, verify_consistency, verify_inclusion


def _setup(workdir: Path):
    owner, notary = Identity.generate("owner"), Identity.generate("notary")
    trainer = Identity.generate("trainer-1")
    roster = Roster.build("bench", owner=owner.public, trainers=[trainer.public],
                          notary=notary.public)
    return owner, notary, roster, roster.sign(owner)


def _envelopes(owner: Identity, n: int, body_size: int, nonce: bytes) -> list[Envelope]:
    sender = Sender(owner, "bench", nonce=nonce)
    base = np.random.default_rng(0).integers(0, 256, body_size, dtype=np.uint8)
    out = []
    for i in range(n):
        body = base.copy()
        body[:8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)
        out.append(sender.seal_array("fwd", "trainer-1", body, step=i, batch=i % 469, epoch=0))
    return out


def bench_append(workdir: Path, body_size: int, n: int, retention: str, fsync: str) -> dict:
    owner, notary, roster, roster_bytes = _setup(workdir)
    envs = _envelopes(owner, n, body_size, roster.nonce)
    d = workdir / f"append-{body_size}-{retention}-{fsync}"
    plog = ProvenanceLog.create(d, roster_bytes=roster_bytes, run_id="bench", retention=retention,
                                fsync=fsync, signer=notary)
    t0 = time.perf_counter()
    for env in envs:
        plog.append_envelope(env)
    plog.sign_checkpoint()
    dt = time.perf_counter() - t0
    plog.close()
    shutil.rmtree(d)
    return {"entries/s": n / dt, "MB/s": n * body_size / dt / 1e6}


def bench_outbox(workdir: Path, body_size: int, n: int) -> dict:
    """A member's outbox (`net.outbox`): appends of `n` messages of `body_size` bytes (what it
    costs before every send), then the read-back a restarted process does."""
    owner, _, roster, _ = _setup(workdir)
    envs = _envelopes(owner, n, body_size, roster.nonce)
    box = Outbox(workdir / f"outbox-{body_size}", owner.public, keep=KEEP_SENT,
                 keep_bytes=KEEP_SENT_BYTES)
    t0 = time.perf_counter()
    for env in envs:
        box.append(env)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept = len(box.load())
    load_s = time.perf_counter() - t0
    box.clear()
    return {"ms/append": dt / n * 1000, "MB/s": n * body_size / dt / 1e6, "kept": kept,
            "load s": load_s}


def bench_verify_cost(n: int = 5000) -> float:
    """Microseconds per message for the Verifier (signature, chain, body hash) on 1 KiB."""
    owner, _, roster, _ = _setup(Path("."))
    envs = _envelopes(owner, n, 1024, roster.nonce)
    v = Verifier(roster, "bench")
    t0 = time.perf_counter()
    for env in envs:
        v.verify_frames(env.frames())
    return (time.perf_counter() - t0) / n * 1e6


def bench_log_verify(workdir: Path, body_size: int, n: int) -> dict:
    owner, notary, roster, roster_bytes = _setup(workdir)
    d = workdir / "verify"
    plog = ProvenanceLog.create(d, roster_bytes=roster_bytes, run_id="bench", fsync="never",
                                signer=notary)
    sender = Sender(owner, "bench", nonce=roster.nonce)
    rng = np.random.default_rng(1)
    for i in range(n):
        plog.append_envelope(sender.seal_array("fwd", "trainer-1",
                                               rng.integers(0, 256, body_size, dtype=np.uint8),
                                               step=i, epoch=0))
        if (i + 1) % 100 == 0:
            plog.sign_checkpoint()
    plog.sign_checkpoint()
    plog.close()
    os.sync()
    t0 = time.perf_counter()
    result = verify_log(d)
    dt = time.perf_counter() - t0
    assert result.ok, result.failure
    shutil.rmtree(d)
    return {"entries": n, "MB": result.body_bytes / 1e6, "s": dt, "MB/s": result.body_bytes / dt / 1e6}


def bench_proofs(n: int, samples: int) -> dict:
    tree = MerkleTree()
    t0 = time.perf_counter()
    for i in range(n):
        tree.append_hash(hashlib.sha256(i.to_bytes(8, "big")).digest())
    build = time.perf_counter() - t0
    rng = random.Random(0)
    root = tree.root()
    inc_len, inc_t, con_len, con_t, gen_t = [], [], [], [], []
    for _ in range(samples):
        i = rng.randrange(n)
        g0 = time.perf_counter()
        proof = tree.inclusion_proof(i)
        gen_t.append(time.perf_counter() - g0)
        lh = tree.leaf_hash_at(i)
        t = time.perf_counter()
        verify_inclusion(i, n, lh, proof, root)
        inc_t.append(time.perf_counter() - t)
        inc_len.append(len(proof))
        m = rng.randrange(1, n)
        proof = tree.consistency_proof(m, n)
        r1 = tree.root(m)
        t = time.perf_counter()
        verify_consistency(m, n, r1, root, proof)
        con_t.append(time.perf_counter() - t)
        con_len.append(len(proof))
    bound = (n - 1).bit_length() + 1
    return {"leaves": n, "build s": build, "bound": bound,
            "inclusion max hashes": max(inc_len), "inclusion verify ms": statistics.mean(inc_t) * 1e3,
            "inclusion verify max ms": max(inc_t) * 1e3,
            "consistency max hashes": max(con_len),
            "consistency verify ms": statistics.mean(con_t) * 1e3,
            "consistency verify max ms": max(con_t) * 1e3,
            "proof generation ms": statistics.mean(gen_t) * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--dir", help="work directory (default: a temporary directory)")
    args = p.parse_args(argv)
    q = args.quick
    n_small, n_big = (500, 20) if q else (50_000, 1_000)
    n_fsync_small, n_fsync_big = (100, 10) if q else (2_000, 200)
    leaves, samples = (10_000, 50) if q else (1_000_000, 2_000)
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="clicooper-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; work dir {workdir}")
    print("\n| body | retention | fsync | entries | entries/s | MB/s |\n|---|---|---|---|---|---|")
    for size, label in ((1024, "1 KiB"), (1 << 20, "1 MiB")):
        for retention in ("all", "none"):
            for fsync in ("never", "always"):
                n = (n_small if size == 1024 else n_big) if fsync == "never" else \
                    (n_fsync_small if size == 1024 else n_fsync_big)
                r = bench_append(workdir, size, n, retention, fsync)
                print(f"| {label} | {retention} | {fsync} | {n} | {r['entries/s']:,.0f} | "
                      f"{r['MB/s']:,.1f} |", flush=True)
    print("\nOutbox (a member's sent messages, written before each send):\n\n"
          "| body | messages | ms per append | MB/s | kept | read back |\n|---|---|---|---|---|---|")
    for size, label in ((1024, "1 KiB"), (800_000, "0.8 MB")):
        n = (n_small if size == 1024 else n_big) // (10 if size == 1024 else 1)
        r = bench_outbox(workdir, size, n)
        print(f"| {label} | {n} | {r['ms/append']:.3f} | {r['MB/s']:,.0f} | {r['kept']} | "
              f"{r['load s']:.2f} s |", flush=True)
    print(f"\nVerifier (signature, chain, body hash), 1 KiB bodies: "
          f"{bench_verify_cost(500 if q else 5000):.1f} us per message")
    r = bench_log_verify(workdir, 1 << 20, 20 if q else 1000)
    print(f"\n`log verify`: {r['entries']} entries, {r['MB']:.0f} MB of bodies in {r['s']:.2f} s: "
          f"{r['MB/s']:.0f} MB/s")
    r = bench_proofs(leaves, samples)
    print(f"\nproofs at {r['leaves']:,} leaves (tree built in {r['build s']:.1f} s; bound "
          f"ceil(log2 n) + 1 = {r['bound']}):")
    print(f"- inclusion: at most {r['inclusion max hashes']} hashes, verify mean "
          f"{r['inclusion verify ms']:.3f} ms, max {r['inclusion verify max ms']:.3f} ms")
    print(f"- consistency: at most {r['consistency max hashes']} hashes, verify mean "
          f"{r['consistency verify ms']:.3f} ms, max {r['consistency verify max ms']:.3f} ms")
    print(f"- proof generation: mean {r['proof generation ms']:.3f} ms")
    if not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
