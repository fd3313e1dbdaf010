"""Replay verification (issue 19): re-execute each trainer's stage from the provenance log and
name the first message or commitment it did not compute as it should.

Training is a pure function of the initial weights and the inputs a stage received: the plan in
the signed roster fixes the model, its cut layers and the seed every process initialises from
(`ml.build.build_segment`) and its random layers draw from (`ml.split.step_seed`), and the log
holds every input. So for each stage the verifier builds the initial weights and trains them as
a trainer does, strictly in step order (`Trainer._advance`): the activations its predecessor
sent (`fwd`, in that sender's order), then that step's labels from the owner for a last stage
(`labels`) or the gradients its successor or the owner's tail sent back (`bwd`), with the same
optimiser (Adam, the plan's learning rate) and the run's thread count, and compares with what
the stage sent:
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
weights, so a later span cannot be started from it). An output whose body was not kept is not
compared, and the replay is not complete.

Rollbacks (a restarted trainer, a resumed run): the steps from the rollback's step are trained
again after it in the log. The replay re-executes each span between rollbacks in turn, and at a
rollback restores the state it held itself after the steps before that step (kept from the
first span: the trainer restores its snapshot of that step, whose weights digest the replay
compared), in a fresh optimiser as the trainer does. A handover to a standby is a rollback
too (the standby restores the gone trainer's committed state of that step): from it on, the
stage's messages are the standby's, with its threads and its watermark commitments (a handover
voids the round's: every stage commits anew).

Order: the log orders each sender's messages (its signed chain), not messages across senders.
So the verifier first places every message in the span of its sender's own chain
(`replay_timeline`: a trainer's messages before its `restored` are of the span before, however
late the notary logged them), indexes each stage's inputs and outputs by span, kind and step
(headers only), then re-executes each stage in its own step order: an honest stage is never
accused for where the notary logged its inputs. In a span the activations must come one a step
from the step it starts at; an input missing for a step the rollback after the span says was
trained stops the replay, one missing for a step it abandoned ends the span. Each snapshot is
compared with the state after the steps it covers; each evaluation with the weights after the
sender's last step before it in its chain (the owner evaluates between epochs: the epoch in a
header is the sender's word, and only names the outputs); each watermark claim with the weights
at its round's end (or the run's last step). What a stage sent that its replay did not compute
(an evaluation output without an evaluation input, metrics for a step it never trained)
diverges, unless the replay stopped before it or the step was abandoned. An input a sender sent
twice, different, for one step stops its receiver's replay (which one it used is not logged);
the sender's own replay compares both.

Run only on a log that `verify_log` accepted: this module reads, it does not re-check.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clicooper_bus.audit.replay_compare import Comparisons
from clicooper_bus.audit.replay_spans import SpanStarts
from clicooper_bus.audit.replay_timeline import Break, Placed, Timeline, doc, timeline
from clicooper_bus.audit.replay_verdict import (
    Divergence,
    StageVerdict,
    max_threads,
    replay_markdown,
)
from clicooper_bus.chain.documents import Claim, Commit
from clicooper_bus.config import load_config
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.data import batches
from clicooper_bus.ml.models import build_segment, plan_spec
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.state import stage_state
from clicooper_bus.ml.tensors import as_sent, tensor_of
from clicooper_bus.ml.watermark import mark as wm
from clicooper_bus.ml.watermark import marker
from clicooper_bus.net.codec import unpack
from clicooper_bus.net.identity import load_identity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import Header
from clicooper_bus.plan import Plan
from clicooper_bus.protocol import Hello
from clicooper_bus.tlog.log import ProvenanceLog

# what a stage sends that the replay recomputes
COMPARED = ("fwd", "bwd", "metrics", "logits", "snapshot", "wm_claim", "eval_fwd", "eval_out")
EVALUATION = ("eval_fwd", "eval_out")
__all__ = ["Divergence", "StageVerdict", "max_threads", "replay_log", "replay_markdown",
           "verify_training"]


@dataclass
class _Index:
    """Where one stage's inputs and outputs of one span are in the log (entry numbers; headers
    only), each placed in the span of its sender's chain (`replay_timeline`)."""

    name: str  # the trainer holding the stage in this span (a standby after a handover)
    start: int  # the step the span trains from
    end: int | None  # the step the rollback after it returns to (None: the last span)
    fwd: list[int] = field(default_factory=list)  # activations in, one a step, sender's order
    fwd_steps: dict[int, int] = field(default_factory=dict)  # step -> its fwd in
    bwd: dict[int, int] = field(default_factory=dict)  # step -> gradients in
    labels: dict[int, int] = field(default_factory=dict)  # step -> labels in
    dups: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # every copy of an
    # input sent twice for one step (kind, step): which one the stage used is not logged
    last_in: int | None = None  # pass 1: the step of the last fwd in so far
    evals: list[tuple[int, int]] = field(default_factory=list)  # (state step, eval_fwd in)
    sent: dict[tuple, list[int]] = field(default_factory=dict)  # (kind, key) -> what it sent
    commits: list[tuple[int, str]] = field(default_factory=list)  # (entry, committer)
    claim_entries: list[int] = field(default_factory=list)  # its watermark claims
    snapshot_at: dict[int, int] = field(default_factory=dict)  # step -> its commitment
    states: dict[int, int] = field(default_factory=dict)  # step -> its sealed stage_state

    def abandoned(self, step: int) -> bool:
        """Whether `step` was trained again after the rollback that ends this span."""
        return self.end is not None and step >= self.end


def _key(h: Header) -> tuple:
    """The replay's name for an output: evaluation by (epoch, batch), the rest by step."""
    if h.kind in EVALUATION:
        return ("eval", h.epoch, h.step)
    return (h.kind, h.step)


class _Stage(Comparisons, SpanStarts):
    """The replay of one stage: its segment, its neighbours, and where its messages are."""

    def __init__(self, plan: Plan, roster: Roster, stage: int, threads: int, tl: Timeline,
                 unseal: Callable[[bytes], bytes] | None = None):
        self.stage, self.owner = stage, roster.owner.name
        self.last = stage == len(roster.stages)
        self.tail = plan.tail
        self.takes_labels = self.last and not plan.tail
        spec = plan_spec(plan)
        self.seg = SegmentTrainer(build_segment(spec, plan.segment_cuts, plan.seed, stage),
                                  lr=plan.lr, seed=(plan.seed, stage))
        self.timelines = [_Index(names[stage - 1], tl.start(j), tl.end(j))
                          for j, names in enumerate(tl.holders)]  # one per span
        self.index = self.timelines[0]
        self.name = self.index.name
        self.roster = roster
        self.hellos: dict[str, int] = {}  # trainer -> its first hello's entry
        self.targets: set[int] = set()  # the steps rollbacks return to: their state is kept
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.ran_out = False
        self.reached = 0  # the replay holds the state after steps 0 .. reached - 1
        self.unkept = 0  # outputs whose bodies the log did not keep: not compared
        self.unverified = 0  # outputs of steps not re-executed (`_resume`): not compared
        self.discarded = 0  # outputs of steps a rollback discarded that the replay never reached
        self.verdict = StageVerdict(stage, self.name, trainers=list(dict.fromkeys(
            ix.name for ix in self.timelines)))
        self.run_id, self.settings = roster.run_id, marker.settings(roster)
        self.codec, self.threads, self.fallback_threads = plan.codec, threads, threads
        self.per = batches(plan.train_size, plan.batch_size) if plan.train_size else 0
        self.marks: dict[int, wm.Watermark] = {}  # round -> the mark its commitment keys
        self.mark: wm.Watermark | None = None  # the one the next update adds
        self.seg.regularizer = lambda: self.mark.add_grad() if self.mark is not None else None
        self.claims: list[tuple[int, int, Claim]] = []  # (round, entry, claim) of the span
        self.plog: ProvenanceLog | None = None
        self.tl, self.unseal = tl, unseal
        self.skip_to: int | None = None  # a committed state restored: train on from its step

    # --- pass 1: where everything is ------------------------------------------------------

    def _neighbours(self, span: int) -> tuple[str, str | None]:
        """Who sends this stage its activations and its gradients in span `span`."""
        names = self.tl.holders[span]
        prev = self.owner if self.stage == 1 else names[self.stage - 2]
        nxt = (self.owner if self.tail else None) if self.last else names[self.stage]
        return prev, (None if self.takes_labels else nxt)

    def index_entry(self, p: Placed) -> None:
        """Note entry `p` if it is this stage's input or output in its span."""
        h, who, i, v = p.header, p.sender, p.entry, self.verdict
        ix = self.timelines[p.span]
        prev, nxt = self._neighbours(p.span)
        mine = who == ix.name
        if mine and h.kind in ("fwd", "bwd", "metrics"):
            v.trained.add(h.step)  # every step the stage took part in, replayed or not
        if mine and h.kind in COMPARED:
            v.sent += 1
        if h.to == ix.name and h.kind == "fwd" and who == prev:
            ix.last_in = h.step
            self._input_at(ix, ix.fwd_steps, "fwd", h.step, i)
        elif h.to == ix.name and h.kind == "bwd" and who == nxt:
            self._input_at(ix, ix.bwd, "bwd", h.step, i)
        elif h.to == ix.name and h.kind == "labels" and who == self.owner and self.takes_labels:
            self._input_at(ix, ix.labels, "labels", h.step, i)
        elif h.kind == "eval_fwd" and h.to == ix.name and who == prev:
            # evaluated with the weights after the sender's last step before it (an epoch's
            # end: the owner evaluates between epochs), not the epoch its header says
            ix.evals.append((ix.start if ix.last_in is None else ix.last_in + 1, i))
        elif h.kind == "hello":  # a standby's comes before the span it holds the stage in
            self.hellos.setdefault(who, i)
        elif not mine:
            return
        elif h.kind == "wm_commit":
            ix.commits.append((i, who))
        elif h.kind == "wm_claim":
            ix.claim_entries.append(i)
        elif h.kind == "stage_state":
            ix.states.setdefault(h.step, i)
        elif h.kind in COMPARED:
            if h.kind == "snapshot":
                ix.snapshot_at.setdefault(h.step, i)
            ix.sent.setdefault(_key(h), []).append(i)

    @staticmethod
    def _input_at(ix: _Index, table: dict[int, int], kind: str, step: int, i: int) -> None:
        """Input `i` of `kind` for `step`: the first one, or a copy noted beside it."""
        if step in table:
            ix.dups.setdefault((kind, step), [table[step]]).append(i)
            return
        table[step] = i
        if kind == "fwd":
            ix.fwd.append(i)

    # --- pass 2: the stage's training, in its own order -----------------------------------

    def replay(self, plog: ProvenanceLog) -> StageVerdict:
        """Re-execute the stage from what `index_entry` found: each span of the log in turn,
        a rollback restoring the state the replay held at its step (as the trainer restores
        its snapshot, or the standby the gone trainer's after a handover), each span with the
        threads and watermark commitments of the trainer holding the stage in it."""
        self.plog, v = plog, self.verdict
        self.targets = {b.step for b in self.tl.breaks}
        for span, ix in enumerate(self.timelines):
            self.index = ix
            self._holder(ix)
            if v.stopped:
                break
            if span == 0:
                self._state_reached(0)
            elif not self._roll_back(self.tl.breaks[span - 1]):
                break
            self._train()
            if v.first is not None or v.stopped:
                break
            self._span_end(last=ix.end is None)
            if v.first is not None or v.stopped:
                break
        # every output accounted for: compared, or of steps a rollback discarded
        v.complete = v.first is None and not v.stopped and self.unkept == 0 and \
            self.unverified == 0 and v.resumed == 0 and v.checked + self.discarded == v.sent
        if v.first is None and not v.stopped and self.unkept:
            self._stop(f"the log did not keep the bodies of {self.unkept} of its outputs "
                       f"([log] retention): not compared")
        return v

    def _train(self) -> None:
        """The steps of the current span, in the order the predecessor sent them: one a step,
        each the step after the last, from the step the span starts at."""
        v, ix = self.verdict, self.index
        expected, self.ran_out = ix.start, False
        for i in ix.fwd:
            if v.first is not None or v.stopped or self.ran_out:
                return
            h, _, body = self.plog.entry(i)
            if self.skip_to is not None:  # started again from a committed state
                if h.step < self.skip_to:
                    continue
                expected, self.skip_to = self.skip_to, None
            if h.step != expected:
                if not ix.abandoned(expected):
                    self._stop(f"the log holds no fwd input of step {expected} in this span, "
                               f"but one of step {h.step} (entry {i})")
                return
            if not self._unique("fwd", h.step):
                return
            if body is None:
                if not self._resume(h.step, f"the log did not keep the body of its fwd input "
                                            f"of step {h.step} (entry {i}: [log] retention)"):
                    return
                continue
            self._step(h, tensor_of(h.dtype, h.shape, body))
            expected += 1
        if self.skip_to is not None:
            expected, self.skip_to = self.skip_to, None
        if ix.end is not None and expected < ix.end and not self.ran_out and not v.stopped:
            self._stop(f"the log holds no fwd input of step {expected}, which the rollback "
                       f"to step {ix.end} says was trained")

    def _unique(self, kind: str, step: int) -> bool:
        """Whether the stage's input of `kind` for `step` is one: a sender that sent two
        different ones (its own replay names it) leaves which one the stage used unknown,
        and this replay stops there."""
        copies = self.index.dups.get((kind, step))
        if not copies:
            return True
        bodies = {bytes(self.plog.entry(i)[2] or b"") for i in copies}
        if len(bodies) == 1:
            return True
        self._stop(f"its {kind} input of step {step} came {len(copies)} times, different "
                   f"(entries {copies}): which one it used the log does not say")
        return False

    def _roll_back(self, b: Break) -> bool:
        """The rollback `b`: the state the replay held after steps 0 .. b.step - 1 again, in a
        fresh optimiser as the trainer's (`Restarts._on_rollback`); False, stopped, when the
        replay never held it."""
        state = self.saved.get(b.step)
        if state is None:
            self._stop(f"{b.what}: back to step {b.step}, a state the replay did not reach")
            return False
        for later in [k for k in self.saved if k > b.step]:  # the abandoned timeline's
            del self.saved[later]
        self._fresh(state)
        self.verdict.rollbacks += 1
        self._state_reached(b.step, restored=True)
        return self.verdict.first is None

    def _stop(self, why: str) -> None:
        self.verdict.stopped = self.verdict.stopped or why

    def _holder(self, ix: _Index) -> None:
        """The span's trainer: compute with the threads its `hello` said, add the marks of the
        watermark commitments it logged in the span (a handover voids a round's: every stage
        commits to it anew, the standby with its own key), and read its claims."""
        self.name = ix.name
        said = 0
        if ix.name in self.hellos:
            said = Hello.parse(unpack(self._doc(self.hellos[ix.name])), sender=ix.name).threads
        if said > max_threads():
            self._stop(f"{ix.name}'s hello says {said} torch threads, more than this verifier "
                       f"runs ({max_threads()}): replay it on a machine with {said // 2} cores")
        self.threads = said or self.fallback_threads
        round_marks: dict[int, wm.Watermark] = {}
        for i, who in ix.commits:
            mark = self._mark(Commit.from_doc(unpack(self._doc(i))), who)
            if mark is not None:
                round_marks.setdefault(mark[0], mark[1])
        self.marks.update(round_marks)
        self.claims = []
        for i in ix.claim_entries:
            claim = Claim.from_doc(unpack(self._doc(i)))
            self.claims.append((claim.round, i, claim))

    def _doc(self, i: int) -> bytes:
        return doc(self.plog, i)

    def _threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def _mark(self, c: Commit, who: str) -> tuple[int, wm.Watermark] | None:
        """The mark of `who`'s commitment to round `c.round`'s key for this stage, which the
        replay embeds in that round's updates; None when marks are off."""
        if self.settings is None or c.stage != self.stage or not wm.carrier(self.seg.module):
            return None
        key = c.link(self.run_id, self.roster.by_name(who).identity.public_key).key()
        return c.round, wm.Watermark(key, self.seg.module, t=self.settings["bits"],
                                     strength=self.settings["strength"])

    def _input(self, table: dict[int, int], kind: str, step: int) -> torch.Tensor | None:
        """The tensor of the stage's `kind` input of `step`, or None: the replay stopped (the
        log does not hold it, or did not keep its body), or the span ran out (a step it
        abandoned before the rollback that ends the span)."""
        i = table.get(step)
        if i is None:
            if self.index.abandoned(step):
                self.ran_out = True
            else:
                self._stop(f"the log holds no {kind} input of step {step} (the run ended or "
                           f"stopped before it)")
            return None
        if not self._unique(kind, step):
            return None
        h, _, body = self.plog.entry(i)
        if body is None:
            self._resume(step, f"the log did not keep the body of its {kind} input of step "
                               f"{step} (entry {i}: [log] retention)")
            return None
        return tensor_of(h.dtype, h.shape, body)

    def _step(self, h: Header, x: torch.Tensor) -> None:
        """Training step `h.step`: forward, then the labels' loss or the gradients' backward,
        the update; each output compared once computed."""
        step, ix = h.step, self.index
        self._threads()
        out = self.seg.forward(x, step)
        if self.takes_labels:
            labels = self._input(ix.labels, "labels", step)
            if labels is None:
                return
            r = self.seg.loss_backward(labels.long(), step, update=False)
            self._expect({("bwd", step): as_sent(r.grad_in, self.codec).numpy(),
                          ("logits", step): as_sent(r.logits, self.codec).numpy(),
                          ("metrics", step): (r.loss, r.correct)})
        else:
            self._expect({("fwd", step): as_sent(out, self.codec).numpy()})
            grad = self._input(ix.bwd, "bwd", step)
            if grad is None or self.verdict.first is not None:
                return
            grad_in = self.seg.backward(grad, step, update=False)
            self._expect({("bwd", step): as_sent(grad_in, self.codec).numpy()})
        if self.verdict.first is None:
            self._update(step)
            if not self.verdict.stopped:
                self.verdict.steps.add(step)  # re-executed to its update
                self._state_reached(step + 1)

    def _update(self, step: int) -> None:
        """The optimiser step of `step`, with the mark of its round when watermarks are on."""
        if self.settings is not None and wm.carrier(self.seg.module) is not None:
            round_ = step // self.per if self.per else 0
            self.mark = self.marks.get(round_)
            if self.mark is None:
                self._stop(f"step {step} trains in round {round_}, for which the log holds no "
                           f"watermark commitment of this stage")
                return
        self.seg.update()

    def _state_reached(self, step: int, restored: bool = False) -> None:
        """The replay holds the state after steps 0 .. step - 1: compare the span's snapshots
        of `step` (`Restarts._snapshot`), its evaluations at that state, and its watermark
        claim of the round ending there."""
        self.reached = step
        for i in self.index.sent.pop(("snapshot", step), []):
            self._compare_doc(i, "snapshot")
        if step in self.targets and self.verdict.first is None and not restored:
            self.saved[step] = stage_state(self.seg)  # a later rollback returns here
        self._evaluations(lambda at: at == step)
        if self.per and step % self.per == 0:
            self._claims(lambda round_: (round_ + 1) * self.per == step)

    def _evaluations(self, now) -> None:
        """The span's evaluations whose state step `now` accepts, with the weights held."""
        rest = []
        for at, i in self.index.evals:
            if not now(at):
                rest.append((at, i))
            elif self.verdict.first is None:
                self._evaluate(i)
        self.index.evals = rest

    def _claims(self, now) -> None:
        """The span's watermark claims whose round `now` accepts, against the weights held."""
        keep = []
        for round_, i, claim in self.claims:
            if not now(round_):
                keep.append((round_, i, claim))
            elif self.verdict.first is None:
                self._compare_claim(i, claim)
        self.claims = keep

    def _span_end(self, last: bool) -> None:
        """After the span's steps: the last round's claim when the run stopped inside a round
        (`[run] max_steps`); what could not be placed stops the replay; what the stage sent
        and the replay did not compute, of the steps not abandoned, diverges."""
        if last and self.per:  # the claim of a round the run ended inside
            self._claims(lambda round_: round_ * self.per < self.reached < (round_ + 1) *
                         self.per)
        if self.verdict.first is not None:
            return
        if self.index.evals:
            at, i = self.index.evals[0]
            self._stop(f"an evaluation input (entry {i}) comes at the state after step "
                       f"{at - 1}, which the replay of this span did not hold")
        elif self.claims:
            round_, i, _ = self.claims[0]
            self._stop(f"its watermark claim of round {round_} (entry {i}) comes where the "
                       f"replay of this span did not hold that round's end")
        else:
            self._unmatched()

def verify_training(run_dir: str | os.PathLike[str],
                    owner_key: str | os.PathLike[str] | None = None) -> list[StageVerdict]:
    """Re-execute every trainer's stage of the run in `run_dir` from its log; one verdict per
    stage. `owner_key`: the owner's key file (default: the run config's `[participants] keys`
    holds it, as on the owner's machine), with which each stage's sealed states start the
    replay again after inputs the log did not keep; without one the replay stops there.
    Raises ClicooperError for a run it cannot read."""
    layout = RunLayout(Path(run_dir))
    cfg = load_config(str(layout.config))
    path = Path(owner_key) if owner_key is not None else \
        Path(cfg.participants.keys) / f"{cfg.participants.owner}.key"
    unseal = load_identity(path).unseal if path.is_file() else None
    with ProvenanceLog.open(layout.log) as plog:
        return replay_log(plog, cfg.run.trainer_threads, unseal=unseal)


def replay_log(plog: ProvenanceLog, threads: int = 1, order: Sequence[int] | None = None,
               unseal: Callable[[bytes], bytes] | None = None) -> list[StageVerdict]:
    """Re-execute every trainer's stage from the open log `plog`; one verdict per stage. Each
    stage computes with the torch threads its trainer said in its `hello` (the same
    operations in the same order: 2 threads against 1 changed the first activations by
    6e-8), `threads` for a trainer that did not say. `order`: the entries in the order the
    notary could have logged them (default: the log's; any order that keeps each sender's
    gives the same verdicts, which tests check). `unseal`: the owner's
    (`Identity.unseal`), to open the stages' sealed states (`_Stage._resume`)."""
    roster = Roster.open(plog.roster_bytes)
    plan = Plan.from_meta(roster.meta["plan"])
    previous = torch.get_num_threads()
    try:
        tl = timeline(plog, roster, order)
        stages = [_Stage(plan, roster, i, threads, tl, unseal)
                  for i in range(1, len(roster.stages) + 1)]
        for p in tl.entries:
            for s in stages:
                s.index_entry(p)
        for s in stages:
            s.replay(plog)
    finally:
        torch.set_num_threads(previous)
    return [s.verdict for s in stages]
