"""The owner's side of a standby's takeover (issue 17 item 2), as a part of `process.Owner`.

With standbys in the roster, each trainer sends the owner its whole stage state at every round
boundary, sealed to the owner (`stage_state`), after its `snapshot` commitment of that step;
the owner checks the state's digest against that commitment and keeps the two newest of each
trainer. When a trainer is gone past `rejoin_timeout_s` during training, instead of stopping the
run the owner hands its stage to the first standby still heard (`_hand_over`): it chooses the
newest round boundary it holds the gone trainer's state of, that every other stage committed,
it has its own head of, and no earlier than the end of the newest watermark round claimed;
says `handover` (signed, logged: the roster's amendment) with that state sealed to the
standby's key and the stage's last claim digest, takes the standby for the gone trainer in its
stage order and its routes, voids the round's watermark commitments (the round starts again:
every stage commits anew, the standby linking to the stage's last claim), and rolls everyone
back to that step (`_rollback_to`), the standby's `restored` checked against the gone trainer's
commitment. The handover goes into the provenance bundle; `model verify` names both trainers.
"""

from __future__ import annotations

from safetensors.torch import load as st_load

from clicooper_bus.protocol.recovery import Handover, StageState
from clicooper_bus.services.owner.rollback import RollbackRefused
from clicooper_bus.services.trainer.snapshot import canonical_digest

KEEP_STATES = 2  # round boundaries of each trainer's state the owner holds


class Handovers:
    """The standby takeover methods of `process.Owner` (a mixin)."""

    def _on_stage_state(self, env) -> None:
        """A trainer's sealed state at a round boundary: kept if it is what it committed (its
        `snapshot` of that step, which comes first); else dropped, logged (it matters only if
        that trainer goes for good)."""
        name = self.books.names[env.header.sender]
        msg = StageState.parse(env.document(), sender=name)
        if msg.step % self.training.per:  # a handover restarts a round: only its start will do
            self.log.warning("stage state refused", trainer=name, step=msg.step,
                             error="not at a round boundary")
            return
        committed = self.books.snapshots.get(name, {}).get(msg.step)
        if committed is None:  # checked before the costly unseal and parse
            self.log.warning("stage state refused", trainer=name, step=msg.step,
                             error="no commitment of that step")
            return
        try:
            raw = self.ident.unseal(msg.sealed)
            digest = canonical_digest(st_load(raw), msg.step)
        except Exception as exc:  # noqa: BLE001  (safetensors raises KeyError for some dtypes)
            self.log.warning("stage state refused", trainer=name, step=msg.step, error=str(exc))
            return
        if committed.state != digest:
            self.log.warning("stage state refused", trainer=name, step=msg.step,
                             error="not the state it committed for that step")
            return
        held = self.held_states.setdefault(name, {})
        held[msg.step] = raw
        for old in sorted(held)[:-KEEP_STATES]:
            del held[old]

    def _standby_for(self, gone: str, taken: set[str]) -> str | None:
        """The first standby of the roster not yet used and heard within `timeout_s`."""
        bus, roster = self.bus, self.setup.roster
        for name in roster.standby:
            seen = bus.last_seen.get(self.kid[name])
            if name not in self.used_standby | taken and seen is not None and \
                    bus.started <= seen and not bus.silent_peers([self.kid[name]]):
                return name
        return None

    def _can_hand_over(self, gone: list[str]) -> bool:
        """Whether every one of `gone` is a trainer a standby can replace (and no privacy
        filter: a replayed release would reuse its step's noise)."""
        if self.setup.defences.filter is not None or not set(gone) <= set(self.stages):
            return False
        taken: set[str] = set()
        for name in gone:
            standby = self._standby_for(name, taken)
            if standby is None or not self.held_states.get(name):
                return False
            taken.add(standby)
        return True

    def _take_over(self, stage: int, round_: int, step: int, replaced: str, standby: str,
                   env) -> None:
        """`standby` holds stage `stage` from `step` (of round `round_`) on, after our
        `handover` `env` (sent now, or replayed from the log by a resumed owner): the stage
        list, its commitment of the step (the replaced trainer's), the bundle's handovers, the
        round's commitments void (the round starts again: every stage commits anew) and the
        answers kept of the steps from `step` (`Books.compare`)."""
        books = self.books
        self.handovers.append([env.leaf, bytes(env.body)])
        self.stages[stage - 1] = standby  # books.stages is this list
        if step in books.snapshots.get(replaced, {}):
            books.snapshots[standby] = {step: books.snapshots[replaced][step]}
        self.used_standby.add(standby)
        for key in [key for key in books.commits if key[1] == round_]:
            del books.commits[key]
        # the round starts again with new watermark keys: the steps from `step` on are trained
        # under another regulariser, so their answers are not the first timeline's to compare
        books.received = {k: v for k, v in books.received.items() if k[2] < step}

    def _stages_changed(self) -> None:
        """The first and last stages, and who may send what, after a handover."""
        self.training.first, self.training.last = self.stages[0], self.stages[-1]
        self._routes()

    def _hand_over(self, gone: list[str]) -> tuple[int, int]:
        """Hand each trainer of `gone` over to a standby (see the module docstring). Returns
        (epoch, batch) to train from. Raises RollbackRefused (a clean stop, named) when no
        round boundary fits."""
        books, per = self.books, self.training.per
        states = {n: {k: v.state for k, v in books.snapshots.get(n, {}).items()}
                  for n in self.stages}
        floor = self._claimed_floor()
        owner_steps = set(self.training.snapshots.kept) | set(self.rounds_store.steps())
        held = set.intersection(*(set(self.held_states.get(n, {})) for n in gone))
        fits = [b for b in sorted(held, reverse=True) if b >= floor and b in owner_steps and
                all(b in states[n] for n in self.stages if n not in gone)]
        if not fits:
            raise RollbackRefused(gone[0], f"{', '.join(gone)} gone, but no round boundary the "
                                           f"owner holds their state of (steps {sorted(held)}) "
                                           f"fits every stage's commitments and the owner's "
                                           f"head at or after step {floor}")
        step = fits[0]
        rnd = step // per
        taken: set[str] = set()
        for name in gone:
            standby = self._standby_for(name, taken)
            taken.add(standby)
            k = self.stages.index(name) + 1
            claim = books.claim_digests.get((k, rnd - 1), b"") if rnd > 0 else b""
            sealed = self.setup.roster.by_name(standby).identity.seal(self.held_states[name][step])
            env = self.bus.send_doc("handover", "all", Handover(
                k, rnd, step, name, standby, sealed, claim).to_doc(), step=step)
            self._take_over(k, rnd, step, name, standby, env)
            states[standby] = {step: states[name][step]}
            self.log.warning("stage handed over", stage=k, replaced=name, by=standby, step=step,
                             round=rnd)
            print(f"owner: {name} gone: stage {k} handed over to {standby} from step {step}",
                  flush=True)
        self.bus.unwatch(gone)
        everyone = [*self.stages, self.cfg.participants.notary]
        self.bus.watch({self.kid[n]: n for n in everyone})
        self._stages_changed()
        self.loop.route("hello", {self.kid[n] for n in self.stages}, self._late_hello)
        if step not in self.training.snapshots.kept:
            saved = self.rounds_store.read(step)
            self.training.snapshots.kept[step] = (saved.head, saved.tail)
        return self._rollback_to(step, ", ".join(taken), states)
