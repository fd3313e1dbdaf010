"""Handovers in a provenance bundle: a stage given to a standby (issue 17 item 2), checked,
and who trained each stage in each round. A handover is the owner's signed `handover` message
as logged; from its round on the stage's commitments and claims are the standby's."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from clicooper_bus.errors import ClicooperError
from clicooper_bus.net import codec
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import parse_header, signed_bytes, split_leaf
from clicooper_bus.protocol.recovery import Handover


class HandoverRefused(ClicooperError):
    """A handover of the bundle does not hold: names it, with the stage and round."""

    def __init__(self, reason: str, stage: int | None = None, round_: int | None = None):
        super().__init__(reason)
        self.reason, self.stage, self.round = reason, stage, round_


@dataclass(frozen=True)
class Handed:
    """One handover, checked: stage `stage` is `by`'s from round `round` on."""

    stage: int
    round: int
    replaced: str
    by: str
    leaf: bytes


def open_handovers(roster: Roster, handovers: list[tuple[bytes, bytes]]) -> list[Handed]:
    """A bundle's handovers ((leaf, body) pairs as logged), each checked: the owner's
    signature over a header of this run and nonce naming its body, a standby of the roster
    taking over the stage's trainer of the time. Raises VerifyFailed naming the one that is
    not."""
    out: list[Handed] = []
    trainers = list(roster.stages)
    for i, (leaf, body) in enumerate(handovers):
        try:
            header_raw, sig = split_leaf(leaf)
            h = parse_header(header_raw)
            if h.kind != "handover" or h.sender != roster.owner.key_id or \
                    not roster.owner.identity.verify(signed_bytes(header_raw), sig):
                raise ValueError("not a handover signed by the roster's owner")
            if h.run != roster.run_id or h.nonce != roster.nonce:
                raise ValueError("a handover of another run")
            if h.body_sha256 != hashlib.sha256(body).digest():
                raise ValueError("its body is not the one its header names")
            doc = Handover.parse(codec.unpack(body), sender=roster.owner.name)
        except (ValueError, ClicooperError) as exc:
            raise HandoverRefused(f"handover {i} of the bundle does not hold: {exc}") from None
        if not 1 <= doc.stage <= len(trainers) or trainers[doc.stage - 1] != doc.replaced or \
                doc.by not in roster.standby or doc.by in trainers:
            raise HandoverRefused(f"handover {i} gives stage {doc.stage} of {doc.replaced} to "
                               f"{doc.by}, which the roster and earlier handovers do not allow",
                               doc.stage, doc.round)
        trainers[doc.stage - 1] = doc.by
        out.append(Handed(doc.stage, doc.round, doc.replaced, doc.by, leaf))
    return out


def trainer_of(roster: Roster, handed: list[Handed], stage: int, round_: int) -> str:
    """Who trained `stage` in `round_`: the roster's trainer, or the standby of the last
    handover of that stage at or before that round."""
    name = roster.stages[stage - 1]
    for h in handed:
        if h.stage == stage and h.round <= round_:
            name = h.by
    return name
