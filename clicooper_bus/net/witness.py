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
are kept (4096, as many as a sender keeps to send again, `bus.KEEP_SENT`): while the notary is
silent the owner sends no new step, so the window is the steps in flight and `timeout_s` of
beats, far less; a longer one is not compared.
"""

from __future__ import annotations

from collections import deque

from clicooper_bus.net.wire import Envelope

KEEP_WITNESSED = 4096
UNSHOWN = frozenset({"beat"})  # kinds not kept


class Witness:
    """The leaves of the last `keep` messages accepted from others (not `UNSHOWN` kinds), in
    arrival order, each shown to the notary once (`take`)."""

    def __init__(self, own_key_id: str, keep: int = KEEP_WITNESSED):
        self.own = own_key_id
        self.leaves: deque[bytes] = deque(maxlen=keep)

    def note(self, env: Envelope) -> None:
        """`env` was accepted (verified) by this member."""
        if env.header.kind not in UNSHOWN and env.header.sender != self.own:
            self.leaves.append(env.leaf)

    def take(self) -> list[bytes]:
        """The leaves kept since the last call, oldest first; forgotten here."""
        leaves = list(self.leaves)
        self.leaves.clear()
        return leaves
