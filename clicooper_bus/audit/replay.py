"""Replay a verified provenance log into the streams each party of the run saw.

The auditor attacks what the log retained: the activations the owner released to the first
stage (`fwd`, training; `eval_fwd`, evaluation) and the labels it sent to the last stage, each
with the epoch, batch and step from its signed header. Which samples a batch held is not in the
log (it would leak them); the auditor recomputes it from the run's seed, as the owner drew it,
to score attacks against the truth.

Run only on a log that `verify_log` accepted: this module reads, it does not re-check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from clicooper_bus.errors import BadTensor
from clicooper_bus.net.codec import unpack
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import array_of, parse_header, split_leaf
from clicooper_bus.plan import Plan
from clicooper_bus.tlog.log import ProvenanceLog


@dataclass(frozen=True)
class Batch:
    """One retained message body: a batch the owner sent, with its header's coordinates."""

    kind: str
    epoch: int
    batch: int
    step: int
    array: np.ndarray


@dataclass
class Replay:
    roster: Roster
    plan: Plan
    released: list[Batch] = field(default_factory=list)  # fwd, owner -> stage 1
    eval_released: list[Batch] = field(default_factory=list)  # eval_fwd, owner -> stage 1
    labels: list[Batch] = field(default_factory=list)  # labels, owner -> last stage
    ack: dict | None = None  # the owner's end-of-run acknowledgement (holds the model digest)
    skipped: int = 0  # releases whose header lacks epoch, batch or step, or whose body does not
    # decode (a refused one): only in a forged log or a run stopped on it
    headers: dict[str, int] = field(default_factory=dict)  # per kind, every header in the log
    # the owner's own messages: which epochs it released training and evaluation batches in
    owner_epochs: dict[str, set[int]] = field(default_factory=dict)
    bodies: dict[str, int] = field(default_factory=dict)  # per kind, retained bodies

    @property
    def epochs(self) -> list[int]:
        return sorted({b.epoch for b in self.released})


_STREAMS = {"fwd": "released", "eval_fwd": "eval_released", "labels": "labels"}


def replay(directory: str | os.PathLike[str]) -> Replay:
    """Read every leaf in log order; keep the owner's releases whose bodies were retained."""
    with ProvenanceLog.open(directory) as plog:
        roster = Roster.open(plog.roster_bytes)
        plan = Plan.from_meta(roster.meta["plan"])
        out = Replay(roster, plan)
        owner, sent = roster.owner.key_id, set()
        for i in range(plog.size):
            raw, _sig = split_leaf(plog.leaf(i))
            h = parse_header(raw, plog.limits)
            if resent(h, sent):
                continue
            out.headers[h.kind] = out.headers.get(h.kind, 0) + 1
            if h.sender != owner or h.kind not in (*_STREAMS, "ack"):
                continue
            if h.epoch is not None:
                out.owner_epochs.setdefault(h.kind, set()).add(int(h.epoch))
            body = plog.body(h.body_sha256)
            if body is None:
                continue
            if h.kind == "ack":
                doc = unpack(body)
                out.ack = doc if type(doc) is dict else None
                continue
            if h.epoch is None or h.batch is None or h.step is None or h.dtype is None:
                out.skipped += 1
                continue
            try:
                arr = array_of(h.dtype, h.shape, bytes(body), h.sender)  # what was received
            except (BadTensor, ValueError):  # a body no receiver took (the run stopped on it)
                out.skipped += 1
                continue
            out.bodies[h.kind] = out.bodies.get(h.kind, 0) + 1
            getattr(out, _STREAMS[h.kind]).append(
                Batch(h.kind, int(h.epoch), int(h.batch), int(h.step), arr))
    return out


def resent(h, sent: set) -> bool:
    """Whether header `h` repeats a message already read: the same sender, addressee, kind,
    coordinates and body digest (a step replayed after a rollback re-sends what it sent the
    first time). The receiver learns nothing new from it, so it counts, and is attacked, once;
    a replay that sent a different body is a new release and counts. Adds `h` to `sent`."""
    if h.step is None:
        return False
    key = (h.sender, h.to, h.kind, h.epoch, h.batch, h.step, h.dtype, h.shape, h.body_sha256)
    if key in sent:
        return True
    sent.add(key)
    return False
