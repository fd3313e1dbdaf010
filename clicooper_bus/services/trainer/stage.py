"""A trainer's stage: joins on the owner's signed roster and serves it.

It trusts only the owner key it was given until the owner's signed roster names it, builds its
segment from the roster's plan (checking the model digest), then serves: activations forward,
gradients back, evaluation batches, and at the end its weights, sealed so that only the owner
can read them. Every message goes through one receive loop (`Dispatcher`) and its handler
table (`_routes`): messages from anyone but its neighbours in the roster's stage order are
refused.

Snapshots, restarts and rollbacks (issue 17) are `restart.Restarts`; the watermark chain's
commitments and claims are `marks.Marks`; how its part ends (the owner's `end`, a proof that the
owner equivocated, a refusal, the sealed weights) is `ending.Ending`; all are parts of this
class.
"""

from __future__ import annotations

import sys
from collections import deque

import torch

from clicooper_bus.config import MAX_IN_FLIGHT
from clicooper_bus.errors import ConfigError, PoisonedInput, RosterError
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
from clicooper_bus.net.bus import Bus, BusError
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.liveness import PeersGone
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope
from clicooper_bus.plan import Plan
from clicooper_bus.protocol import (
    Hello,
    Metrics,
)
from clicooper_bus.protocol.recovery import Restored
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
from clicooper_bus.services.trainer.ending import Ending
from clicooper_bus.services.trainer.marks import Marks
from clicooper_bus.services.trainer.restart import Restarts
from clicooper_bus.services.trainer.standby import Replaced, Standby
from clicooper_bus.services.usage import CpuMeter

FOREVER = float("inf")


class Trainer(Restarts, Marks, Standby, Ending):
    store: snapshot.Store | None = None  # our snapshots, once the roster is known (None: none)
    marker = None  # our side of the watermark chain, once we hold a stage (None: marks off)
    _stages: list[str] | None = None

    @property
    def stages(self) -> list[str]:
        """The roster's stage order, as handovers amend it (`standby.Standby`)."""
        if self._stages is None:
            self._stages = list(self.roster.stages)
        return self._stages

    @stages.setter
    def stages(self, names: list[str]) -> None:
        self._stages = names
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
        self.restored_seen: dict[str, Restored] = {}  # key id -> its last `restored`
        self.dropped = 0  # stale messages dropped behind a fence

    def run(self) -> int:
        bus, topics = self.bus, self.bus.topics
        for kind in ("roster", "end", "ack", "checkpoint", "beat", "round", "wm_commit",
                     "rollback", "restored", "handover", "equivocation"):
            bus.subscribe(topics.kind(kind))
        for kind in ("fwd", "bwd", "labels", "eval_fwd", "tip"):
            bus.subscribe(topics.to(kind, self.name))
        bus.announce()
        restarted = self.snapshots.roster.exists() and bool(self.snapshots.steps())
        bus.keep_sent_in(self.snapshots.outbox, restarted=restarted)
        try:
            if restarted:
                self._rejoin()
            else:
                self._join()
                if self.name in self.roster.standby and not self._stand_by():
                    # a standby the run never needed
                    return self._leave(EXIT_STOPPED if self.stopped else EXIT_OK)
            try:
                self._serve()
            except PoisonedInput as exc:
                return self._refuse(exc)
            except Replaced as exc:  # nothing more of ours may reach the run: leave at once
                self.log.warning("replaced", error=str(exc))
                self.bus.forget_sent()  # our stage is the standby's now: nothing to rejoin
                print(f"{self.name}: {exc}", file=sys.stderr, flush=True)
                return EXIT_STOPPED
            if self.stopped:
                return self._leave(EXIT_STOPPED)
            return self._finish()
        finally:
            bus.close()

    # --- joining -------------------------------------------------------------------------------

    def _join(self) -> None:
        """Wait for a roster signed by the owner that names us, build our stage, say hello (a
        standby builds nothing: `_stand_by`)."""
        self.loop.route("roster", {self.owner_key.key_id}, self._on_roster)
        timeout = self.cfg.bus.join_timeout_s
        self.loop.until(lambda: self.roster is not None, timeout_s=timeout, timed_out=lambda: (
            f"no roster naming '{self.name}' from the owner within {timeout:.0f} s"))
        if self.name in self.roster.standby:
            return
        self._build()
        self.store.save_roster(self.roster_bytes)
        roster, plan = self.roster, self.plan
        self.bus.start_beating()
        self.bus.watch({self.kid[n]: n for n in {roster.owner.name, self.prev, self.next} if n})
        self._routes()
        self.bus.send_doc("hello", "all", Hello(True, self.index + 1, roster.meta["model_spec"],
                                                plan.in_flight, torch.get_num_threads()).to_doc())
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
        self.seg = SegmentTrainer(self.segment, lr=plan.lr, seed=(plan.seed, self.index + 1))
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
        per = self.per
        self.store = snapshot.Store(self.snapshots, {
            "run_id": self.cfg.run.id, "stage": str(self.index + 1), "name": self.name,
            "nonce": roster.nonce.hex()}, boundary=lambda step: bool(per) and step % per == 0)

    def _on_roster(self, env: Envelope) -> None:
        if self.roster is not None:
            return
        roster = open_roster(env, self.owner_key, self.log)
        if roster is None:
            return
        if self.name not in roster.stages and self.name not in roster.standby:
            self.log.warning("roster does not list us", stages=list(roster.stages))
            return
        self.roster, self.roster_bytes = roster, bytes(env.body)

    def _place(self, roster: Roster) -> None:
        """Our neighbours in the stage order (`stages`: the roster's, as handovers amended
        it). With an owner tail (U-shaped split) the final stage sends its output to the owner,
        which holds the last layer and the loss: no stage ever gets labels."""
        names = self.stages
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
        route("restored", {k[n] for n in self.stages if n != self.name},
              self._on_restored)
        route("handover", {owner}, self._on_handover)
        self._mark_routes()
        if self.notary_kid is not None:
            route("tip", {self.notary_kid}, self._on_tip)
            route("equivocation", {self.notary_kid}, self._on_equivocation)

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
        expected = max([self.trained, *self.seg.pending, *(q.header.step for q, _ in
                                                            self.queued)]) + 1
        if h.step != expected:  # a step again would train twice; a skipped one is a hole
            raise BusError(f"{self.prev} sent activations for step {h.step}, where step "
                           f"{expected} comes next")
        # checked now (refused at once, not when its turn comes), rows exact by the plan
        want = self._train_rows(self.expect_in, env, self.prev)
        self.queued.append((env, received(env, want, self.prev)))
        self._advance()

    def _on_labels(self, env: Envelope) -> None:
        if self._fenced(env):
            return
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
        # the logits first: the owner reports only metrics it recomputed from them (issue 19)
        self.bus.send_array("logits", self.roster.owner.name, r.logits, step=step,
                            batch=h.batch, epoch=h.epoch)
        self.bus.send_doc("metrics", self.roster.owner.name, Metrics(r.loss, r.correct).to_doc(),
                          step=step, batch=h.batch, epoch=h.epoch)
        self._after_update(step)
