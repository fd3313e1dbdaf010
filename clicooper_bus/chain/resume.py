"""Where a stage's watermark chain stands, for a trainer process started again after a crash.

The marker state of a stage (the round it committed to and that commitment's key, the digest
of its last claim, the previous stage's commitment of a round it has yet to commit to) lives in
no snapshot: which of a dead process's last `wm_commit` and `wm_claim` messages reached the log
only the notary knows. So the notary puts them in its `tip` (`WatermarkRegistry.marks_of`):
each message exactly as logged, leaf (header and signature) and body. The restarted trainer
does not take the notary's word for them (`open_marks`): each leaf must carry a valid
signature of its sender's roster key over a header of this run whose body hash is the body's,
and be of the right kind and stage; its own commitments it can recompute from their inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from clicooper_bus.chain.documents import Claim, Commit
from clicooper_bus.errors import ClicooperError
from clicooper_bus.net import codec
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import parse_header, signed_bytes, split_leaf

MAX_MARKS = 3  # own last commitment, own last claim, the previous stage's next commitment


class MarksRefused(ClicooperError):
    """A logged watermark message in a tip that does not hold: names the entry and why."""


@dataclass
class ChainState:
    """What the log holds of one stage's chain: its own commitments and claim digests (SHA-256
    of the logged leaf, what the next round's `prev_round` names) by round, and the previous
    stage's commitments by round."""

    commits: dict[int, Commit] = field(default_factory=dict)
    claims: dict[int, bytes] = field(default_factory=dict)
    previous: dict[int, Commit] = field(default_factory=dict)


def open_marks(entries: list[list[bytes]], roster: Roster, stage: int, *,
               limit: int = MAX_MARKS) -> ChainState:
    """The chain state of `stage` (1..K of `roster`) from a tip's `marks` (each entry
    `[leaf, body]` as logged, oldest first: a later one of a round replaces an earlier one), at
    most `limit` of them (a restarted trainer adds its own newer ones, from its outbox). Raises
    MarksRefused naming the entry that is not a message its sender signed, of this run, of
    `stage`'s trainer (`wm_commit`, `wm_claim`) or of the previous stage's (`wm_commit`)."""
    own = roster.by_name(roster.stages[stage - 1])
    prev = roster.by_name(roster.stages[stage - 2]) if stage > 1 else None
    state = ChainState()
    if len(entries) > limit:
        raise MarksRefused(f"a tip with {len(entries)} watermark messages (at most {limit})")
    for i, entry in enumerate(entries):
        try:
            leaf, body = entry
            header_raw, sig = split_leaf(leaf)
            h = parse_header(header_raw)
            signer = roster.by_key_id(h.sender)
            if signer is None or signer.name not in {own.name, prev.name if prev else None}:
                raise ValueError("not sent by this stage's trainer or the previous stage's")
            if not signer.identity.verify(signed_bytes(header_raw), sig):
                raise ValueError(f"the signature of {signer.name} does not verify")
            if h.run != roster.run_id or h.nonce != roster.nonce:
                raise ValueError("a message of another run")
            if h.body_sha256 != hashlib.sha256(body).digest() or h.body_len != len(body):
                raise ValueError("the body is not the one its header names")
            doc = codec.unpack(body)
            if h.kind == "wm_commit":
                c = Commit.from_doc(doc)
                mine = signer.name == own.name
                if c.stage != (stage if mine else stage - 1):
                    raise ValueError(f"a commitment of stage {c.stage} from {signer.name}")
                (state.commits if mine else state.previous)[c.round] = c
            elif h.kind == "wm_claim" and signer.name == own.name:
                claim = Claim.from_doc(doc)
                if claim.stage != stage:
                    raise ValueError(f"a claim of stage {claim.stage}")
                state.claims[claim.round] = hashlib.sha256(leaf).digest()
            else:
                raise ValueError(f"a {h.kind} message from {signer.name}")
        except (ValueError, TypeError, ClicooperError) as exc:
            raise MarksRefused(f"watermark message {i} of the notary's tip refused: "
                               f"{exc}") from None
    return state
