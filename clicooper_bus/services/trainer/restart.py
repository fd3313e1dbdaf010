"""A trainer's snapshots, its restart and the run's rollbacks (issue 17), as a part of
`stage.Trainer`.

Every `[run] snapshot_every` steps and at each epoch boundary the stage is snapshotted
(`snapshot.Store`: weights, Adam's state, RNG, step) to `<run>/snapshots/<name>/` and committed
in a signed `snapshot` message. A process started again with the same name, key and config
finds its snapshots and the roster it joined with there (`_rejoin`): it continues its signed
chain after the last message its dead process signed (its outbox, `net.outbox`), sends again
what the notary's log misses of them (after the notary's `tip`), takes its watermark chain up
from the same tip and those messages when marks are on (`marks.Marks._resume_marks`), restores
its newest snapshot and says `rejoin`; the owner rolls everyone back (`rollback`) to a step every stage has a
committed snapshot of, each trainer restores it and says `restored`, and the owner trains from
there again.
"""

from __future__ import annotations

import time

from clicooper_bus.errors import PoisonedInput, RosterError
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol import ProtocolError, Usage
from clicooper_bus.protocol.recovery import STATES_ROUNDS, ChainTip, Rejoin, Restored, Rollback, Snapshot
from clicooper_bus.services.trainer import snapshot


class Restarts:
    """The snapshot, rejoin and rollback methods of `stage.Trainer` (a mixin: it uses the
    trainer's bus, loop, roster, stage and store)."""

    rejoining = False  # a restarted process before the notary's tip: it sends nothing
    rolled_back: tuple[int, str] | None = None  # the last rollback: (step, header digest)

    def _snapshot(self, step: int) -> None:
        """Snapshot the stage at `step` (the state after steps 0 .. step - 1) to disk, then
        commit to it in a signed `snapshot` message (the log holds the commitment; a process
        killed between the two resumes from a file whose commitment its `rejoin` carries)."""
        t0 = time.perf_counter()
        snap = snapshot.take(self.seg, step)
        size = self.store.keep(snap, usage=self.meter.usage().to_doc())
        self.bus.send_doc("snapshot", self.roster.owner.name,
                          Snapshot(step, snap.weights, snap.state).to_doc(), step=step)
        if (self.roster.standby or self.roster.meta.get("states") == STATES_ROUNDS) and \
                self.store.boundary(step):
            self._send_state(snap)
        self.log.info("snapshot", step=step, bytes=size,
                      ms=round((time.perf_counter() - t0) * 1000, 2))

    def _after_update(self, step: int) -> None:
        """After step `step`'s update: snapshot if `step + 1` is due (every `[run]
        snapshot_every` steps, and at each epoch boundary: a watermark round's)."""
        nxt = step + 1
        if self.store is None:
            return
        if nxt % self.cfg.run.snapshot_every == 0 or (self.per and nxt % self.per == 0):
            self._snapshot(nxt)

    def _rejoin(self) -> None:
        """A restarted process: rejoin the run our snapshots belong to. The roster is the one
        we joined with (signed by the owner, checked again); our signed chain goes on after the
        last message our dead process signed (our outbox), and what of those the notary's log
        misses (after its `tip`: only the notary knows which reached the log) is sent again, so
        that no place of our chain is ever signed twice; then we restore our newest snapshot and
        tell the owner which ones we hold."""
        raw = self.snapshots.roster.read_bytes()
        roster = Roster.open(raw, owner=self.owner_key)  # RosterError: not the owner's
        if self.name not in roster.stages:
            raise RosterError(f"the roster saved in {self.snapshots.root} does not list "
                              f"'{self.name}'; remove that directory to join a new run")
        if roster.notary is None:
            raise RosterError("the saved roster has no notary: nobody can say where our "
                              "signed chain stands, so a restarted trainer cannot rejoin")
        self.roster, self.roster_bytes = roster, raw
        self._build()
        steps = self.snapshots.steps()
        print(f"{self.name}: found snapshots of steps {steps} in {self.snapshots.root}; "
              f"rejoining run '{self.cfg.run.id}': waiting for the notary's chain tip",
              flush=True)
        tips: list[ChainTip] = []

        def on_tip(env: Envelope) -> None:
            tip = ChainTip.parse(env.document(), sender=roster.notary.name)
            if tip.member == self.name:
                tips.append(tip)

        self.loop.route("tip", {self.notary_kid}, on_tip)
        if self.marker is not None:  # noted from now on; nothing is sent before the tip
            self.rejoining = True
            self._mark_routes()
        wait = self.cfg.bus.join_timeout_s + self.cfg.bus.rejoin_timeout_s
        self.loop.until(lambda: bool(tips), timeout_s=wait, timed_out=lambda: (
            f"no chain tip from the notary within {wait:.0f} s: is run '{self.cfg.run.id}' "
            f"still going? (to join a new run instead, remove {self.snapshots.root})"))
        tip = tips[-1]
        resent = self.bus.take_up(tip.seq, tip.prev)  # after what our dead process signed
        if resent:
            print(f"{self.name}: sent again {len(resent)} message(s) our dead process signed "
                  f"after the log's seq {tip.seq} (from {self.snapshots.outbox})", flush=True)
        if self.marker is not None:
            self._resume_marks(tip, resent)
            self.rejoining = False
        snaps = [self.store.get(s) for s in steps]
        snapshot.restore(self.seg, snaps[-1].tensors)
        self.trained = snaps[-1].step - 1
        for snap in snaps:
            self.store.keep(snap, write=False)
        earlier = self.store.usage_of(steps[-1])
        if earlier is not None:  # the dead process's figures as of its last snapshot
            try:
                self.meter.carry(Usage.parse(earlier, sender=self.name))
            except ProtocolError as exc:
                self.log.warning("earlier usage unreadable", error=str(exc))
        rejoin = self.bus.send_doc("rejoin", roster.owner.name, Rejoin(
            self.index + 1, steps, [s.state for s in snaps], after=tip.seq).to_doc())
        self.bus.start_beating()
        self.bus.watch({self.kid[n]: n for n in {roster.owner.name, self.prev, self.next} if n})
        # until the rollback answering us, everyone's data is of a timeline we left (the
        # owner's own, sent again for a notary started again, among it)
        self.fence = {self.kid[n] for n in (roster.owner.name, self.prev, self.next) if n}
        self._routes()
        self.log.info("rejoined", stage=self.index + 1, seq=rejoin.header.seq, tip=tip.seq,
                      resent=len(resent), steps=steps)
        print(f"{self.name}: rejoined at seq {rejoin.header.seq} with snapshots of steps "
              f"{steps}; waiting for the owner's rollback", flush=True)

    def _on_rollback(self, env: Envelope) -> None:
        """Restore our snapshot of the rollback's step, drop everything in progress, and say
        `restored`. Our neighbours' data sent before they restored is stale: dropped until
        their `restored` (each publisher's messages arrive in order)."""
        rb = Rollback.parse(env.document(), sender=self.roster.owner.name)
        if rb.stages is not None and rb.stages != self.stages:
            self._restage(rb.stages)  # handovers we missed (restarted with our roster's order)
        snap = self.store.get(rb.step)
        if snap is None:  # refused like a poisoned input: the owner stops the run, named
            raise PoisonedInput(sender=self.roster.owner.name, kind="rollback", step=rb.step,
                                problem=f"a rollback to step {rb.step} (for {rb.rejoined}, "
                                        f"whose rejoin named it), of which {self.name} "
                                        f"has no snapshot (in memory: {sorted(self.store.memory)}"
                                        f", on disk: {self.snapshots.steps()})")
        self.seg = SegmentTrainer(self.segment, lr=self.plan.lr,  # nothing pending
                                  seed=(self.plan.seed, self.index + 1))
        if self.marker is not None:
            self.seg.regularizer = self.marker.regularizer
        snapshot.restore(self.seg, snap.tensors)
        self.store.drop_after(rb.step)  # the abandoned timeline's: those steps come again
        self.queued.clear()
        self.given.clear()
        self.labels.clear()
        self.waiting_logits.clear()
        self.trained = rb.step - 1
        per = self.per or 1
        self.eval_seen = {(e, b) for e, b in self.eval_seen if (e + 1) * per < rb.step}
        self.meter.steps = rb.step  # replayed steps are counted once, as the owner counts them
        stages = set(self.stages)
        self.rolled_back = (rb.step, env.header.digest.hex())
        self.fence = {self.kid[n] for n in (self.prev, self.next) if n in stages
                      and not self._answered(self.kid[n], self.rolled_back)}
        self.bus.send_doc("restored", "all", Restored(rb.step, snap.state,
                                                      self.rolled_back[1]).to_doc(), step=rb.step)
        self.log.warning("rolled back", step=rb.step, rejoined=rb.rejoined,
                         fenced=sorted(self.loop.names.get(k, k) for k in self.fence))
        why = "the owner resumed" if rb.rejoined == self.roster.owner.name else \
            f"{rb.rejoined} rejoined"
        print(f"{self.name}: rolled back to step {rb.step} ({why})", flush=True)

    def _on_tip(self, env: Envelope) -> None:
        """The notary's tip to a live process saying the log misses what we sent after its
        seq (`resend`: a notary started again, a gap): sent again, with what we accepted
        meanwhile for the notary to compare with its log (`Bus.refill`; BusError when it
        cannot: the log cannot be complete). A paused process's tips send nothing."""
        tip = ChainTip.parse(env.document(), sender=self.roster.notary.name)
        if tip.member != self.name or not tip.resend:
            return
        sent, shown = self.bus.refill(tip.seq, tip.prev, self.roster.notary.name)
        if sent:
            print(f"{self.name}: sent {sent} message(s) again for the notary, which had our "
                  f"chain up to seq {tip.seq}", flush=True)
        self.log.info("refilled", sent=sent, shown=shown, tip=tip.seq)

    def _on_restored(self, env: Envelope) -> None:
        """A neighbour restored: what it sends from now on is of the rolled-back run."""
        sender = env.header.sender
        done = Restored.parse(env.document(), sender=self.loop.names.get(sender))
        self.restored_seen[sender] = done
        if self.rolled_back is not None and done.answers(*self.rolled_back):
            self.fence = set(self.fence) - {sender}

    def _answered(self, kid: str, rolled_back: tuple[int, str]) -> bool:
        """Whether the neighbour of key `kid` already said it restored for the rollback
        `rolled_back` (step, header digest; it may have had it before us): its data is
        current, not fenced."""
        done = self.restored_seen.get(kid)
        return done is not None and done.answers(*rolled_back)

    def _fenced(self, env: Envelope) -> bool:
        """Whether `env` is stale data from a neighbour that has not restored yet."""
        if env.header.sender in self.fence:
            self.dropped += 1
            self.log.info("stale message dropped", kind=env.header.kind, step=env.header.step)
            return True
        return False
