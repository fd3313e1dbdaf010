"""A trainer's side of the watermark chain, as a part of `stage.Trainer`: it commits before a
round, claims after it, keys its marks to the notary's checkpoints, and, started again after a
crash, takes the chain up where the log has it (the notary's `tip`, checked by
`chain.resume.open_marks`). A round the owner starts or ends a second time (after a rollback,
for a restarted stage) is committed and claimed once."""

from __future__ import annotations

from clicooper_bus.chain.resume import open_marks
from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol import CheckpointMessage, Round
from clicooper_bus.protocol.recovery import ChainTip
from clicooper_bus.tlog.checkpoint import open_checkpoint
from clicooper_bus.tlog.log import default_origin


class Marks:
    """The watermark chain methods of `stage.Trainer` (a mixin: it uses the trainer's bus,
    loop, roster and `marker`)."""

    seen_checkpoint = False  # a checkpoint of the notary's came (it has bound the roster)

    def _mark_routes(self) -> None:
        """Checkpoints from the notary; with marks on, rounds from the owner and the previous
        stage's commitments (every stage's pass by; only the previous stage's link to ours)."""
        k, route = self.kid, self.loop.route
        if self.notary_kid is not None:
            route("checkpoint", {self.notary_kid}, self._on_checkpoint)
        if self.marker is not None:
            route("round", {k[self.roster.owner.name]}, self._on_round)
            route("wm_commit", {k[n] for n in self.stages}, self._on_commit)

    def _resume_marks(self, tip: ChainTip, resent: list[Envelope]) -> None:
        """A restarted process: our marker from where the notary's log has our chain, and our
        own `wm_commit` and `wm_claim` among `resent` (what our dead process signed after the
        tip, sent again from our outbox). Raises ClicooperError if the tip has none or one
        that does not hold."""
        if tip.marks is None:
            raise ClicooperError("the notary's tip says nothing of our watermark chain (a notary "
                                 "older than watermark rejoins?): this stage cannot resume")
        own = [[e.leaf, bytes(e.body)] for e in resent if e.header.kind in ("wm_commit",
                                                                           "wm_claim")]
        state = open_marks([*tip.marks, *own], self.roster, self.index + 1,
                           limit=len(tip.marks) + len(own))
        try:
            self.marker.resume(state)
        except ValueError as exc:
            raise ClicooperError(f"our watermark chain cannot be taken up: {exc}") from None
        current = self.marker.current[0].round if self.marker.current else None
        self.log.info("watermark chain resumed", committed=current,
                      claimed=self.marker.claimed_round, previous=sorted(state.previous))

    def _on_checkpoint(self, env: Envelope) -> None:
        """A checkpoint the notary signed: our marks key to its root; the final one lets us go.
        One that does not verify is refused, with a warning."""
        try:
            msg = CheckpointMessage.parse(env.document(), sender=self.roster.notary.name)
            cp = open_checkpoint(msg.note, self.roster.notary.identity,
                                 default_origin(self.cfg.run.id))
        except ClicooperError as exc:
            self.log.warning("bad checkpoint from the notary", error=str(exc))
            return
        self.seen_checkpoint = True
        if self.marker is not None:
            self.marker.saw_checkpoint(cp.size, cp.root)
            self._commit()
        self.final_seen = self.final_seen or msg.final
        if msg.final and not self.ended:
            # the log ended while we trained or stood by: the run was stopped, by the owner
            # (an `end` we missed) or by the notary (the owner equivocated: a proof we missed)
            self.log.warning("the notary's final checkpoint came before the end of training")
            self.ended, self.stopped = True, True

    def _on_commit(self, env: Envelope) -> None:
        if self.index == 0 or env.header.sender != self.kid[self.prev]:
            return
        try:
            self.marker.saw_previous_commit(env.document())
        except ValueError as exc:
            raise ClicooperError(f"{self.prev} sent a malformed wm_commit message: {exc}") from None
        self._commit()

    def _on_round(self, env: Envelope) -> None:
        """Commit before a round, claim after it (once each)."""
        r = Round.parse(env.document(), sender=self.roster.owner.name)
        if r.phase == "start":
            self.marker.start(r.round)
        elif self.marker.has_claimed(r.round):
            self.log.info("round end again: already claimed", round=r.round)
        else:
            claim = self.marker.claim(r.round)
            sent = self.bus.send_doc("wm_claim", "all", claim.to_doc())
            self.marker.claimed(sent.leaf)
            self.log.info("watermark claimed", round=claim.round, bit_errors=claim.bit_errors,
                          bits=claim.nbits)
        self._commit()

    def _commit(self) -> None:
        """Publish our commitment as soon as everything it links to is known (not while a
        restarted process waits for the tip that says where its signed chain stands)."""
        if self.rejoining:
            return
        commit = self.marker.ready_commit()
        if commit is not None:
            self.bus.send_doc("wm_commit", "all", commit.to_doc())
            self.log.info("watermark committed", round=commit.round)
