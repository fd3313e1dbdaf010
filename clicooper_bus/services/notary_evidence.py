"""The notary's side of equivocation (`net.equivocation`), as a part of `notary.Notary`.

Every signed message the notary's verifier refuses as a replay or a broken chain is compared,
as it arrives (`_conflict`, the bus's `on_conflict`), with the message the log holds at that
place of its sender's chain: the same header again is a resend (a notary or broker restart) and
nothing happens; another one is equivocation. One refused ahead of a gap is kept (within the
`MAX_AHEAD` places after its sender's last logged message) and compared with the message that
later fills its place (`_filled`); two different ones at one place prove at once.
So is each leaf a member shows us (`_witnessed`, its `witnessed` after our `tip` with
`resend`): what it accepted while we may have missed it, a notary started again after a crash
above all (`net.witness`).
Each proof, the two signed leaves, is published to everyone (`_accuse`), once per member, so
that it lands in the log; the owner checks it and stops the run naming the member. An owner
that equivocates cannot be trusted to stop the run: the notary then does (`Notary.
_stop_for_the_owner`: a final checkpoint over the proof, which every trainer checks too).
"""

from __future__ import annotations

import hashlib
import sys

from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.equivocation import Equivocation, leaf_header, signed_header
from clicooper_bus.net.refill import KEEP_SENT
from clicooper_bus.net.wire import Envelope, Header, split_leaf
from clicooper_bus.protocol import ProtocolError
from clicooper_bus.protocol.recovery import Witnessed

# the places after a sender's last logged message where a header refused ahead of a gap, or
# shown by a member, is kept: as many as a member keeps to send again (`refill.KEEP_SENT`), so a
# gap longer than that cannot be closed anyway
MAX_AHEAD = KEEP_SENT
SIGNING = ("owner", "trainer", "standby")  # the roles whose chains the log holds


class NotaryEvidence:
    """The equivocation methods of `notary.Notary` (a mixin: it uses the notary's bus, log,
    roster and `logged_at`)."""

    def _conflict(self, env: Envelope) -> None:
        """A signed message refused for its place in its sender's chain (called from inside
        the bus's receive: it only compares and keeps the proof; `_accuse` sends it)."""
        self._compare(env.header, env.leaf, shown=False)

    def _witnessed(self, env: Envelope, *, replayed: bool = False) -> None:
        """A member's `witnessed` leaves (logged already): what it accepted from others while
        our log may have missed it, each compared like a refused message. Taken only as an
        answer to our `tip` with `resend`, at most `witness_docs` documents each (`replayed`:
        read again from our log on `--resume`, which it had been); a leaf that cannot be one
        the member accepted (its own, ours, one addressed to someone else) or that is not a
        roster member's signed header of this run proves nothing and is skipped, each leaf
        compared once."""
        presenter = self.roster.by_key_id(env.header.sender)
        if presenter is None or presenter.role not in SIGNING:
            return
        if not replayed:
            if self.witness_docs.get(presenter.key_id, 0) <= 0:
                self.log.warning("witnessed refused", member=presenter.name,
                                 error="not an answer to our tip with resend")
                return
            self.witness_docs[presenter.key_id] -= 1
        try:
            shown = Witnessed.parse(env.document(), sender=presenter.name)
        except ClicooperError as exc:
            self.log.warning("witnessed refused", member=presenter.name, error=str(exc))
            return
        for leaf in shown.leaves:
            digest = hashlib.sha256(leaf).digest()
            if digest in self.compared:
                continue
            try:
                h = leaf_header(leaf, "witnessed", presenter.name)
                if h.sender in (presenter.key_id, self.ident.key_id) or \
                        h.to not in (presenter.name, "all"):
                    continue  # not a message of another member's that it could have accepted
                h = signed_header(leaf, self.roster, which="witnessed",
                                  sender=presenter.name)
            except ProtocolError as exc:
                self.log.warning("witnessed leaf refused", member=presenter.name, error=str(exc))
                continue
            self.compared.add(digest)
            self._compare(h, leaf, shown=True)

    def _compare(self, h: Header, leaf: bytes, *, shown: bool) -> None:
        """Compare the signed header `h` (its `leaf`) with the log's message at that place of
        its sender's chain: one refused by our verifier (`shown` False: a replay, a broken
        chain, or ahead of a gap), or one a member accepted (`shown` True: its `witnessed`).
        One the log has no message at yet is kept until it has (`_filled`), within the
        `MAX_AHEAD` places after the sender's last logged one (no member can send again more
        than that, so a place further on can never be filled: a flood of such headers takes
        nothing); two different ones at one place prove equivocation at once."""
        if self.roster is None or h.sender == self.ident.key_id or h.sender in self.accused:
            return
        last = self.bus.verifier.last_seq(h.sender)
        if h.seq > last + (0 if shown else 1):  # ahead: the message that fills it must be it
            if h.seq > last + MAX_AHEAD:
                return
            early = self.ahead.setdefault(h.sender, {}).setdefault(h.seq, (h.digest, leaf))
            if early[0] != h.digest:
                self._prove(h.sender, early[1], leaf)
            return
        at = h.seq if h.seq <= last else h.seq - 1  # a replay, or a `prev` that is not ours
        logged = self._accepted(h.sender, at)
        if logged is None:  # not a place the log holds (before the roster): nothing to compare
            return
        raw, _ = split_leaf(logged)
        if at == h.seq and hashlib.sha256(raw).digest() == h.digest:
            return  # the very message the log holds, sent again
        self._prove(h.sender, logged, leaf)

    def _filled(self, env: Envelope) -> None:
        """`env` was logged: if a message of its sender at its seq was refused before, ahead
        of a gap, or shown by a member, it must have been this one (a member could otherwise
        show a receiver the message the gap kept from the log and fill the gap with another)."""
        h = env.header
        early = self.ahead.get(h.sender, {}).pop(h.seq, None)
        if early is not None and early[0] != h.digest and h.sender not in self.accused:
            self._prove(h.sender, env.leaf, early[1])

    def _prove(self, sender: str, logged: bytes, conflicting: bytes) -> None:
        """Key id `sender` is proven to have equivocated: kept for `_accuse`, once."""
        self.accused.add(sender)
        self.evidence.append(Equivocation(self.roster.by_key_id(sender).name, logged,
                                          conflicting))

    def _accepted(self, sender: str, seq: int) -> bytes | None:
        """The leaf of `sender`'s message at `seq` the notary accepted: logged, or verified
        and waiting in the bus's inbox to be (a receive pass verifies a batch before the
        notary logs it, so the two messages of an equivocation can arrive in one)."""
        index = self.logged_at.get((sender, seq))
        if index is not None:
            return self.plog.leaf(index)
        for env in reversed(self.bus.inbox):
            if env.header.sender == sender and env.header.seq == seq:
                return env.leaf
        return None

    def _accused_before(self, env: Envelope) -> None:
        """Our logged proof (a notary resumed on its log): that member stays accused (no second
        proof; its forked chain's gap is not the log's)."""
        member = self.roster.by_name(Equivocation.parse(env.document()).member)
        if member is not None:
            self.accused.add(member.key_id)

    def _accuse(self) -> bool:
        """Publish each proof found since the last call. Returns True when the owner
        equivocated (the notary then stops the run itself)."""
        owner = False
        while self.evidence:
            ev = self.evidence.pop(0)
            self.bus.send_doc("equivocation", "all", ev.to_doc())
            self.log.error("equivocation", member=ev.member)
            print(f"notary: error: {ev.member} equivocated (signed two different messages at "
                  f"one place of its chain); the proof is published and logged", file=sys.stderr,
                  flush=True)
            owner = owner or ev.member == self.roster.owner.name
        return owner
