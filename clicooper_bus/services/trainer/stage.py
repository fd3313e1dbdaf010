"""A trainer's stage: joins on the owner's signed roster and serves it.

It trusts only the owner key it was given until the owner's signed roster names it, builds its
segment from the roster's plan (checking the model digest), then serves: activations forward,
gradients back, evaluation batches, and at the end its weights, sealed so that only the owner
can read them. Every message goes through one receive loop (`Dispatcher`) and its handler
table (`_routes`): messages from anyone but its neighbours in the roster's stage order are
refused.

Snapshots and restarts (issue 17): every `[run] snapshot_every` steps and at each epoch boundary
the stage is snapshotted (`snapshot.Store`: weights, Adam's state, RNG, step) to
`<run>/snapshots/<name>/` and committed in a signed `snapshot` message. A process started again
with the same name, key and config finds its snapshots and the roster it joined with there
(`_rejoin`): it continues its signed chain from where the notary's log has it (the notary's
`tip`), restores its newest snapshot and says `rejoin`; the owner rolls everyone back
(`rollback`) to a step every stage has a committed snapshot of, each trainer restores it and
says `restored`, and the owner trains from there again.
"""

from __future__ import annotations

import sys
import time
from collections import deque

import torch
from safetensors.torch import save as st_save

from clicooper_bus.config import MAX_IN_FLIGHT
from clicooper_bus.errors import ClicooperError, ConfigError, PoisonedInput, RosterError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.data import batch_rows, batches
from clicooper_bus.ml.models import build_segment, check_stage_memory, plan_spec
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.tensors import (
    Expected,
    check_result,
    param_grads,
    received,
    state_tensors,
)
from clicooper_bus.ml.watermark.marker import Marker
from clicooper_bus.net.bus import Bus, BusError, PeersGone
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope
from clicooper_bus.plan import Plan
from clicooper_bus.protocol import (
    ChainTip,
    CheckpointMessage,
    End,
    Hello,
    Metrics,
    Rejoin,
    Restored,
    Rollback,
    Round,
    Segment,
    Snapshot,
)
from clicooper_bus.services.common import (
    EXIT_OK,
    EXIT_STOPPED,
    identity,
    open_bus,
    open_roster,
    public,
)
from clicooper_bus.services.dispatch import Dispatcher
from clicooper_bus.services.trainer import snapshot
from clicooper_bus.services.usage import CpuMeter
from clicooper_bus.tlog.checkpoint import open_checkpoint
from clicooper_bus.tlog.log import default_origin

FOREVER = float("inf")


class Trainer:
    store: snapshot.Store | None = None  # our snapshots, once the roster is known (None: none)
    fence: set[str] | frozenset[str] = frozenset()  # neighbours whose data is stale (a rollback)

    def __init__(self, cfg, name: str, log, owner_key: PublicIdentity | None = None):
        self.cfg, self.name, self.log = cfg, name, log
        self.ident = identity(cfg, name)
        self.owner_key = owner_key or public(cfg, cfg.participants.owner)
        verifier = Verifier({self.owner_key.key_id: self.owner_key}, cfg.run.id, partial=True,
                            roster_first=True)
        self.bus: Bus = open_bus(cfg, self.ident, verifier)
        self.loop = Dispatcher(self.bus, {self.owner_key.key_id: self.owner_key.name}, log)
        self.roster: Roster | None = None
        self.labels: dict[int, torch.Tensor] = {}
        self.waiting_logits: set[int] = set()
        # activations waiting for the previous step, each with its checked tensor
        self.queued: deque[tuple[Envelope, torch.Tensor]] = deque()
        self.given: dict[int, torch.Tensor] = {}  # each pending step's activations (blame)
        self.trained = -1  # the last training step this stage forwarded
        self.eval_seen: set[tuple[int, int]] = set()  # (epoch, batch) evaluated
        self.ended = False  # the owner ended training
        self.stopped = False  # ... early: the run stops on a refusal, nothing is delivered
        self.final_seen = False  # the notary's final checkpoint arrived
        self.meter = CpuMeter()  # this process's CPU over its training steps (`usage`)
        self.snapshots = RunLayout(cfg.run_dir).snapshots(name)
        self.restored_seen: dict[str, int] = {}  # key id -> the step it said it restored
        self.dropped = 0  # stale messages dropped behind a fence

    def run(self) -> int:
        bus, topics = self.bus, self.bus.topics
        for kind in ("roster", "end", "ack", "checkpoint", "beat", "round", "wm_commit",
                     "rollback", "restored"):
            bus.subscribe(topics.kind(kind))
        for kind in ("fwd", "bwd", "labels", "eval_fwd", "tip"):
            bus.subscribe(topics.to(kind, self.name))
        bus.announce()
        try:
            if self.snapshots.roster.exists() and self.snapshots.steps():
                self._rejoin()
            else:
                self._join()
            try:
                self._serve()
            except PoisonedInput as exc:
                return self._refuse(exc)
            if self.stopped:
                return self._leave(EXIT_STOPPED)
            return self._finish()
        finally:
            bus.close()

    # --- joining -------------------------------------------------------------------------------

    def _join(self) -> None:
        """Wait for a roster signed by the owner that names us, build our stage, say hello."""
        self.loop.route("roster", {self.owner_key.key_id}, self._on_roster)
        timeout = self.cfg.bus.join_timeout_s
        self.loop.until(lambda: self.roster is not None, timeout_s=timeout, timed_out=lambda: (
            f"no roster naming '{self.name}' from the owner within {timeout:.0f} s"))
        self._build()
        self.store.save_roster(self.roster_bytes)
        roster, plan = self.roster, self.plan
        self.bus.start_beating()
        self.bus.watch({self.kid[n]: n for n in {roster.owner.name, self.prev, self.next} if n})
        self._routes()
        self.bus.send_doc("hello", "all", Hello(True, self.index + 1, roster.meta["model_spec"],
                                                plan.in_flight).to_doc())
        self.log.info("joined", stage=self.index + 1, prev=self.prev, next=self.next)
        self._snapshot(0)  # the state training starts from, committed like every other

    def _build(self) -> None:
        """Check the roster's plan, build our stage from it, set up its receive checks."""
        roster = self.roster
        self.bus.bind(roster)
        self.plan = plan = Plan.from_meta(roster.meta["plan"])  # checked: RosterError
        plan.check_stages(len(roster.stages))
        if not 1 <= plan.in_flight <= MAX_IN_FLIGHT:
            raise RosterError(f"the roster's plan asks for {plan.in_flight} batches in flight; "
                              f"a trainer holds 1 to {MAX_IN_FLIGHT}")
        if not plan.layers:
            raise RosterError(f"the roster's plan names model {plan.model!r} but carries no "
                              f"layers (an owner older than model specs as data): a trainer "
                              f"builds only from the plan's layers; update the owner")
        try:
            spec = plan_spec(plan)  # from the plan's layers alone
        except ConfigError as exc:
            raise RosterError(f"the roster's plan describes a model that does not build: "
                              f"{exc}") from None
        if spec.digest(plan.segment_cuts) != roster.meta.get("model_spec"):
            raise RosterError("the roster's model digest does not match its plan")
        self._place(roster)
        # what our stage needs, from the shapes alone, before anything is allocated
        check_stage_memory(spec, plan, self.index + 1, self.cfg.run.trainer_memory_mb)
        self.segment = build_segment(spec, plan.segment_cuts, plan.seed, self.index + 1)
        self.seg = SegmentTrainer(self.segment, lr=plan.lr)
        # this stage's input shape: the earlier stages' output, from the spec's resolution
        in_shape = tuple(spec.shapes[plan.cuts[self.index]])
        self.seg.warm_up((plan.batch_size, *in_shape))
        # what the signed plan says this stage receives (the receive check, `_input`)
        self.expect_in = Expected("float32", in_shape, max_rows=plan.batch_size)
        self.expect_labels = Expected("int64", (), max_rows=plan.batch_size)
        self.marker = Marker.from_roster(roster, self.roster_bytes, self.index + 1,
                                         self.ident.public.public_key, self.segment)
        if self.marker is not None:
            self.seg.regularizer = self.marker.regularizer
        self.per = batches(plan.train_size, plan.batch_size) if plan.train_size else 0
        self.store = snapshot.Store(self.snapshots, {
            "run_id": self.cfg.run.id, "stage": str(self.index + 1), "name": self.name,
            "nonce": roster.nonce.hex()})

    # --- snapshots, restarts and rollbacks -----------------------------------------------------

    def _snapshot(self, step: int) -> None:
        """Snapshot the stage at `step` (the state after steps 0 .. step - 1) to disk, then
        commit to it in a signed `snapshot` message (the log holds the commitment; a process
        killed between the two resumes from a file whose commitment its `rejoin` carries)."""
        t0 = time.perf_counter()
        snap = snapshot.take(self.seg, step)
        size = self.store.keep(snap)
        self.bus.send_doc("snapshot", self.roster.owner.name,
                          Snapshot(step, snap.weights, snap.state).to_doc(), step=step)
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
        we joined with (signed by the owner, checked again); our signed chain goes on from the
        last message of ours the notary logged (its `tip`: which of a dead process's last
        messages reached the log only the notary knows, so nothing we could have saved says
        it); then we restore our newest snapshot and tell the owner which ones we hold."""
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
        if self.marker is not None:
            raise ClicooperError("rejoining a run with watermarks on is not built (the round's "
                                 "marker state is not in the snapshot); the run cannot resume "
                                 "this stage")
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
        wait = self.cfg.bus.join_timeout_s + self.cfg.bus.rejoin_timeout_s
        self.loop.until(lambda: bool(tips), timeout_s=wait, timed_out=lambda: (
            f"no chain tip from the notary within {wait:.0f} s: is run '{self.cfg.run.id}' "
            f"still going? (to join a new run instead, remove {self.snapshots.root})"))
        self.bus.sender.seq, self.bus.sender.prev = tips[-1].seq, tips[-1].prev
        snaps = [self.store.get(s) for s in steps]
        snapshot.restore(self.seg, snaps[-1].tensors)
        self.trained = snaps[-1].step - 1
        for snap in snaps:
            self.store.keep(snap, write=False)
        self.bus.send_doc("rejoin", roster.owner.name, Rejoin(
            self.index + 1, steps, [s.state for s in snaps]).to_doc())
        self.bus.start_beating()
        self.bus.watch({self.kid[n]: n for n in {roster.owner.name, self.prev, self.next} if n})
        self._routes()
        self.log.info("rejoined", stage=self.index + 1, seq=tips[-1].seq, steps=steps)
        print(f"{self.name}: rejoined at seq {tips[-1].seq + 1} with snapshots of steps "
              f"{steps}; waiting for the owner's rollback", flush=True)

    def _on_rollback(self, env: Envelope) -> None:
        """Restore our snapshot of the rollback's step, drop everything in progress, and say
        `restored`. Our neighbours' data sent before they restored is stale: dropped until
        their `restored` (each publisher's messages arrive in order)."""
        rb = Rollback.parse(env.document(), sender=self.roster.owner.name)
        snap = self.store.get(rb.step)
        if snap is None:  # refused like a poisoned input: the owner stops the run, named
            raise PoisonedInput(sender=self.roster.owner.name, kind="rollback", step=rb.step,
                                problem=f"a rollback to step {rb.step}, of which {self.name} "
                                        f"has no snapshot (in memory: {sorted(self.store.memory)}"
                                        f", on disk: {self.snapshots.steps()})")
        self.seg = SegmentTrainer(self.segment, lr=self.plan.lr)  # nothing pending
        if self.marker is not None:
            self.seg.regularizer = self.marker.regularizer
        snapshot.restore(self.seg, snap.tensors)
        self.queued.clear()
        self.given.clear()
        self.labels.clear()
        self.waiting_logits.clear()
        self.trained = rb.step - 1
        per = self.per or 1
        self.eval_seen = {(e, b) for e, b in self.eval_seen if (e + 1) * per < rb.step}
        self.meter.steps = rb.step  # replayed steps are counted once, as the owner counts them
        stages = set(self.roster.stages)
        self.fence = {self.kid[n] for n in (self.prev, self.next) if n in stages
                      and self.restored_seen.get(self.kid[n]) != rb.step}
        self.bus.send_doc("restored", "all", Restored(rb.step, snap.state).to_doc(), step=rb.step)
        self.log.warning("rolled back", step=rb.step, rejoined=rb.rejoined,
                         fenced=sorted(self.loop.names.get(k, k) for k in self.fence))
        print(f"{self.name}: rolled back to step {rb.step} ({rb.rejoined} rejoined)", flush=True)

    def _on_restored(self, env: Envelope) -> None:
        """A neighbour restored: what it sends from now on is of the rolled-back run."""
        sender = env.header.sender
        done = Restored.parse(env.document(), sender=self.loop.names.get(sender))
        self.restored_seen[sender] = done.step
        self.fence = set(self.fence) - {sender}

    def _fenced(self, env: Envelope) -> bool:
        """Whether `env` is stale data from a neighbour that has not restored yet."""
        if env.header.sender in self.fence:
            self.dropped += 1
            self.log.info("stale message dropped", kind=env.header.kind, step=env.header.step)
            return True
        return False

    def _on_roster(self, env: Envelope) -> None:
        if self.roster is not None:
            return
        roster = open_roster(env, self.owner_key, self.log)
        if roster is None:
            return
        if self.name not in roster.stages:
            self.log.warning("roster does not list us", stages=list(roster.stages))
            return
        self.roster, self.roster_bytes = roster, bytes(env.body)

    def _place(self, roster: Roster) -> None:
        """Our neighbours in the stage order. With an owner tail (U-shaped split) the final
        stage sends its output to the owner, which holds the last layer and the loss: no stage
        ever gets labels."""
        names = roster.stages
        self.index = names.index(self.name)
        final = self.index == len(names) - 1
        self.last = final and not self.plan.tail
        self.prev = roster.owner.name if self.index == 0 else names[self.index - 1]
        self.next = roster.owner.name if final and self.plan.tail else \
            None if final else names[self.index + 1]
        self.kid = {m.name: m.key_id for m in roster.members}
        self.notary_kid = roster.notary.key_id if roster.notary else None
        self.loop.names = {v: k for k, v in self.kid.items()}

    # --- serving -------------------------------------------------------------------------------

    def _routes(self) -> None:
        """The handler table: who may send this stage each kind, and what it does with it."""
        k, owner = self.kid, self.kid[self.roster.owner.name]
        route = self.loop.route
        route("fwd", {k[self.prev]}, self._on_fwd)
        route("eval_fwd", {k[self.prev]}, self._on_eval)
        if self.next:
            route("bwd", {k[self.next]}, self._on_bwd)
        if self.last:
            route("labels", {owner}, self._on_labels)
        route("end", {owner}, self._on_end)
        route("rollback", {owner}, self._on_rollback)
        route("restored", {k[n] for n in self.roster.stages if n != self.name},
              self._on_restored)
        if self.notary_kid is not None:
            route("checkpoint", {self.notary_kid}, self._on_checkpoint)
        if self.marker is not None:
            route("round", {owner}, self._on_round)
            # every stage's commitments pass by; only the previous stage's link to ours
            route("wm_commit", {k[n] for n in self.roster.stages}, self._on_commit)

    def _serve(self) -> None:
        """Until the owner ends training. A neighbour gone past the rejoin timeout is dropped
        from the watch: the owner stops the run cleanly (its `end` with `stopped`). Raises
        PeersGone if the owner itself is gone (nobody is left to stop the run)."""
        while True:
            try:
                self.loop.until(lambda: self.ended, timeout_s=FOREVER, timed_out=None)
                return
            except PeersGone as exc:
                if self.roster.owner.name in exc.names:
                    raise
                self.log.warning("neighbour gone; waiting for the owner to stop the run",
                                 gone=exc.names)
                print(f"{self.name}: {', '.join(exc.names)} gone; waiting for the owner to stop "
                      f"the run", flush=True)
                self.bus.unwatch(exc.names)

    def _on_fwd(self, env: Envelope) -> None:
        if self._fenced(env):
            return
        h = env.header
        held = len(self.queued) + len(self.seg.pending)  # the owner has them all out
        if held >= self.plan.in_flight or h.step in self.seg.pending or \
                any(q.header.step == h.step for q, _ in self.queued):
            raise BusError(f"{self.prev} sent activations for step {h.step} with {held} steps "
                           f"held here (the roster allows {self.plan.in_flight} in flight)")
        # checked now (refused at once, not when its turn comes), rows exact by the plan
        want = self._train_rows(self.expect_in, env, self.prev)
        self.queued.append((env, received(env, want, self.prev)))
        self._advance()

    def _on_labels(self, env: Envelope) -> None:
        h = env.header
        if len(self.labels) >= self.plan.in_flight:
            raise BusError(f"owner sent labels for step {h.step} with {len(self.labels)} steps "
                           f"of labels waiting")
        owner = self.roster.owner.name
        self.labels[h.step] = received(env, self._train_rows(self.expect_labels, env, owner),
                                       owner)
        self._maybe_loss(h.step, h)
        self._advance()  # a batch may have been queued behind this step's loss

    def _on_bwd(self, env: Envelope) -> None:
        if self._fenced(env):
            return
        h = env.header
        if h.step not in self.seg.pending:
            raise BusError(f"{self.next} sent gradients {list(h.shape or ())} for step "
                           f"{h.step}, which has no matching forward here")
        rows, *sample = self.seg.output_shape(h.step)
        grad = received(env, Expected("float32", tuple(sample), rows=rows), self.next)
        self.given.pop(h.step, None)
        grad_in = self.seg.backward(grad, h.step, update=False)
        blame = self._blame(self.next, "bwd", h.step, "gradients")
        # nothing non-finite is sent on: a finite gradient that made ours non-finite is refused
        check_result([("gradient for its predecessor", grad_in),
                      *param_grads(self.seg.module)], grad, **blame)
        self.bus.send_array("bwd", self.prev, grad_in, step=h.step, batch=h.batch,
                            epoch=h.epoch)
        self.seg.update()  # off the critical path: the gradient is already on its way
        check_result(state_tensors(self.seg.module, self.seg.optimizer), grad, **blame)
        self.meter.step_done()
        self._after_update(h.step)
        self._advance()

    def _blame(self, sender: str, kind: str, step: int | None, given_as: str) -> dict:
        """`check_result`'s arguments for what this stage computed from `sender`'s `kind` of
        `step` (`given_as` in words: activations, gradients)."""
        return {"sender": sender, "kind": kind, "step": step, "given_as": given_as,
                "made": f"{self.name}'s {{}}"}

    def _on_eval(self, env: Envelope) -> None:
        if self._fenced(env):
            return
        h = env.header
        x = received(env, self._eval_rows(env), self.prev)
        out = self.seg.evaluate(x)
        check_result([("evaluation output", out)], x,
                     **self._blame(self.prev, "eval_fwd", h.step, "activations"))
        owner = self.roster.owner.name
        self.bus.send_array("eval_out" if self.last else "eval_fwd",
                            owner if self.last else self.next, out, step=h.step, batch=h.batch,
                            epoch=h.epoch)

    def _on_end(self, env: Envelope) -> None:
        end = End.parse(env.document(), sender=self.roster.owner.name)
        self.ended, self.stopped = True, end.stopped
        if end.stopped:
            self.log.warning("the owner stopped the run", reason=end.reason)

    def _advance(self) -> None:
        """Forward the next queued batch once the previous step's backward is done: a stage
        trains strictly in step order whatever the owner has in flight, so pipelining changes
        what a stage computes only through the (lagging) head's activations it is sent."""
        while self.queued and not self.seg.pending:
            env, x = self.queued.popleft()
            h = env.header
            self.meter.step_started()
            out = self.seg.forward(x, h.step)
            self.trained, self.given[h.step] = h.step, x
            check_result([("output", out)], x,
                         **self._blame(self.prev, "fwd", h.step, "activations"))
            if self.last:
                self.waiting_logits.add(h.step)
                self._maybe_loss(h.step, h)
            else:
                self.bus.send_array("fwd", self.next, out, step=h.step, batch=h.batch,
                                    epoch=h.epoch)

    def _train_rows(self, base: Expected, env: Envelope, sender: str) -> Expected:
        """`base` with the exact rows of the envelope's training step by the signed plan: every
        epoch is `batches(train_size, batch_size)` steps, the last one short (the owner's
        `batch_order`); `base` (1..batch_size rows) for a plan without train_size. A step
        the plan does not have (negative, at or past max_steps) is refused naming `sender`."""
        plan, step = self.plan, env.header.step
        if not plan.train_size:
            return base
        if step is None or step < 0 or (plan.max_steps and step >= plan.max_steps):
            raise PoisonedInput(sender=sender, kind=env.header.kind, step=step, problem=(
                f"step {step} is not a training step of the signed plan (max_steps "
                f"{plan.max_steps or 'none'})"))
        per = batches(plan.train_size, plan.batch_size)
        return base.exactly(batch_rows(plan.train_size, plan.batch_size, step % per))

    def _eval_rows(self, env: Envelope) -> Expected:
        """What an evaluation batch from the previous stage must be, or PoisonedInput naming
        it: an evaluation comes only once an epoch's training is over, with nothing in
        progress here (the owner evaluates after every step of the epoch is done), each of the
        test set's batches once per evaluation, with its exact rows by the plan's test_size.
        Without this an extra batch passes down the chain and the owner, which did not ask
        for it, blames the last stage."""
        plan, h = self.plan, env.header
        step, epoch = h.step, h.epoch

        def refuse(problem: str) -> PoisonedInput:
            return PoisonedInput(sender=self.prev, kind=h.kind, step=step, problem=problem)

        if step is None or epoch is None or step < 0 or epoch < 0:
            raise refuse(f"an evaluation batch needs a step and an epoch, got {step}, {epoch}")
        rows = None
        if plan.test_size:
            try:
                rows = batch_rows(plan.test_size, plan.batch_size, step)
            except ValueError as exc:
                raise refuse(f"evaluation {exc} (the signed plan's test set)") from None
        if (epoch, step) in self.eval_seen:
            raise refuse(f"evaluation batch {step} of epoch {epoch} a second time")
        if plan.train_size:
            per = batches(plan.train_size, plan.batch_size)
            end = (epoch + 1) * per
            end = min(end, plan.max_steps) if plan.max_steps else end
            busy = len(self.queued) + len(self.seg.pending)
            if busy or self.trained != end - 1:
                raise refuse(f"evaluation of epoch {epoch} outside its window: the epoch's "
                             f"training ends with step {end - 1}, this stage last trained step "
                             f"{self.trained} and has {busy} step(s) in progress")
        self.eval_seen.add((epoch, step))
        return self.expect_in.exactly(rows)

    def _maybe_loss(self, step: int, h) -> None:
        if step not in self.waiting_logits or step not in self.labels:
            return
        self.waiting_logits.discard(step)
        labels = self.labels.pop(step).long()
        n, classes = self.seg.output_shape(step)
        # with the plan's train_size both were received with the step's exact rows, so they
        # agree; a plan without it leaves a row mismatch to the labels (the legacy check)
        if labels.shape[0] != n or labels.min() < 0 or labels.max() >= classes:
            raise PoisonedInput(sender=self.roster.owner.name, kind="labels", step=step,
                                problem=f"{labels.shape[0]} labels in {int(labels.min())}.."
                                        f"{int(labels.max())} do not fit logits [{n}, {classes}]")
        x = self.given.pop(step)
        r = self.seg.loss_backward(labels, step, update=False)
        # labels within the classes cannot make a loss non-finite: the activations did
        blame = self._blame(self.prev, "fwd", step, "activations")
        check_result([("loss", r.loss), ("gradient for its predecessor", r.grad_in),
                      *param_grads(self.seg.module)], x, **blame)
        self.bus.send_array("bwd", self.prev, r.grad_in, step=step, batch=h.batch, epoch=h.epoch)
        self.seg.update()
        check_result(state_tensors(self.seg.module, self.seg.optimizer), x, **blame)
        self.meter.step_done()
        self.bus.send_doc("metrics", self.roster.owner.name, Metrics(r.loss, r.correct).to_doc(),
                          step=step, batch=h.batch, epoch=h.epoch)
        self._after_update(step)

    # --- the watermark chain -------------------------------------------------------------------

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
        if self.marker is not None:
            self.marker.saw_checkpoint(cp.size, cp.root)
            self._commit()
        self.final_seen = self.final_seen or msg.final

    def _on_commit(self, env: Envelope) -> None:
        if self.index == 0 or env.header.sender != self.kid[self.prev]:
            return
        try:
            self.marker.saw_previous_commit(env.document())
        except ValueError as exc:
            raise ClicooperError(f"{self.prev} sent a malformed wm_commit message: {exc}") from None
        self._commit()

    def _on_round(self, env: Envelope) -> None:
        """Commit before a round, claim after it."""
        r = Round.parse(env.document(), sender=self.roster.owner.name)
        if r.phase == "start":
            self.marker.start(r.round)
        else:
            claim = self.marker.claim(r.round)
            sent = self.bus.send_doc("wm_claim", "all", claim.to_doc())
            self.marker.claimed(sent.leaf)
            self.log.info("watermark claimed", round=claim.round, bit_errors=claim.bit_errors,
                          bits=claim.nbits)
        self._commit()

    def _commit(self) -> None:
        """Publish our commitment as soon as everything it links to is known."""
        commit = self.marker.ready_commit()
        if commit is not None:
            self.bus.send_doc("wm_commit", "all", commit.to_doc())
            self.log.info("watermark committed", round=commit.round)

    # --- the end -------------------------------------------------------------------------------

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
        self.loop.only("checkpoint")  # nothing else is served
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
