"""A trainer process: trains one stage of the split model for the owner.

It trusts only the owner key it was given until the owner's signed roster names it, builds its
segment from the roster's plan (checking the model digest), then serves: activations forward,
gradients back, evaluation batches, and at the end its weights, sealed so that only the owner
can read them. Messages from anyone but its neighbours in the roster's stage order are refused.

    python -m clicooper_bus.services.trainer --config FILE --name trainer-1
    python -m clicooper_bus.services.trainer --name edge-7 --keys DIR --owner-key owner.pub \\
        --run-id demo --pub tcp://HOST:5555 --sub tcp://HOST:5556      (an edge device)
"""

from __future__ import annotations

import sys
import time
from collections import deque

import structlog
import torch
from safetensors.torch import save as st_save

from clicooper_bus.config import MAX_IN_FLIGHT, load_config
from clicooper_bus.errors import ClicooperError, RosterError
from clicooper_bus.ml.models import build_segments, plan_spec
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.tensors import tensor
from clicooper_bus.ml.watermark.marker import Marker
from clicooper_bus.net.bus import Bus, BusError
from clicooper_bus.net.identity import PublicIdentity, load_public
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope
from clicooper_bus.plan import Plan
from clicooper_bus.services.common import (
    EXIT_OK,
    base_parser,
    identity,
    open_bus,
    public,
    run_main,
    set_threads,
)
from clicooper_bus.tlog.checkpoint import open_checkpoint
from clicooper_bus.tlog.log import default_origin


class Trainer:
    def __init__(self, cfg, name: str, log, owner_key: PublicIdentity | None = None):
        self.cfg, self.name, self.log = cfg, name, log
        self.ident = identity(cfg, name)
        self.owner_key = owner_key or public(cfg, cfg.participants.owner)
        verifier = Verifier({self.owner_key.key_id: self.owner_key}, cfg.run.id, partial=True)
        self.bus: Bus = open_bus(cfg, self.ident, verifier)
        self.labels: dict[int, torch.Tensor] = {}
        self.waiting_logits: set[int] = set()
        self.queued: deque[Envelope] = deque()  # activations waiting for the previous step

    def run(self) -> int:
        bus, run = self.bus, self.cfg.run.id
        for kind in ("roster", "end", "ack", "checkpoint", "beat", "round", "wm_commit"):
            bus.subscribe(f"run/{run}/{kind}/")
        for kind in ("fwd", "bwd", "labels", "eval_fwd"):
            bus.subscribe(bus.topic(kind, self.name))
        bus.announce()
        try:
            self._join()
            self._serve()
            return self._finish()
        finally:
            bus.close()

    def _join(self) -> None:
        deadline = time.monotonic() + self.cfg.bus.join_timeout_s
        while True:
            env = self.bus.recv(1.0)
            if env is not None and env.header.kind == "roster":
                try:
                    roster = Roster.open(bytes(env.body), owner=self.owner_key)
                except RosterError as exc:
                    self.log.error("roster refused", error=str(exc))
                    continue
                if self.name not in roster.stages:
                    self.log.warning("roster does not list us", stages=list(roster.stages))
                    continue
                self._roster_bytes = bytes(env.body)
                break
            if time.monotonic() > deadline:
                raise BusError(f"no roster naming '{self.name}' from the owner within "
                               f"{self.cfg.bus.join_timeout_s:.0f} s")
        self.roster = roster
        self.bus.verifier.use_roster(roster)
        self.plan = plan = Plan.from_meta(roster.meta["plan"])
        if not 1 <= plan.in_flight <= MAX_IN_FLIGHT:
            raise RosterError(f"the roster's plan asks for {plan.in_flight} batches in flight; "
                              f"a trainer holds 1 to {MAX_IN_FLIGHT}")
        spec = plan_spec(plan)
        if spec.digest(plan.segment_cuts) != roster.meta.get("model_spec"):
            raise RosterError("the roster's model digest does not match its plan")
        self.index = roster.stages.index(self.name)
        names = roster.stages
        final = self.index == len(names) - 1
        # with an owner tail (U-shaped split) the final stage sends its output to the owner,
        # which holds the last layer and the loss: no stage ever gets labels
        self.last = final and not plan.tail
        self.prev = roster.owner.name if self.index == 0 else names[self.index - 1]
        self.next = roster.owner.name if final and plan.tail else \
            None if final else names[self.index + 1]
        self.segment = build_segments(spec, plan.segment_cuts, plan.seed)[self.index + 1]
        self.seg = SegmentTrainer(self.segment, lr=plan.lr)
        probe = torch.zeros((plan.batch_size, *plan.input_shape))
        with torch.no_grad():  # this stage's input shape: the earlier stages' output
            for seg in build_segments(spec, plan.segment_cuts, plan.seed)[:self.index + 1]:
                probe = seg(probe)
        self.seg.warm_up(tuple(probe.shape))
        self.kid = {m.name: m.key_id for m in roster.members}
        self.bus.start_beating()
        self.bus.watch({self.kid[n]: n for n in {roster.owner.name, self.prev, self.next} if n})
        self.notary_kid = roster.notary.key_id if roster.notary else None
        self.marker = Marker.from_roster(roster, bytes(self._roster_bytes), self.index + 1,
                                         self.ident.public.public_key, self.segment)
        if self.marker is not None:
            self.seg.regularizer = self.marker.regularizer
        self.bus.send_doc("hello", "all", {"ready": True, "stage": self.index + 1,
                                           "model_spec": roster.meta["model_spec"],
                                           "in_flight": plan.in_flight})
        self.log.info("joined", stage=self.index + 1, prev=self.prev, next=self.next)

    def _from(self, env: Envelope, *names: str | None) -> bool:
        ok = env.header.sender in {self.kid[n] for n in names if n}
        if not ok:
            self.log.warning("message from an unexpected sender refused", kind=env.header.kind,
                             sender=env.header.sender)
        return ok

    def _serve(self) -> None:
        bus, owner = self.bus, self.roster.owner.name
        while True:
            env = bus.recv(bus.timeout_s)
            if env is None:
                continue
            h, kind = env.header, env.header.kind
            if kind == "fwd" and self._from(env, self.prev):
                held = len(self.queued) + len(self.seg.pending)  # the owner has them all out
                if held >= self.plan.in_flight or h.step in self.seg.pending or \
                        any(q.header.step == h.step for q in self.queued):
                    raise BusError(f"{self.prev} sent activations for step {h.step} with "
                                   f"{held} steps held here (the roster allows "
                                   f"{self.plan.in_flight} in flight)")
                self.queued.append(env)
                self._advance()
            elif kind == "labels" and self.last and self._from(env, owner):
                if h.dtype != "int64" or h.shape is None or len(h.shape) != 1 or \
                        len(self.labels) >= self.plan.in_flight:
                    raise BusError(f"owner sent labels of {h.dtype} {list(h.shape or ())} with "
                                   f"{len(self.labels)} steps of labels waiting")
                self.labels[h.step] = tensor(env)
                self._maybe_loss(h.step, h)
                self._advance()  # a batch may have been queued behind this step's loss
            elif kind == "bwd" and self._from(env, self.next):
                if h.step not in self.seg.pending or h.shape != self.seg.output_shape(h.step):
                    raise BusError(f"{self.next} sent gradients {list(h.shape or ())} for step "
                                   f"{h.step}, which has no matching forward here")
                grad = self.seg.backward(tensor(env), h.step, update=False)
                bus.send_array("bwd", self.prev, grad, step=h.step, batch=h.batch, epoch=h.epoch)
                self.seg.update()  # off the critical path: the gradient is already on its way
                self._advance()
            elif kind == "eval_fwd" and self._from(env, self.prev):
                out = self.seg.evaluate(tensor(env))
                bus.send_array("eval_out" if self.last else "eval_fwd",
                               owner if self.last else self.next, out, step=h.step,
                               batch=h.batch, epoch=h.epoch)
            elif kind == "end" and self._from(env, owner):
                return
            elif kind in ("round", "wm_commit", "checkpoint"):
                self._watermark(env)

    def _watermark(self, env: Envelope) -> None:
        """Rounds, the previous stage's commitments and the notary's checkpoints drive this
        stage's watermark: commit before a round, claim after it."""
        if self.marker is None:
            return
        h = env.header
        wanted = {"checkpoint": self.notary_kid, "round": self.kid[self.roster.owner.name],
                  "wm_commit": self.kid[self.prev] if self.index > 0 else None}
        if h.sender != wanted.get(h.kind):
            return  # others' messages on these topics are none of this stage's business
        doc = env.document()
        if type(doc) is not dict:
            raise BusError(f"{h.kind} message from {h.sender} is not a map")
        if h.kind == "checkpoint" and type(doc.get("note")) is str:
            cp = open_checkpoint(doc["note"], self.roster.notary.identity,
                                 default_origin(self.cfg.run.id))
            self.marker.saw_checkpoint(cp.size, cp.root)
        elif h.kind == "wm_commit":
            self.marker.saw_previous_commit(doc)
        elif h.kind == "round" and type(doc.get("round")) is int:
            if doc.get("phase") == "start":
                self.marker.start(doc["round"])
            elif doc.get("phase") == "end":
                claim = self.marker.claim(doc["round"])
                sent = self.bus.send_doc("wm_claim", "all", claim.to_doc())
                self.marker.claimed(sent.leaf)
                self.log.info("watermark claimed", round=claim.round,
                              bit_errors=claim.bit_errors, bits=claim.nbits)
        commit = self.marker.ready_commit()
        if commit is not None:
            self.bus.send_doc("wm_commit", "all", commit.to_doc())
            self.log.info("watermark committed", round=commit.round)

    def _advance(self) -> None:
        """Forward the next queued batch once the previous step's backward is done: a stage
        trains strictly in step order whatever the owner has in flight, so pipelining changes
        what a stage computes only through the (lagging) head's activations it is sent."""
        while self.queued and not self.seg.pending:
            env = self.queued.popleft()
            h = env.header
            out = self.seg.forward(tensor(env), h.step)
            if self.last:
                self.waiting_logits.add(h.step)
                self._maybe_loss(h.step, h)
            else:
                self.bus.send_array("fwd", self.next, out, step=h.step, batch=h.batch,
                                    epoch=h.epoch)

    def _maybe_loss(self, step: int, h) -> None:
        if step not in self.waiting_logits or step not in self.labels:
            return
        self.waiting_logits.discard(step)
        labels = self.labels.pop(step).long()
        n, classes = self.seg.output_shape(step)
        if labels.shape[0] != n or labels.min() < 0 or labels.max() >= classes:
            raise BusError(f"labels of step {step} do not fit its logits [{n}, {classes}]")
        r = self.seg.loss_backward(labels, step, update=False)
        self.bus.send_array("bwd", self.prev, r.grad_in, step=step, batch=h.batch, epoch=h.epoch)
        self.seg.update()
        self.bus.send_doc("metrics", self.roster.owner.name,
                          {"loss": r.loss, "correct": r.correct}, step=step, batch=h.batch,
                          epoch=h.epoch)

    def _finish(self) -> int:
        bus = self.bus
        weights = st_save({k: v.detach().contiguous() for k, v in self.segment.state_dict().items()},
                          metadata={"run_id": self.cfg.run.id, "stage": str(self.index + 1)})
        sealed = self.roster.owner.identity.seal(weights)
        bus.send_doc("segment", self.roster.owner.name,
                     {"stage": self.index + 1, "sealed": sealed, "sent": dict(bus.sent)})
        self.log.info("segment delivered", bytes=len(weights))
        deadline = time.monotonic() + self.cfg.bus.join_timeout_s
        while True:  # until the notary's final checkpoint
            if time.monotonic() > deadline:
                self.log.warning("no final checkpoint from the notary; leaving anyway")
                break
            env = bus.recv(1.0)
            if env is not None and env.header.kind == "checkpoint" and \
                    env.header.sender == self.notary_kid and self._is_final(env):
                break
        bus.watch({})  # from here on peers leave as they finish
        bus.mark_done()
        if self.notary_kid is not None:
            bus.linger(f"run/{self.cfg.run.id}/closed/notary",
                       (self.notary_kid, self.roster.notary.name))
        return EXIT_OK


    def _is_final(self, env: Envelope) -> bool:
        """A final checkpoint note correctly signed by the roster's notary."""
        doc = env.document()
        if type(doc) is not dict or doc.get("final") is not True or type(doc.get("note")) is not str:
            return False
        try:
            open_checkpoint(doc["note"], self.roster.notary.identity, default_origin(self.cfg.run.id))
        except ClicooperError as exc:
            self.log.warning("bad checkpoint from the notary", error=str(exc))
            return False
        return True


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="this trainer's key name")
    p.add_argument("--keys", help="key directory (NAME.key, owner's .pub)")
    p.add_argument("--owner-key", help="the owner's public key file")
    p.add_argument("--run-id")
    p.add_argument("--pub", help="broker address for publishing")
    p.add_argument("--sub", help="broker address for subscribing")
    args = p.parse_args(argv)

    def body(log) -> int:
        over: dict = {"run": {}, "bus": {}, "participants": {}}
        if args.run_id:
            over["run"]["id"] = args.run_id
        if args.pub:
            over["bus"]["pub"] = args.pub
        if args.sub:
            over["bus"]["sub"] = args.sub
        if args.keys:
            over["participants"]["keys"] = args.keys
        cfg = load_config(args.config, over)
        structlog.contextvars.bind_contextvars(run_id=cfg.run.id, stage=args.name)
        set_threads(cfg.run.trainer_threads)
        owner_key = load_public(args.owner_key) if args.owner_key else None
        return Trainer(cfg, args.name, log, owner_key).run()

    return run_main("trainer", body, argv)


if __name__ == "__main__":
    sys.exit(main())
