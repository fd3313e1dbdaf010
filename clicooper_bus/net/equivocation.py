"""Equivocation: a roster member that signed two different messages at one place in its chain.

Each member's messages form one signed hash chain (`seq`, and `prev`, the digest of the header
before: `wire`). An honest member signs exactly one message at each `seq`; a message it sends
again (`Bus.resend_after`, after a notary restart) has the same bytes. A member that signs two,
and publishes them on different topics, can show its receivers one and the log the other: the
notary, which reads everything first (the broker's witness channel), logs the first and refuses
the second as a replay, while a receiver that subscribed only to the second's topic accepts it
(its verifier is partial: it sees only some of the sender's messages). The log would then hold
another message than the one trained on. Two signed headers prove it, and nothing else can:

- `same seq`: two headers of one sender at the same `seq` with different digests;
- `forked`: a header at `seq` s + 1 whose `prev` is not the digest of the sender's header at
  s: the sender signed another message at s (the notary refuses it as a broken chain).

The notary publishes the proof (`Equivocation`, kind `equivocation`), so that it lands in the
log; the owner checks it (`proven`) and stops the run naming the member; `log verify` checks
every one the log holds. The idea is that of certificate transparency's split-view evidence
(RFC 9162, section 8.1.3: two signed tree heads that cannot both be honest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import Header, parse_header, signed_bytes, split_leaf
from clicooper_bus.protocol import Control, ProtocolError

KIND = "equivocation"


@dataclass(frozen=True)
class Equivocation(Control):
    """The notary's proof that `member` equivocated: `logged`, the leaf (header || signature)
    of its message the log holds at that place of its chain (or, two being shown or refused
    there before the log filled it, the first), and `conflicting`, the leaf of the other signed
    message (each at most a header and a 64-byte signature)."""

    KIND: ClassVar[str] = KIND
    member: str
    logged: bytes
    conflicting: bytes


def _named(which: str) -> str:
    return "leaf" if which == "leaf" else f"{which} leaf"


def leaf_header(leaf: bytes, which: str, sender: str | None) -> Header:
    """The header of `leaf` (header || signature), parsed, not checked; ProtocolError naming
    `sender` and the field `which` when it is not a header."""
    try:
        raw, _ = split_leaf(leaf)
        return parse_header(raw)
    except ClicooperError as exc:
        raise ProtocolError(f"the {_named(which)} is not a message header: {exc}", sender=sender,
                            kind=KIND, field_=which) from None


def signed_header(leaf: bytes, roster: Roster, *, member: str | None = None,
                  which: str = "leaf", sender: str | None = None) -> Header:
    """The header of `leaf` (header || signature), checked: signed by a roster member's key
    (`member`'s, when named), for the roster's run and nonce. Raises ProtocolError naming
    `sender` (whoever presented the leaf) and the field `which` when it is not."""
    h = leaf_header(leaf, which, sender)
    what = _named(which)
    signer = roster.by_name(member) if member is not None else roster.by_key_id(h.sender)
    _, sig = split_leaf(leaf)
    if signer is None or h.sender != signer.key_id or \
            not signer.identity.verify(signed_bytes(h.raw), sig):
        whose = f"{member}'s key" if member is not None else "a roster member's key"
        raise ProtocolError(f"the {what} is not signed by {whose}", sender=sender, kind=KIND,
                            field_=which)
    if h.run != roster.run_id or h.nonce != roster.nonce:
        raise ProtocolError(f"the {what} is of run {h.run!r}"
                            f"{'' if h.run != roster.run_id else ' but another nonce'}",
                            sender=sender, kind=KIND, field_=which)
    return h


def proven(ev: Equivocation, roster: Roster, *, sender: str | None = None) -> tuple[Header, str]:
    """Check `ev` against `roster` (the run's signed roster): both leaves signed by `member`'s
    key, for the roster's run, and in conflict. Returns the conflicting header and one sentence
    saying what they prove. Raises ProtocolError naming `sender` (the evidence's signer) when
    they prove nothing: a notary that accuses a member falsely is itself refused."""
    if roster.by_name(ev.member) is None:
        raise ProtocolError(f"{ev.member!r} is not in the roster", sender=sender, kind=KIND,
                            field_="member")
    a, b = (signed_header(leaf, roster, member=ev.member, which=which, sender=sender)
            for which, leaf in (("logged", ev.logged), ("conflicting", ev.conflicting)))
    if a.seq == b.seq and a.digest != b.digest:
        return b, (f"{ev.member} signed two different messages at seq {a.seq}: a {a.kind} to "
                   f"{a.to} and a {b.kind} to {b.to}")
    if b.seq == a.seq + 1 and b.prev != a.digest:
        return b, (f"{ev.member} forked its chain at seq {a.seq}: its {b.kind} to {b.to} at seq "
                   f"{b.seq} follows another message than the {a.kind} to {a.to} the log holds "
                   f"there")
    raise ProtocolError(f"the two leaves of {ev.member} (seq {a.seq} and {b.seq}) do not "
                        f"conflict", sender=sender, kind=KIND, field_="conflicting")
