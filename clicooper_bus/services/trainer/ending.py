"""How a trainer's part in a run ends, as a part of `stage.Trainer`: the owner's `end`, a
proof that the owner equivocated (the notary then stops the run), a refusal of poisoned input,
and leaving: the measured CPU and the sealed weights first when training finished, then staying
until the notary's final checkpoint covers what we sent."""

from __future__ import annotations

import sys

from safetensors.torch import save as st_save

from clicooper_bus.errors import PoisonedInput
from clicooper_bus.net.equivocation import Equivocation, proven
from clicooper_bus.net.liveness import PeersGone
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol import End, Segment
from clicooper_bus.services.common import EXIT_OK, EXIT_STOPPED


class Ending:
    """The end-of-run methods of `stage.Trainer` (a mixin: it uses the trainer's bus, loop,
    roster, segment, store and meter)."""

    def _on_equivocation(self, env: Envelope) -> None:
        """The notary's proof that a member signed two messages at one place of its chain,
        checked here (`net.equivocation.proven`). The owner's: nobody is left to stop the run
        but the notary (its final checkpoint follows), so training ends here and we leave with
        EXIT_STOPPED naming the owner. Another member's: the owner stops the run. A proof that
        proves nothing is refused naming the notary (its ProtocolError, a refusal through the
        dispatcher)."""
        notary = self.roster.notary.name
        ev = Equivocation.parse(env.document(), sender=notary)
        h, what = proven(ev, self.roster, sender=notary)
        self.log.error("equivocation proven", member=ev.member, kind=h.kind, step=h.step,
                       problem=what)
        if ev.member == self.roster.owner.name and not self.ended:
            print(f"{self.name}: error: {what}; the run stops", file=sys.stderr, flush=True)
            self.ended, self.stopped = True, True

    def _on_end(self, env: Envelope) -> None:
        end = End.parse(env.document(), sender=self.roster.owner.name)
        self.ended, self.stopped = True, end.stopped
        if end.stopped:
            self.log.warning("the owner stopped the run", reason=end.reason)

    def _refuse(self, exc: PoisonedInput) -> int:
        """Refuse poisoned input: nothing more is trained; tell the owner (a signed `end` with
        what was refused, which the notary logs), and leave once the notary's final checkpoint
        covers it. The owner stops the run."""
        self.log.error("input refused", **exc.to_doc())
        print(f"{self.name}: error: {exc}; stopping the run", file=sys.stderr, flush=True)
        self.bus.send_doc("end", self.roster.owner.name,
                          End("refused input", refused=exc.to_doc()).to_doc())
        return self._leave(EXIT_STOPPED)

    def _leave(self, code: int) -> int:
        """Stay until the notary's final checkpoint (or the join timeout, or the notary gone
        past the rejoin timeout: the owner stops a run whose notary is gone), say we are done,
        and leave once the notary closes the log. Returns `code`."""
        bus = self.bus
        self.loop.only("checkpoint", "tip")  # nothing else is served (a notary restarted
        # meanwhile still gets what it missed of ours)
        if self.notary_kid is not None:
            bus.watch({**bus.watched, self.notary_kid: self.roster.notary.name})
        while True:
            try:
                final = self.loop.until(lambda: self.final_seen,
                                        timeout_s=self.cfg.bus.join_timeout_s, timed_out=None)
                break
            except PeersGone as exc:
                if self.roster.notary is not None and self.roster.notary.name in exc.names:
                    self.log.warning("leaving without the final checkpoint", error=str(exc))
                    final = True
                    break
                bus.unwatch(exc.names)  # a neighbour gone: the notary still signs
        if not final:
            self.log.warning("no final checkpoint from the notary; leaving anyway")
        bus.watch({})  # from here on peers leave as they finish
        bus.mark_done()
        if self.notary_kid is not None:
            bus.linger(bus.topics.closed(self.roster.notary.name),
                       (self.notary_kid, self.roster.notary.name))
        if self.store is not None and final:
            self.store.clear()  # the run is over: nothing to rejoin, nothing for the next
        if final:  # (a standby, which has no store, too)
            bus.forget_sent()
        return code

    def _finish(self) -> int:
        """Report our measured CPU, deliver our weights sealed to the owner; stay until the
        notary's final checkpoint (or the join timeout), then leave once the notary closes."""
        bus = self.bus
        if self.store is not None and self.trained + 1 not in self.store.memory:
            self._snapshot(self.trained + 1)  # our last commitment is of what we seal
        # before the segment, which the owner waits for: it has our usage when it writes its
        # summary, and the usage goes into the log, signed, as evidence of what we computed
        usage = self.meter.usage()
        bus.send_doc("usage", self.roster.owner.name, usage.to_doc())
        self.log.info("usage reported", **usage.to_doc())
        weights = st_save({k: v.detach().contiguous() for k, v in self.segment.state_dict().items()},
                          metadata={"run_id": self.cfg.run.id, "stage": str(self.index + 1)})
        sealed = self.roster.owner.identity.seal(weights)
        bus.send_doc("segment", self.roster.owner.name,
                     Segment(self.index + 1, sealed, dict(bus.sent)).to_doc())
        self.log.info("segment delivered", bytes=len(weights))
        return self._leave(EXIT_OK)  # the stage is sealed
