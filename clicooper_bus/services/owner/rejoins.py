"""The owner's side of a trainer's restart, as a part of `process.Owner`: a `rejoin` from a
process started again after a crash interrupts training, the run rolls back to a step every
stage committed a snapshot of (`rollback.rollback_step`), and training goes on from there.

Only a restarted process may rejoin: the notary tells a trainer silent past `timeout_s` where
its signed chain stands (`tip`, which the owner reads too), and a restarted process's `rejoin`
says which tip it took its chain up from (`after`; between the two in its chain, only what its
dead process signed and the log missed, sent again from its outbox, `net.outbox`). A tip counts
only if the notary found that trainer silent past `timeout_s` (a plain tip) or, for a `resend`
tip (which live members get too), if we take it for silent ourselves; for `rejoin_timeout_s`,
and for one rejoin: a live member that wants to roll the run back must fall silent first, in
everyone's sight, every time. A live member's
`rejoin` is refused (logged, ignored): it would roll the run back for nothing. With watermarks
on, the run never rolls back behind the end of a round any stage claimed (its claim is in the
log and cannot be made again), nor, hence, into a round before one that began.
"""

from __future__ import annotations

import time

from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.liveness import PeersGone
from clicooper_bus.net.refill import KEEP_SENT
from clicooper_bus.protocol.recovery import ChainTip, Rejoin, Rollback
from clicooper_bus.services.owner.rollback import (
    BrokerBack,
    Rejoined,
    RollbackRefused,
    rollback_step,
)

MAX_ROLLBACKS = 3  # rejoins a run rolls back for; past it, the next stops the run cleanly


def follows_a_tip(rejoin: Rejoin, seq: int, tips: set[int]) -> bool:
    """Whether `rejoin` (at header seq `seq`) takes its chain up from one of `tips` (the seqs
    of the notary's tips to its sender), with at most what a dead process could send again
    (`refill.KEEP_SENT`) between the two."""
    after = rejoin.follows(seq)
    return after in tips and 0 <= seq - after - 1 <= KEEP_SENT


class Rejoins:
    """The rejoin and rollback methods of `process.Owner` (a mixin: it uses the owner's bus,
    loop, books, training and stages)."""

    def _on_tip(self, env) -> None:
        """The notary told a silent trainer where its chain stands: a `rejoin` that continues
        from there is a restarted process's."""
        tip = ChainTip.parse(env.document(), sender=self.cfg.participants.notary)
        if tip.member in self.stages and (not tip.resend or self._silent(tip.member)):
            # a plain tip: the notary found the trainer silent past timeout_s (the notary,
            # which reads everything first, may find it so a moment before we do); a `resend`
            # tip goes to live members too (a resumed notary's to everyone, one opening a gap
            # on purpose), and counts only for a trainer we take for silent ourselves
            self.tips.setdefault(tip.member, {})[tip.seq] = time.monotonic()
        elif tip.member == self.cfg.participants.owner:
            self._on_own_tip(tip)

    def _silent(self, name: str) -> bool:
        """Whether we take trainer `name` for silent: suspected, or, while we resume and do
        not watch yet, not heard since we started."""
        kid = self.kid[name]
        return kid in self.bus.suspected or (not self.chain_ready and
                                             kid not in self.bus.last_seen)

    def _not_restarted(self, name: str, seq: int, rejoin: Rejoin) -> str | None:
        """Why `name`'s `rejoin` (header seq `seq`) is not a restarted process's, or None."""
        now, ttl = time.monotonic(), self.cfg.bus.rejoin_timeout_s
        fresh = {s for s, t in self.tips.get(name, {}).items() if now - t <= ttl}
        if not fresh:
            return (f"no tip of the notary's to it while we took it for silent, in the last "
                    f"{ttl:.0f} s (rejoin_timeout_s), that it has not rejoined on already: a "
                    f"live process does not rejoin")
        if not follows_a_tip(rejoin, seq, fresh):
            return (f"its rejoin (seq {seq}, after seq {rejoin.follows(seq)}) does not follow a "
                    f"tip of the notary's to it (seqs {sorted(fresh)[-3:]}) by at most what its "
                    f"dead process could send again: a restarted process says rejoin first")
        return None

    def _refuse_rollback(self, name: str) -> None:
        """Raises RollbackRefused when the run may not roll back (for `name`)."""
        if self.setup.defences.filter is not None:
            # a replayed step's noise is keyed by its step: on an activation that differs from
            # the first release (a pipelined window, or a member sending other gradients after
            # the rollback) the difference of the two releases has no noise at all, and the
            # accountant counts neither
            raise RollbackRefused(name, f"{name} came back, but rolling back a run with "
                                        f"activation protection on is not built (a replayed "
                                        f"release would reuse its step's noise)")
        if self.rollbacks >= MAX_ROLLBACKS:
            # a member may say rejoin at any time: each costs replayed steps, so it is bounded
            raise RollbackRefused(name, f"{name} came back, but the run has already rolled "
                                        f"back {self.rollbacks} times (at most "
                                        f"{MAX_ROLLBACKS})")

    def _claimed_floor(self) -> int:
        """The earliest step a rollback may go to: the end of the newest round any stage
        claimed (watermarks on), else 0."""
        claimed = [t for (_, t) in self.books.claims]
        if not claimed:
            return 0
        end = (max(claimed) + 1) * self.training.per
        return min(end, self.cfg.run.max_steps) if self.cfg.run.max_steps else end

    def _on_rejoin(self, env) -> None:
        """A restarted trainer is back (raises Rejoined: training rolls back, see `_train`).
        Its snapshots are commitments too (signed, logged): the newest may never have been
        announced by the process that died."""
        name = self.books.names[env.header.sender]
        rejoin = Rejoin.parse(env.document(), sender=name)
        why = self._not_restarted(name, env.header.seq, rejoin)
        if why:  # only a process started again after a crash rolls the run back
            self.log.warning("rejoin refused", trainer=name, problem=why)
            print(f"owner: refused {name}'s rejoin: {why}", flush=True)
            return
        del self.tips[name]  # one rejoin a tip
        if name in self.delivered:  # killed after its part was done: the run goes on
            self.log.warning("rejoin after the segment was delivered ignored", trainer=name)
            print(f"owner: {name} rejoined after delivering its segment: nothing to resume",
                  flush=True)
            return
        if rejoin.stage != self.stages.index(name) + 1:
            raise ClicooperError(f"{name} rejoined as stage {rejoin.stage}; it is stage "
                                 f"{self.stages.index(name) + 1}")
        self.log.warning("trainer rejoined", trainer=name, steps=rejoin.steps)
        print(f"owner: {name} rejoined with snapshots of steps {rejoin.steps}", flush=True)
        raise Rejoined(name, rejoin, env.header.digest.hex())

    def _train(self, resume: tuple[int, int] = (0, 0), rejoined: Rejoined | None = None
               ) -> tuple[list[dict], int]:
        """Every epoch from `resume` (epoch, batch). A trainer that rejoins after a restart
        (`_roll_back`), a standby taking a gone trainer's stage over (`_hand_over`) or the
        broker connection coming back (`_after_broker`) roll the run back, and training goes
        on from the step it rolled back to."""
        gone, broker = None, False
        self.broker_seen = self.bus.reconnects  # only a return during training rolls back
        self.loop.interrupt = self._broker_check
        try:
            while True:
                try:
                    if rejoined is not None:
                        resume, rejoined = self._roll_back(rejoined), None
                    elif gone is not None:
                        resume, gone = self._hand_over(gone), None
                    elif broker:
                        resume, broker = self._after_broker(), False
                    return self._train_from(*resume)
                except Rejoined as exc:  # (also one that rejoins while we roll back)
                    rejoined = exc
                except BrokerBack:
                    broker = True
                except PeersGone as exc:  # a standby takes a gone trainer's stage over
                    if not self._can_hand_over(exc.names):
                        raise
                    gone = exc.names
        finally:
            self.loop.interrupt = None

    def _broker_check(self) -> None:
        """Raises BrokerBack once per time the broker connection came back."""
        if self.bus.reconnects > self.broker_seen:
            self.broker_seen = self.bus.reconnects
            raise BrokerBack("the broker connection came back")

    def _after_broker(self) -> tuple[int, int]:
        """The broker was started again: once every trainer and the notary have subscribed
        again (their hello, the last subscription each makes) and are heard, roll everyone back
        to the newest step every stage committed and the owner kept (what was in flight is
        lost). Returns (epoch, batch) to train from. Raises RollbackRefused when it cannot."""
        cfg, bus, broker = self.cfg, self.bus, self.cfg.participants.broker
        print("owner: the broker connection came back: what was in flight is lost; rolling the "
              "run back once everyone is connected again", flush=True)
        self._refuse_rollback(broker)
        want = {bus.topics.hello(n) for n in [*self.stages, cfg.participants.notary]}
        wait = cfg.bus.join_timeout_s
        self.loop.until(lambda: want <= bus.resubscribed and not bus.suspected, timeout_s=wait,
                        timed_out=lambda: f"not everyone connected again within {wait:.0f} s of "
                                          f"the broker's return")
        states = {n: {k: v.state for k, v in self.books.snapshots.get(n, {}).items()}
                  for n in self.stages}
        floor = self._claimed_floor()
        fits = [s for s in sorted(self.training.snapshots.kept, reverse=True)
                if s >= floor and all(s in states[n] for n in self.stages)]
        if not fits:
            raise RollbackRefused(broker, f"the broker came back, but no step every stage "
                                          f"committed and the owner kept (owner: "
                                          f"{sorted(self.training.snapshots.kept)}) at or after "
                                          f"step {floor}: the run cannot go on")
        self.rollbacks += 1
        return self._rollback_to(fits[0], broker, states)

    def _roll_back(self, exc: Rejoined) -> tuple[int, int]:
        """Roll the run back for `exc.name`'s restart: choose the step (`rollback_step`), put
        the owner's head back, say `rollback` (signed, in the log: the steps from there on
        appear in it again), drop what trainers send until each says `restored`, and check
        each restored the state it committed. Returns (epoch, batch) to train from. Raises
        RollbackRefused (the run stops cleanly, named) when it cannot resume."""
        if not exc.in_resume:  # (one during a resumed owner's rollback is part of it)
            self._refuse_rollback(exc.name)
            self.rollbacks += 1
        books, name = self.books, exc.name
        # what each trainer committed, by step: its `snapshot`s, and for the rejoined one its
        # `rejoin` too (signed and logged: its newest file may never have been announced)
        states = {n: {k: v.state for k, v in books.snapshots.get(n, {}).items()}
                  for n in self.stages}
        step = rollback_step(name, exc.rejoin, states, self.stages,
                             set(self.training.snapshots.kept), floor=self._claimed_floor())
        states[name].setdefault(step, exc.rejoin.states[exc.rejoin.steps.index(step)])
        return self._rollback_to(step, name, states, [exc.digest] if exc.digest else None)

    def _rollback_to(self, step: int, name: str, states: dict[str, dict[int, str]],
                     rejoins: list[str] | None = None) -> tuple[int, int]:
        """Everyone back to `step` (for `name`, who came back): the owner's head (and tail)
        from its snapshot, `rollback` said (signed, logged), every trainer's `restored` awaited
        and checked against `states` (name -> step -> the state digest it committed), what
        the abandoned timeline committed after `step` forgotten; `rejoins`: the header digests
        (hex) of the rejoins taken for it, named in the rollback. Returns (epoch, batch) to
        train from. Raises RollbackRefused naming a restore that is not what was committed."""
        books = self.books
        for n in self.stages:  # commitments of steps that will be trained again
            books.snapshots[n] = {k: v for k, v in books.snapshots.get(n, {}).items()
                                  if k <= step}
        self.training.roll_back(step)
        per = self.training.per
        # an epoch's row stays if all its steps (and its evaluation, at its end) come before
        kept = [row for row in self.per_epoch if row["epoch"] * per + row["steps"] <= step]
        self.evaluations -= sum("accuracy" in row for row in self.per_epoch[len(kept):])
        self.per_epoch[:] = kept
        books.fenced = {self.kid[n] for n in self.stages}
        books.restored = {}
        amended = list(self.stages) if tuple(self.stages) != tuple(self.setup.roster.stages) \
            else None  # after a handover: a restarted trainer knows only its roster's order
        env = self.bus.send_doc("rollback", "all", Rollback(step, name, amended,
                                                            rejoins or None).to_doc(), step=step)
        rolled_back = books.rolled_back = (step, env.header.digest.hex())
        self.log.warning("rolled back", step=step, rejoined=name)
        why = "resumed" if name == self.cfg.participants.owner else f"for {name}"
        print(f"owner: rolling back to step {step} ({why}): steps from {step} on are trained "
              f"again", flush=True)
        self.until("every trainer's restored snapshot",
                   lambda: all(n in books.restored and books.restored[n].answers(*rolled_back)
                               for n in self.stages))
        for n in self.stages:
            if books.restored[n].state != states[n][step]:
                raise RollbackRefused(name, f"{n} restored a state of step {step} other than "
                                            f"the one it committed (sha256 "
                                            f"{books.restored[n].state[:16]}... for "
                                            f"{states[n][step][:16]}...)")
        self.mailbox.held.clear()
        epoch = len(self.per_epoch)
        return epoch, step - epoch * per
