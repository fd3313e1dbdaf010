"""What a member accepted from others, kept to show the notary (issue 17, equivocation).

While the notary is down (killed, before its `--resume`), messages still reach their receivers
but not the log, and what each sender sends again from the notary's tip is all the log ever
sees of them. A sender that then sends other messages again than it sent would leave the log
holding inputs nobody trained on. So every member keeps the leaves (header || signature) of the
last messages it accepted, and shows them to the notary when the notary says its log misses
something (a `tip` with `resend`: `protocol.recovery.Witnessed`); the notary compares each with
the message its log holds, or later fills, at that place of the sender's chain
(`services.notary_evidence`), and two different signed headers there prove equivocation.

Beats are left out: a beat changes nothing a receiver computes. At most `KEEP_WITNESSED` leaves
are kept per sender (4096, as many as a sender keeps to send again, `bus.KEEP_SENT`), so that no
member's traffic, a colluder's flood of broadcast documents among it, can push another's out:
while the notary is silent the owner sends no new step, so an honest window is the steps in
flight and `timeout_s` of beats, far less; a longer one is not compared.
"""

from __future__ import annotations

from collections import deque

from clicooper_bus.net.wire import Envelope

KEEP_WITNESSED = 4096
UNSHOWN = frozenset({"beat"})  # kinds not kept


class Witness:
    """The leaves of the last `keep` messages accepted from each other member (not `UNSHOWN`
    kinds), in arrival order, each shown to the notary once (`take`)."""

    def __init__(self, own_key_id: str, keep: int = KEEP_WITNESSED):
        self.own, self.keep = own_key_id, keep
        self.leaves: dict[str, deque[bytes]] = {}  # sender key id -> its leaves

    def note(self, env: Envelope) -> None:
        """`env` was accepted (verified) by this member."""
        sender = env.header.sender
        if env.header.kind not in UNSHOWN and sender != self.own:
            self.leaves.setdefault(sender, deque(maxlen=self.keep)).append(env.leaf)

    def take(self) -> list[bytes]:
        """The leaves kept since the last call, sender by sender, each sender's oldest first;
        forgotten here."""
        leaves = [leaf for kept in self.leaves.values() for leaf in kept]
        self.leaves.clear()
        return leaves
