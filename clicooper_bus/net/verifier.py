"""Accept or reject incoming messages, keeping each sender's `seq`/`prev` state.

Checks run cheapest first and state changes only when every check passed, so a rejected message
leaves the verifier exactly as it was and the process keeps serving. Each rejection is a typed
`RejectedMessage` naming the sender and the field; `rejected` counts them by reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence

from clicooper_bus.errors import (
    BadSignature,
    BadTensor,
    BodyHashMismatch,
    BrokenChain,
    OversizeFrame,
    RejectedMessage,
    ReplayedSeq,
    SeqGap,
    UnknownKey,
    UnknownKind,
    WrongRun,
)
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.kinds import KINDS, KindSpec
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import (
    DEFAULT_LIMITS,
    ZERO_HASH,
    Envelope,
    Header,
    Limits,
    parse_frames,
    parse_header,
    signed_bytes,
    split_leaf,
)


class Verifier:
    """Verifies the messages of one run from the keys of its roster.

    `partial=True` is for a receiver that subscribes to only some of each sender's messages
    (a trainer sees the owner's labels but not its activations for other stages): it still
    refuses a replayed or regressing `seq`, but cannot check gaps or the `prev` chain, which
    the notary, seeing everything, and `log verify` do.
    """

    def __init__(self, keys: Roster | Mapping[str, PublicIdentity], run_id: str, *,
                 limits: Limits = DEFAULT_LIMITS, kinds: Mapping[str, KindSpec] = KINDS,
                 partial: bool = False, roster_first: bool = False):
        self.partial = partial
        self.keys = dict(keys.keys() if isinstance(keys, Roster) else keys)
        self.run_id = run_id
        self.limits = limits
        self.kinds = kinds
        self._state: dict[str, tuple[int, bytes]] = {}
        self.rejected: Counter[str] = Counter()
        self.nonce: bytes | None = None
        if isinstance(keys, Roster):
            self.nonce = keys.nonce
        # a process that starts before the roster accepts nothing but a roster until it has
        # one: a message of an earlier run would otherwise move the sender's seq past the real
        # roster's, which would then be refused as a replay
        self.roster_first = roster_first

    def use_roster(self, roster: Roster) -> None:
        """Trust the keys of `roster` from now on, keeping every sender's state, and refuse
        every message that is not bound to its run nonce."""
        self.keys = dict(roster.keys())
        self.nonce = roster.nonce

    def last_seq(self, sender: str) -> int:
        return self._state.get(sender, (0, ZERO_HASH))[0]

    def verify_frames(self, frames: Sequence[bytes | memoryview]) -> Envelope:
        """Verify a message as received: frames, header, signature, chain and body."""
        try:
            env = parse_frames(frames, self.limits)
            self._check_header(env.header, env.signature)
            self._check_body(env.header, env.body)
        except RejectedMessage as exc:
            self.rejected[exc.code] += 1
            raise
        self._advance(env.header)
        return env

    def verify_leaf(self, leaf: bytes, body: bytes | memoryview | None = None) -> Header:
        """Verify a log leaf (`header || signature`), and its body when one was retained."""
        try:
            raw, sig = split_leaf(leaf)
            header = parse_header(raw, self.limits)
            self._check_header(header, sig)
            if body is not None:
                self._check_body(header, body)
        except RejectedMessage as exc:
            self.rejected[exc.code] += 1
            raise
        self._advance(header)
        return header

    def _check_header(self, h: Header, signature: bytes) -> None:
        spec = self.kinds.get(h.kind)
        if spec is None:
            raise UnknownKind(f"kind {h.kind!r} is not one of {sorted(self.kinds)}",
                              sender=h.sender, field="kind")
        key = self.keys.get(h.sender)
        if key is None:
            raise UnknownKey("key id is not in the roster", sender=h.sender, field="from")
        if not key.verify(signed_bytes(h.raw), signature):
            raise BadSignature(f"signature does not verify with the key of '{key.name}'",
                               sender=h.sender, field="signature")
        if h.run != self.run_id:
            raise WrongRun(f"message is for run {h.run!r}, this is run {self.run_id!r}",
                           sender=h.sender, field="run")
        if (spec.body == "tensor") != (h.dtype is not None):
            raise BadTensor(f"kind {h.kind!r} {'needs' if spec.body == 'tensor' else 'has no'} "
                            f"tensor dtype and shape", sender=h.sender, field="dtype")
        limit = spec.max_body if spec.max_body is not None else self.limits.max_body
        if h.body_len > limit:
            raise OversizeFrame(f"kind {h.kind!r} allows {limit} bytes, header says {h.body_len}",
                                sender=h.sender, field="len")
        if self.nonce is None and self.roster_first and h.kind != "roster":
            raise WrongRun(f"a {h.kind} message before the roster: this process takes nothing "
                           f"but the owner's roster until it has one (a message of an earlier "
                           f"run, or a peer ahead of us)", sender=h.sender, field="nonce")
        if self.nonce is not None and h.nonce != self.nonce:
            raise WrongRun(f"message is not bound to this run's nonce (it carries "
                           f"{h.nonce.hex() if h.nonce else 'none'}, the roster "
                           f"{self.nonce.hex()}): replayed from another run of id "
                           f"{h.run!r}, or from a peer with a stale roster",
                           sender=h.sender, field="nonce")
        last_seq, last_hash = self._state.get(h.sender, (0, ZERO_HASH))
        if h.seq <= last_seq:
            raise ReplayedSeq(f"seq {h.seq} is not after the last accepted seq {last_seq}",
                              sender=h.sender, field="seq")
        if self.partial:
            return
        if h.seq != last_seq + 1:
            raise SeqGap(f"seq {h.seq} skips {h.seq - last_seq - 1} message(s) after {last_seq}",
                         sender=h.sender, field="seq")
        if h.prev != last_hash:
            raise BrokenChain(f"prev does not hash the header of seq {last_seq}",
                              sender=h.sender, field="prev")

    def _check_body(self, h: Header, body: bytes | memoryview) -> None:
        if len(body) != h.body_len:
            raise BodyHashMismatch(f"body is {len(body)} bytes, header says {h.body_len}",
                                   sender=h.sender, field="len")
        if hashlib.sha256(body).digest() != h.body_sha256:
            raise BodyHashMismatch("body does not hash to the header's sha256",
                                   sender=h.sender, field="sha256")

    def _advance(self, h: Header) -> None:
        self._state[h.sender] = (h.seq, h.digest)
        if self.roster_first and self.nonce is None and h.kind == "roster":
            # bound at once, not when the process reads it: the messages the owner sends right
            # after its roster arrive in the same receive pass (`use_roster` confirms it)
            self.nonce = h.nonce
