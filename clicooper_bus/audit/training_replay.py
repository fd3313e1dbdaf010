"""Replay verification (issue 19): re-execute each trainer's stage from the provenance log and
name the first message or commitment it did not compute as it should.

Training is a pure function of the initial weights and the inputs a stage received: the plan in
the signed roster fixes the model, its cut layers and the seed every process initialises from
(`ml.build.build_segment`), and the log holds every input in the order the stage used it. So for
each stage the verifier builds the initial weights, feeds it, in log order, the activations its
predecessor sent (`fwd`), the labels the owner sent a last stage (`labels`), and the gradients
its successor or the owner's tail sent back (`bwd`), with the same optimiser (Adam, the plan's
learning rate) and the run's thread count, and compares with what the stage sent:
- every `fwd` and `bwd` it sent (the tensors, decoded as the wire carries them);
- a last stage's `metrics` (loss and count of correct predictions) and `logits`;
- the weights digest of every `snapshot` it committed (`ml.state.weights_digest`: the state
  digest also covers the trainer process's RNG state, which no log holds).

Watermarks: the key of each stage and round derives from the stage's logged `wm_commit`
alone (`chain.key`: everything in it is public), so the replay embeds the same mark from the
round's first step as the trainer did (`ml.watermark.marker.Marker`: the owner starts a round
only once every stage committed to it), and compares the weights digest of every `wm_claim`.

Codecs: a stage's inputs are decoded as it decoded them (`ml.tensors.tensor_of`), and what it
sent is compared with the replay's output encoded and decoded with the run's codec
(`ml.tensors.as_sent`).

Evaluation traffic: every `eval_fwd` or `eval_out` a stage sent is recomputed from its
`eval_fwd` input with the weights the replay holds then (evaluation changes no weight).

Tolerance: none. A replay with the run's thread count computes the same floating-point
operations in the same order; the honest runs measured replayed every message bit for bit
(`docs/ARCHITECTURE.md`, "Replay verification"). A difference is reported with its largest
absolute value, so that a future tolerance can be judged against it.

Coverage: the replay of a stage stops at the first input whose body the log did not keep
(`[log] retention`): the state after it is unknown (a snapshot commitment is a digest, not the
weights, so a later span cannot be started from it). Not verified yet, and said so per stage:
runs with rollbacks (steps trained again) or handovers.

Run only on a log that `verify_log` accepted: this module reads, it does not re-check.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clicooper_bus.chain.documents import Claim, Commit
from clicooper_bus.config import load_config
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.data import batches
from clicooper_bus.ml.models import build_segment, plan_spec
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.state import weights_digest
from clicooper_bus.ml.tensors import as_sent, tensor_of
from clicooper_bus.ml.watermark import mark as wm
from clicooper_bus.ml.watermark import marker
from clicooper_bus.ml.watermark.claim import weights_digest as claim_digest
from clicooper_bus.net.codec import unpack
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import Header
from clicooper_bus.plan import Plan
from clicooper_bus.protocol import Hello, Metrics
from clicooper_bus.protocol.recovery import Snapshot
from clicooper_bus.tlog.log import ProvenanceLog

# what a stage sends that the replay recomputes
COMPARED = ("fwd", "bwd", "metrics", "logits", "snapshot", "wm_claim", "eval_fwd", "eval_out")
UNSUPPORTED_KINDS = {"rollback": "a rollback (steps trained again)",
                     "handover": "a handover to a standby"}


@dataclass(frozen=True)
class Divergence:
    """The first thing a stage sent that its replay did not compute: the message `kind` (or
    `snapshot` for a weights commitment), its training `step`, the log `entry`, and what
    differs (`max_abs`: the largest absolute difference of a tensor, None for a digest or a
    count)."""

    kind: str
    step: int | None
    entry: int
    what: str
    max_abs: float | None = None


@dataclass
class StageVerdict:
    """One stage's replay: how many of the messages and weight commitments it sent were
    recomputed (`checked` of `sent`), the first that differed, and why the replay stopped
    early (`stopped`: a missing input body, or what is not verified yet)."""

    stage: int
    trainer: str
    sent: int = 0
    checked: int = 0
    steps: set[int] = field(default_factory=set)  # training steps replayed
    trained: set[int] = field(default_factory=set)  # training steps the stage sent for
    first: Divergence | None = None
    stopped: str | None = None
    largest: float = 0.0  # the largest absolute difference of any tensor compared

    @property
    def coverage(self) -> float:
        return self.checked / self.sent if self.sent else 0.0

    @property
    def ok(self) -> bool:
        return self.first is None

    def line(self) -> str:
        head = (f"stage {self.stage} ({self.trainer}): {self.checked} of {self.sent} messages "
                f"and commitments recomputed ({self.coverage:.0%}), {len(self.steps)} of "
                f"{len(self.trained)} steps re-executed")
        if self.first is not None:
            f = self.first
            diff = f" (largest difference {f.max_abs:.3g})" if f.max_abs is not None else ""
            return (f"{head}; DIVERGES at step {f.step}: its {f.kind} (log entry {f.entry}) "
                    f"{f.what}{diff}")
        return head + (f"; stopped: {self.stopped}" if self.stopped else "; no divergence")


    def to_json(self) -> dict:
        """The verdict as the audit report and the bundle's `replay.json` carry it."""
        f = self.first
        return {"stage": self.stage, "trainer": self.trainer, "ok": self.ok,
                "sent": self.sent, "checked": self.checked, "coverage": round(self.coverage, 4),
                "steps": len(self.steps), "trained": len(self.trained),
                "stopped": self.stopped, "largest": self.largest,
                "first": None if f is None else {"kind": f.kind, "step": f.step,
                                                 "entry": f.entry, "what": f.what,
                                                 "max_abs": f.max_abs},
                "line": self.line()}


def replay_markdown(rows: list[dict]) -> list[str]:
    """The audit report's section on replay verification (`StageVerdict.to_json` rows)."""
    lines = ["## Training replay", "",
             "Each trainer's stage re-executed from the log (`clicooper audit "
             "--verify-training`): every message and commitment it sent that the log kept the "
             "inputs of, recomputed bit for bit (tolerance none).", ""]
    return lines + [f"- {'**DIVERGES**' if not r['ok'] else 'ok'}: {r['line']}"
                    for r in rows] + [""]


class _Stage:
    """The replay of one stage: its segment, its neighbours, and what it computed per step."""

    def __init__(self, plan: Plan, roster: Roster, stage: int, threads: int):
        names = list(roster.stages)
        self.name, self.stage = names[stage - 1], stage
        self.prev = roster.owner.name if stage == 1 else names[stage - 2]
        last = stage == len(names)
        self.next = (roster.owner.name if plan.tail else None) if last else names[stage]
        self.takes_labels = last and not plan.tail
        spec = plan_spec(plan)
        self.seg = SegmentTrainer(build_segment(spec, plan.segment_cuts, plan.seed, stage),
                                  lr=plan.lr)
        self.inputs = {"fwd": self.prev, "bwd": self.next,
                       "labels": roster.owner.name if self.takes_labels else None}
        self.out: dict[tuple[str, int], np.ndarray] = {}  # (kind, step) -> what it must send
        self.metrics: dict[int, tuple[float, int]] = {}
        self.labels: dict[int, torch.Tensor] = {}  # a last stage's, until its logits are
        self.logits: set[int] = set()  # steps whose logits a last stage computed
        self.queued: deque[tuple[int, torch.Tensor]] = deque()  # inputs not yet forwarded
        self.verdict = StageVerdict(stage, self.name)
        self.run_id, self.settings = roster.run_id, marker.settings(roster)
        self.public_key = roster.by_name(self.name).identity.public_key
        self.codec, self.threads = plan.codec, threads
        self.per = batches(plan.train_size, plan.batch_size) if plan.train_size else 0
        self.marks: dict[int, wm.Watermark] = {}  # round -> the mark its commitment keys
        self.mark: wm.Watermark | None = None  # the one the next update adds
        self.seg.regularizer = lambda: self.mark.add_grad() if self.mark is not None else None

    def take(self, h: Header, body, who: str, index: int) -> None:
        """Entry `index` of the log, sent by `who`: an input to this stage, or one of its own
        messages to compare."""
        v = self.verdict
        if who == self.name and h.kind in ("fwd", "bwd", "metrics"):
            v.trained.add(h.step)  # every step the stage took part in, replayed or not
        if v.first is not None or v.stopped:
            if who == self.name and h.kind in COMPARED:
                v.sent += 1  # what the replay never reached counts against its coverage
            return
        if h.to == self.name and who == self.inputs.get(h.kind):
            self._input(h, body, index)
        elif h.kind == "eval_fwd" and h.to == self.name and who == self.prev:
            self._evaluate(h, body, index)
        elif who == self.name and h.kind == "hello" and body is not None:
            said = Hello.parse(unpack(bytes(body)), sender=self.name).threads
            self.threads = said or self.threads
        elif who == self.name and h.kind == "wm_commit" and body is not None:
            self._commit(Commit.from_doc(unpack(bytes(body))))
        elif who == self.name and h.kind in COMPARED:
            self._compare(h, body, index)

    def _threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _commit(self, c: Commit) -> None:
        """The stage's commitment to round `c.round`'s key: the replay embeds that mark."""
        if self.settings is not None and c.stage == self.stage and wm.carrier(self.seg.module):
            key = c.link(self.run_id, self.public_key).key()
            self.marks[c.round] = wm.Watermark(key, self.seg.module, t=self.settings["bits"],
                                               strength=self.settings["strength"])

    def _update(self, step: int) -> None:
        """The optimiser step of `step`, with the mark of its round when watermarks are on."""
        if self.settings is not None and wm.carrier(self.seg.module) is not None:
            round_ = step // self.per if self.per else 0
            self.mark = self.marks.get(round_)
            if self.mark is None:
                self.verdict.stopped = (f"step {step} trains in round {round_}, whose watermark "
                                        f"commitment is not in the log before it")
                return
        self.seg.update()

    def _evaluate(self, h: Header, body, index: int) -> None:
        if body is None:
            return  # evaluation changes no weight: training replay goes on
        self._threads()
        out = self.seg.evaluate(tensor_of(h.dtype, h.shape, body))
        self.out["eval", h.epoch, h.step] = as_sent(out, self.codec).numpy()

    def _input(self, h: Header, body, index: int) -> None:
        v = self.verdict
        if body is None:
            v.stopped = (f"the log did not keep the body of its {h.kind} input of step {h.step} "
                         f"(entry {index}: [log] retention)")
            return
        x = tensor_of(h.dtype, h.shape, body)
        self._threads()
        if h.kind == "fwd":
            self.queued.append((h.step, x))
        elif h.kind == "labels":
            self.labels[h.step] = x.long()
            self._loss(h.step)
        else:
            grad_in = self.seg.backward(x, h.step, update=False)
            self.out["bwd", h.step] = as_sent(grad_in, self.codec).numpy()
            self._update(h.step)
        self._advance()

    def _advance(self) -> None:
        """Forward the next queued batch once the previous step's backward is done, as a
        trainer does (`Trainer._advance`: strictly in step order, whatever is in flight)."""
        while self.queued and not self.seg.pending:
            step, x = self.queued.popleft()
            out = self.seg.forward(x, step)
            self.verdict.steps.add(step)
            if self.takes_labels:
                self.logits.add(step)
                self._loss(step)
            else:
                self.out["fwd", step] = as_sent(out, self.codec).numpy()

    def _loss(self, step: int) -> None:
        """A last stage's loss, its gradient and its metrics, once it has both the step's
        logits and its labels (in either order)."""
        if step in self.logits and step in self.labels:
            self.logits.discard(step)
            r = self.seg.loss_backward(self.labels.pop(step), step, update=False)
            self.out["bwd", step] = as_sent(r.grad_in, self.codec).numpy()
            self.out["logits", step] = as_sent(r.logits, self.codec).numpy()
            self._update(step)
            self.metrics[step] = (r.loss, r.correct)

    def _compare(self, h: Header, body, index: int) -> None:
        v = self.verdict
        v.sent += 1
        if body is None:
            return  # not kept: not counted as checked
        if h.kind == "snapshot":
            snap = Snapshot.parse(unpack(bytes(body)), sender=self.name)
            mine = weights_digest(self.seg.module)  # sent after its last update: in log order
            v.checked += 1
            if mine != snap.weights:
                v.first = Divergence("snapshot", snap.step, index,
                                     f"commits weights {snap.weights[:16]}..., the replay "
                                     f"holds {mine[:16]}...")
            return
        if h.kind == "wm_claim":
            claim = Claim.from_doc(unpack(bytes(body)))
            mine = claim_digest(self.seg.module)
            v.checked += 1
            if mine != claim.weights_sha256:
                v.first = Divergence("wm_claim", None, index,
                                     f"claims weights {claim.weights_sha256.hex()[:16]}... at the "
                                     f"end of round {claim.round}, the replay holds "
                                     f"{mine.hex()[:16]}...")
            return
        if h.kind == "metrics":
            want = self.metrics.get(h.step)
            if want is None:
                return
            m = Metrics.parse(unpack(bytes(body)), sender=self.name)
            v.checked += 1
            if (m.loss, m.correct) != want:
                v.first = Divergence("metrics", h.step, index,
                                     f"reports loss {m.loss:.6g} and {m.correct} correct, the "
                                     f"replay computes {want[0]:.6g} and {want[1]}")
            return
        evaluation = h.kind in ("eval_fwd", "eval_out")
        want = self.out.pop(("eval", h.epoch, h.step) if evaluation else (h.kind, h.step), None)
        if want is None and evaluation:
            return  # its input's body was not kept: not checked, and no divergence
        if want is None:
            v.first = Divergence(h.kind, h.step, index, "was sent without the input the replay "
                                                        "computes it from")
            return
        got = tensor_of(h.dtype, h.shape, body).numpy()
        v.checked += 1
        diff = float(np.abs(got - want).max(initial=0.0)) if got.shape == want.shape else None
        v.largest = max(v.largest, diff if diff is not None else float("inf"))
        if diff is None or not np.array_equal(got, want):
            v.first = Divergence(h.kind, h.step, index, "differs from what the replay computes",
                                 diff)


def verify_training(run_dir: str | os.PathLike[str]) -> list[StageVerdict]:
    """Re-execute every trainer's stage of the run in `run_dir` from its log; one verdict per
    stage. Raises ClicooperError for a run it cannot read."""
    layout = RunLayout(Path(run_dir))
    cfg = load_config(str(layout.config))
    with ProvenanceLog.open(layout.log) as plog:
        return replay_log(plog, cfg.run.trainer_threads)


def replay_log(plog: ProvenanceLog, threads: int = 1) -> list[StageVerdict]:
    """Re-execute every trainer's stage from the open log `plog`; one verdict per stage. Each
    stage computes with the torch threads its trainer said in its `hello` (the same
    operations in the same order: 2 threads against 1 changed the first activations by
    6e-8), `threads` for a trainer that did not say."""
    roster = Roster.open(plog.roster_bytes)
    plan = Plan.from_meta(roster.meta["plan"])
    previous = torch.get_num_threads()
    try:
        stages = [_Stage(plan, roster, i, threads) for i in range(1, len(roster.stages) + 1)]
        names = {m.key_id: m.name for m in roster.members}
        for i in range(plog.size):
            h, _, body = plog.entry(i)
            if h.kind in UNSUPPORTED_KINDS and h.sender == roster.owner.key_id:
                for s in stages:
                    s.verdict.stopped = s.verdict.stopped or (
                        f"{UNSUPPORTED_KINDS[h.kind]} at log entry {i}: not verified yet")
            for s in stages:
                s.take(h, body, names.get(h.sender, "?"), i)
    finally:
        torch.set_num_threads(previous)
    return [s.verdict for s in stages]
