"""The watermark chain of a run: what a commitment and a claim say, and the rules that link
each stage-round to the ones before it. The notary applies them as messages arrive, `clicooper
model verify` applies them to a bundle of certificates; both use `check_commit`.

Link of stage k, round t: `prev_link` is stage k-1's commitment in round t (the digest of the
signed roster for k = 1); `prev_round` is the digest (SHA-256 of the logged leaf) of stage k's
claim in round t-1 (zeros in round 0); `log_root` is the root of the log at `log_size`, a tree
the notary had when the trainer committed.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from clicooper_bus.chain import key as wk


class _Document:
    """A msgpack map with exactly typed fields, one per dataclass field (bytes(5) would make
    five zero bytes; True is an int to Python)."""

    WHAT = ""

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def _parse(cls, d: Any):
        types = {"int": int, "bytes": bytes}
        values = {}
        for f in fields(cls):
            typ = types[f.type] if isinstance(f.type, str) else f.type
            if type(d) is not dict or type(d.get(f.name)) is not typ:
                raise ValueError(f"malformed {cls.WHAT}: field {f.name!r} is missing or not "
                                 f"{typ.__name__}")
            values[f.name] = d[f.name]
        return cls(**values)


def roster_digest(roster_bytes: bytes) -> bytes:
    return hashlib.sha256(roster_bytes).digest()


@dataclass(frozen=True)
class Commit(_Document):
    WHAT = "watermark commitment"
    stage: int
    round: int
    commitment: bytes
    prev_link: bytes
    prev_round: bytes
    log_size: int
    log_root: bytes

    @classmethod
    def from_doc(cls, d: Any) -> Commit:
        c = cls._parse(d)
        if c.stage < 1 or c.round < 0 or c.log_size < 0:
            raise ValueError("malformed watermark commitment: stage, round or log size out of "
                             "range")
        if any(len(b) != 32 for b in (c.commitment, c.prev_link, c.prev_round, c.log_root)):
            raise ValueError("malformed watermark commitment: digests must be 32 bytes")
        return c

    def link(self, run_id: str, trainer_key: bytes) -> wk.Link:
        return wk.Link(run_id, self.stage, self.round, trainer_key, self.prev_link,
                       self.prev_round, self.log_root)


MAX_BITS = 4096  # watermark bits a claim may carry (the roster's `bits`; 64 by default)


@dataclass(frozen=True)
class Claim(_Document):
    WHAT = "watermark claim"
    stage: int
    round: int
    commitment: bytes
    weights_sha256: bytes
    bits: bytes  # packed extracted bits (empty for a stage without weights)
    nbits: int
    bit_errors: int

    @classmethod
    def from_doc(cls, d: Any) -> Claim:
        c = cls._parse(d)
        if len(c.commitment) != 32 or len(c.weights_sha256) != 32:
            raise ValueError("malformed watermark claim: digests must be 32 bytes")
        # bounded like the marks a stage can carry: an oversized claim would make every
        # message that quotes it (the notary's tips) too large to send
        if not 0 <= c.nbits <= MAX_BITS or len(c.bits) != (c.nbits + 7) // 8 or \
                not 0 <= c.bit_errors <= c.nbits:
            raise ValueError(f"malformed watermark claim: {c.nbits} bits in {len(c.bits)} "
                             f"bytes with {c.bit_errors} errors (at most {MAX_BITS} bits, "
                             f"packed 8 a byte)")
        return c


def check_commit(c: Commit, *, run_id: str, trainer_key: bytes, roster: bytes,
                 prev_commitment: bytes | None, prev_claim: bytes | None,
                 root_at: Any) -> str | None:
    """Why this commitment breaks the chain, or None if it holds. `prev_commitment`: stage
    k-1's commitment in this round (None if there is none); `prev_claim`: the digest of this
    stage's claim in the previous round; `root_at(size)`: the log's root at a size, or None."""
    want_link = roster_digest(roster) if c.stage == 1 else prev_commitment
    if want_link is None:
        return f"stage {c.stage - 1} has no commitment for round {c.round} before it"
    if c.prev_link != want_link:
        return (f"prev_link is not {'the roster digest' if c.stage == 1 else f'stage {c.stage - 1}'}"
                f"{'' if c.stage == 1 else chr(39) + 's commitment'} of round {c.round}")
    want_round = wk.ZERO if c.round == 0 else prev_claim
    if want_round is None:
        return f"stage {c.stage} has no claim for round {c.round - 1} (a skipped round)"
    if c.prev_round != want_round:
        return f"prev_round is not stage {c.stage}'s claim of round {c.round - 1}"
    root = root_at(c.log_size)
    if root is None or root != c.log_root:
        return f"log_root is not the log's root at size {c.log_size}"
    if wk.commitment(c.link(run_id, trainer_key).key()) != c.commitment:
        return "the commitment is not to the key its own inputs derive"
    return None
