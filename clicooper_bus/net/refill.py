"""What a member does for a notary whose log misses some of its messages (issue 17): a notary
started again after a crash, or a gap after a broker restart, tells each member where its chain
stands in the log (its `tip` with `resend`); the member publishes again what the log never got
(`resend_after`, from the last `KEEP_SENT` messages it keeps, at most `KEEP_SENT_BYTES`) and shows
the notary the leaves of what it accepted meanwhile (`show_witnessed`, `net.witness`), so that
the log has no gap and holds what receivers took. A process started again after a crash
goes on after the last message its dead process signed, kept on disk (`take_up`,
`net.outbox`), and sends again from its outbox what the log misses. A part of `bus.Bus`."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from pathlib import Path

import structlog

from clicooper_bus.net.liveness import BusError
from clicooper_bus.net.outbox import Outbox
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol.recovery import MAX_WITNESSED, Witnessed

log = structlog.get_logger("clicooper.bus")
# messages kept for a notary started again (`resend_after`): what a member sends while the
# notary is down (beats; the steps in flight: the owner holds) is far less
KEEP_SENT, KEEP_SENT_BYTES = 4096, 64 << 20


class Refill:
    """The resend methods of `bus.Bus` (a mixin: it uses the bus's sender, `kept`,
    `kept_bytes`, `witness`, `_publish` and `send_doc`)."""

    kept: deque[Envelope]
    kept_bytes: int
    outbox: Outbox | None = None  # our sent messages on disk, once `keep_sent_in` opened it

    def keep_sent_in(self, root: Path, *, restarted: bool) -> Outbox:
        """Write each of our messages to an outbox in `root` before sending it
        (`net.outbox`). A process that starts a chain of its own (not `restarted`) empties it
        first; a restarted one reads it with `take_up`."""
        self.outbox = Outbox(root, self.sender.identity.public, keep=KEEP_SENT,
                             keep_bytes=KEEP_SENT_BYTES)
        if not restarted:
            self.outbox.clear()
        return self.outbox

    def forget_sent(self) -> None:
        """The run is over (finished or stopped: neither is resumed): remove the outbox, and
        keep nothing more on disk (what we sent, activations or labels among it, is not left
        there)."""
        if self.outbox is not None:
            self.outbox.clear()
            self.outbox = None

    def take_up(self, seq: int, prev: bytes) -> list[Envelope]:
        """A restarted process: continue our chain after the last message our dead process
        signed (from the outbox, `keep_sent_in`), where the notary's log holds our chain up to
        `seq` (its `tip`; `prev`, the digest of our message there), and send again, in order,
        our messages after `seq`, which the log misses: the notary logs them, and a receiver
        that never had one takes it as a late delivery, in order (a process that restarted
        too drops data until its rollback). Returns them. With no outbox,
        or one that ends at or before `seq` (lost with a machine that lost power), the chain
        goes on from `seq` and the outbox starts again from there. Raises BusError when the
        outbox holds another message at `seq` than the log (a forked chain), or no longer the
        ones after it; OutboxError for an outbox that cannot be read."""
        mine = self.outbox.load() if self.outbox is not None else []
        if not mine or mine[-1].header.seq <= seq:
            if mine and mine[-1].header.seq == seq and mine[-1].header.digest != prev:
                raise BusError(f"the notary's log holds another message at our seq {seq} than "
                               f"the one our outbox kept (a forked chain): the log cannot be "
                               f"completed")
            if self.outbox is not None:
                if mine and mine[-1].header.seq < seq:
                    log.warning("outbox behind the log", outbox=mine[-1].header.seq, log=seq)
                self.outbox.clear()
            self.sender.seq, self.sender.prev = seq, prev
            return []
        after = _after(seq, prev, mine, of=mine[-1].header.seq)  # BusError: before anything
        self.kept = deque(mine)
        self.kept_bytes = sum(len(e.body) for e in mine)
        self.sender.seq, self.sender.prev = mine[-1].header.seq, mine[-1].header.digest
        self.resend_after(seq, prev)
        return after

    def _keep(self, env: Envelope) -> None:
        """Keep `env`, one of ours just published, for `resend_after`."""
        if isinstance(env.body, memoryview):  # a tensor's memory: kept as it was sent
            env = replace(env, body=bytes(env.body))
        self.kept.append(env)
        self.kept_bytes += len(env.body)
        while len(self.kept) > KEEP_SENT or self.kept_bytes > KEEP_SENT_BYTES:
            self.kept_bytes -= len(self.kept.popleft().body)

    def resend_after(self, seq: int, prev: bytes) -> int:
        """Publish again, in order, each of our messages after `seq`: the notary's log holds
        our chain up to `seq`, whose header digest is `prev` (its `tip`, from a notary started
        again after a crash, which never received what we sent while it was down). A message
        it had after all is refused there as a replay, and by everyone else as one; nothing is
        lost by sending too much. Returns how many were sent. Raises BusError when a message
        after `seq` is no longer kept, or `prev` is not the digest of ours at `seq` (the log
        holds another chain than ours): the log cannot be completed."""
        if seq >= self.sender.seq:
            return 0
        todo = _after(seq, prev, list(self.kept), of=self.sender.seq)
        for env in todo:
            self._publish(env)
        log.warning("sent again to the notary", first=seq + 1, last=todo[-1].header.seq,
                    count=len(todo))
        return len(todo)

    def refill(self, seq: int, prev: bytes, notary: str) -> tuple[int, int]:
        """The notary's `tip` with `resend` (its log misses what we sent after our `seq`, whose
        header digest is `prev`): send that again (`resend_after`; BusError when we cannot),
        then show it what we accepted since we last did (`show_witnessed`). Returns (messages
        sent again, leaves shown)."""
        return self.resend_after(seq, prev), self.show_witnessed(notary)

    def show_witnessed(self, notary: str) -> int:
        """Show `notary` the leaves of what we accepted since we last did (`net.witness`), in
        `witnessed` documents of at most `MAX_WITNESSED` each. Returns how many leaves."""
        leaves = self.witness.take()
        for i in range(0, len(leaves), MAX_WITNESSED):
            self.send_doc("witnessed", notary, Witnessed(leaves[i:i + MAX_WITNESSED]).to_doc())
        return len(leaves)


def _after(seq: int, prev: bytes, kept: list[Envelope], *, of: int) -> list[Envelope]:
    """Our messages in `kept` after `seq` (of `of` signed), where the notary's log holds our
    chain up to `seq` with header digest `prev`. Raises BusError when the first after it is not
    kept (the log cannot be completed) or does not follow `prev` (the log holds another chain
    than ours)."""
    todo = [e for e in kept if e.header.seq > seq]
    if not todo or todo[0].header.seq != seq + 1:
        have = f"{kept[0].header.seq}..{kept[-1].header.seq}" if kept else "none"
        raise BusError(f"the notary's log holds our messages up to seq {seq} of {of}, and we "
                       f"keep seqs {have} only: the rest cannot be sent again, so the log "
                       f"cannot be complete")
    if todo[0].header.prev != prev:
        raise BusError(f"the notary's log holds another message at our seq {seq} than ours "
                       f"(a forked chain): the log cannot be completed")
    return todo
