"""Standby trainers and handovers (issue 17 item 2), as a part of `stage.Trainer`.

A roster member with the `standby` role joins the run without a stage: it beats and waits.
When a trainer is gone past `rejoin_timeout_s`, the owner hands its stage to the first standby
still heard (`handover`, signed and logged: the roster's amendment) with the stage state the
gone trainer committed at a round boundary, sealed to the standby's key (the trainer sent it
sealed to the owner, `stage_state`, which the owner checked against its commitment). The
standby builds the stage from the plan, restores that state (saved as its own snapshot), takes
the stage's place in the chain and, with watermarks on, starts its chain from the stage's last
claim (`Marker.resume_handover`); the owner's `rollback` to that step follows, and the standby's
`restored` must carry the digest the gone trainer committed. Every other trainer takes the
standby for the gone one (its neighbours route to it and watch it) and, with watermarks on,
commits the round again (`Marker.void_round`): the round starts again with the new stage.
"""

from __future__ import annotations

import time

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.kinds import KINDS
from clicooper_bus.net.wire import DEFAULT_LIMITS, Envelope
from clicooper_bus.protocol.recovery import Handover, StageState
from clicooper_bus.services.trainer import snapshot

FOREVER = float("inf")


class Replaced(ClicooperError):
    """The owner handed our stage to a standby while we were silent past `rejoin_timeout_s`
    (a process paused that long, then continued): the run goes on without us."""


class Standby:
    """The standby and handover methods of `stage.Trainer` (a mixin)."""

    def _stand_by(self) -> bool:
        """Wait, beating, for a handover to us or the end of the run. True once we hold a
        stage (serve it as any trainer), False if the run ended without needing us."""
        roster, owner = self.roster, self.roster.owner
        self.bus.bind(roster)
        self.kid = {m.name: m.key_id for m in roster.members}
        self.notary_kid = roster.notary.key_id if roster.notary else None
        self.loop.names = {v: k for k, v in self.kid.items()}
        handed: list[tuple[Envelope, Handover]] = []

        def on_handover(env: Envelope) -> None:
            h = Handover.parse(env.document(), sender=owner.name)
            if h.by == self.name:
                handed.append((env, h))

        self.loop.route("handover", {owner.key_id}, on_handover)
        self.loop.route("end", {owner.key_id}, self._on_end)
        if self.notary_kid is not None:
            self.loop.route("checkpoint", {self.notary_kid}, self._on_checkpoint)
            self.loop.route("tip", {self.notary_kid}, self._on_tip)  # a notary restarted
            self.loop.route("equivocation", {self.notary_kid}, self._on_equivocation)
        # beats only once the notary has the roster (its first checkpoint follows it): before,
        # one would be refused there as from an unknown key and leave a hole in our chain
        wait = self.cfg.bus.join_timeout_s
        self.loop.until(lambda: self.seen_checkpoint or self.ended, timeout_s=wait,
                        timed_out=lambda: f"no checkpoint from the notary within {wait:.0f} s")
        self.bus.start_beating()
        self.bus.watch({owner.key_id: owner.name})
        print(f"{self.name}: standing by in run '{self.cfg.run.id}' (standby "
              f"{roster.standby.index(self.name) + 1} of {len(roster.standby)})", flush=True)
        self.loop.until(lambda: bool(handed) or self.ended, timeout_s=FOREVER, timed_out=None)
        if not handed:
            return False
        self._take_over(*handed[0])
        return True

    def _take_over(self, env: Envelope, h: Handover) -> None:
        """Take stage `h.stage` over: build it, restore the state handed over (sealed to us;
        its digests recomputed here, so our `restored` proves what we hold), and take its place.
        Raises ClicooperError when the state cannot be opened or does not fit the stage."""
        t0 = time.perf_counter()
        try:
            raw = self.ident.unseal(h.sealed)
            tensors = st_load(raw)
        except (ClicooperError, SafetensorError) as exc:
            raise ClicooperError(f"the state of stage {h.stage} handed over to us cannot be "
                                 f"opened: {exc}") from None
        self.stages = list(self.roster.stages)
        self.stages[h.stage - 1] = h.by
        self._build()
        self.store.save_roster(self.roster_bytes)
        snapshot.restore(self.seg, tensors)
        taken = snapshot.Taken(h.step, snapshot.weights_digest(self.segment),
                               snapshot.canonical_digest(tensors, h.step), tensors)
        self.store.keep(taken)  # ours from now on: a rollback or a restart finds it
        self.trained = h.step - 1
        self.meter.steps = h.step  # the steps before were the gone trainer's, as counted
        if self.marker is not None:
            self.marker.resume_handover(h.round, h.prev_claim)
        roster = self.roster
        self.bus.watch({self.kid[n]: n for n in {roster.owner.name, self.prev, self.next} if n})
        self._routes()
        self.log.warning("took over", stage=h.stage, replaced=h.replaced, step=h.step,
                         round=h.round, ms=round((time.perf_counter() - t0) * 1000, 1))
        print(f"{self.name}: took over stage {h.stage} from {h.replaced} at step {h.step}",
              flush=True)

    def _on_handover(self, env: Envelope) -> None:
        """Another trainer's stage went to a standby: route to it in that trainer's place,
        watch it if it is our neighbour, and commit the round again (it starts again)."""
        h = Handover.parse(env.document(), sender=self.roster.owner.name)
        if h.replaced == self.name:
            raise Replaced(f"the owner handed our stage {h.stage} over to {h.by} from step "
                           f"{h.step} while we were silent past [bus] rejoin_timeout_s; the run "
                           f"goes on without us")
        if not 1 <= h.stage <= len(self.stages) or self.stages[h.stage - 1] != h.replaced:
            raise ClicooperError(f"the owner handed stage {h.stage} of {h.replaced} over, but "
                                 f"stage {h.stage} is {self.stages[h.stage - 1:h.stage]}")
        order = list(self.stages)
        order[h.stage - 1] = h.by
        self._restage(order)
        if self.marker is not None:
            self.marker.void_round(h.round)
        self.log.warning("stage handed over", stage=h.stage, replaced=h.replaced, by=h.by,
                         step=h.step)
        print(f"{self.name}: {h.by} took stage {h.stage} over from {h.replaced}", flush=True)

    def _restage(self, order: list[str]) -> None:
        """The stage order from now on (a handover, or the owner's `rollback` telling a
        restarted trainer the handovers it missed): our neighbours, whom we watch, and who may
        send us what. Raises Replaced when we are no longer in it, ClicooperError when it
        names someone the roster lists as neither trainer nor standby."""
        roster = self.roster
        allowed = set(roster.stages) | set(roster.standby)
        if len(order) != len(roster.stages) or not set(order) <= allowed:
            raise ClicooperError(f"the owner's stage order {order} is not one of the roster's "
                                 f"{len(roster.stages)} stages held by its trainers and standbys")
        if self.name not in order:
            raise Replaced(f"the owner's stage order {order} no longer holds us: our stage went "
                           f"to a standby while we were gone; the run goes on without us")
        self.stages = order
        self._place(roster)
        self.bus.watch({self.kid[n]: n for n in {roster.owner.name, self.prev, self.next} if n})
        self._routes()

    def _send_state(self, snap: snapshot.Taken) -> None:
        """With standbys in the roster, our whole state at a round boundary, sealed to the
        owner (after its commitment), for a standby to take over if we go for good."""
        raw = st_save(snap.tensors)
        sealed = self.roster.owner.identity.seal(raw)
        cap = KINDS["stage_state"].max_body or DEFAULT_LIMITS.max_body
        if len(sealed) + 64 > cap:
            self.log.warning("stage state too large to hand over", bytes=len(sealed), cap=cap)
            return
        self.bus.send_doc("stage_state", self.roster.owner.name,
                          StageState(snap.step, sealed).to_doc(), step=snap.step)
