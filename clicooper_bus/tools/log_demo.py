"""`clicooper log demo`: write a real log of signed random-tensor messages.

Three senders (owner, trainer-1, trainer-2) exchange the messages of a two-stage split-learning
step (activations, labels, gradients) with random tensors; every message is built by `Sender`,
checked by a `Verifier` exactly as the notary will check bus traffic, and appended; the notary
key signs a checkpoint every `checkpoint_every` entries and at the end. It gives the log tools
something real to read before the bus exists, and benchmarks something realistic to measure.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clicooper_bus.net.identity import Identity, key_paths, load_identity, write_identity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Sender
from clicooper_bus.tlog.log import FsyncPolicy, ProvenanceLog

NAMES = ("owner", "trainer-1", "trainer-2", "notary")


def demo_identities(keys_dir: Path) -> dict[str, Identity]:
    """Load the demo's identities from `keys_dir`, creating the missing ones."""
    out = {}
    for name in NAMES:
        priv, _ = key_paths(keys_dir, name)
        if not priv.exists():
            write_identity(Identity.generate(name), keys_dir)
        out[name] = load_identity(priv)
    return out


def write_demo(directory: str | os.PathLike[str], *, messages: int, keys_dir: Path,
               run_id: str = "demo", seed: int = 0, shape: tuple[int, int] = (32, 64),
               retention: str = "all", checkpoint_every: int = 100,
               fsync: FsyncPolicy = "checkpoint") -> ProvenanceLog:
    """Write the demo log and return it, still open for appending (the caller closes it)."""
    ids = demo_identities(keys_dir)
    roster = Roster.build(run_id, owner=ids["owner"].public,
                          trainers=[ids["trainer-1"].public, ids["trainer-2"].public],
                          notary=ids["notary"].public, meta={"purpose": "log demo"})
    roster_bytes = roster.sign(ids["owner"])
    plog = ProvenanceLog.create(directory, roster_bytes=roster_bytes, run_id=run_id,
                                retention=retention, fsync=fsync, signer=ids["notary"])
    verifier = Verifier(roster, run_id)
    send = {name: Sender(ids[name], run_id, nonce=roster.nonce) for name in NAMES[:3]}
    rng = np.random.default_rng(seed)
    batch, width = shape
    steps_per_epoch = 50

    def step_messages(step: int):
        meta = {"step": step, "batch": step % steps_per_epoch, "epoch": step // steps_per_epoch}
        act = rng.standard_normal((batch, width), dtype=np.float32)
        yield send["owner"].seal_array("fwd", "trainer-1", act, **meta)
        yield send["owner"].seal_array("labels", "trainer-2",
                                       rng.integers(0, 10, batch, dtype=np.int64), **meta)
        yield send["trainer-1"].seal_array("fwd", "trainer-2", np.tanh(act), **meta)
        yield send["trainer-2"].seal_array("bwd", "trainer-1", act * 1e-3, **meta)
        yield send["trainer-1"].seal_array("bwd", "owner", act * 1e-4, **meta)

    def all_messages():
        yield send["owner"].seal("roster", "all", roster_bytes)
        step = 0
        while True:
            yield from step_messages(step)
            step += 1

    for n, env in zip(range(messages), all_messages(), strict=False):
        plog.append_envelope(verifier.verify_frames(env.frames()))
        if checkpoint_every and (n + 1) % checkpoint_every == 0:
            plog.sign_checkpoint()
    plog.sign_checkpoint()
    return plog
