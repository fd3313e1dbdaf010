"""Poisoned input is refused at the receiver (issue 17 item 4): every tensor a process receives
is checked against the dtype and shape the signed plan implies, and for finite values, before
use; a refusal names the sender, the step and the problem, and the run stops cleanly with
`summary.json` saying why, no model saved, the log verifiable. The cases of the issue each have
a test of the receive check; two live runs prove the clean stop, one refused by a trainer (huge
finite gradients, attributed to their sender), one by the owner (through `clicooper run`, exit
3). A non-finite result of a finite input is refused as that input (the review's cases: the
blame must land on the sender, not on the honest party downstream)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from clicooper_bus.errors import PoisonedInput
from clicooper_bus.layout import RunLayout, json_text
from clicooper_bus.ml.tensors import Expected, check_number, check_weights, received
from clicooper_bus.net.identity import Identity, load_public
from clicooper_bus.net.wire import Sender
from clicooper_bus.protocol import End, Metrics, ProtocolError
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.logverify import verify_log
from tests.busrun import processes, write_config
from tests.evil_trainer import poisoned

ACT = Expected("float32", (16, 7, 7), max_rows=32)  # a stage's input by the plan: [1..32, 16, 7, 7]


def _env(array, kind: str = "fwd", step: int = 3):
    return Sender(Identity.generate("trainer-1"), "run-1").seal_array(kind, "trainer-2", array,
                                                                      step=step)


def _refusal(array, expected: Expected = ACT, kind: str = "fwd") -> PoisonedInput:
    with pytest.raises(PoisonedInput) as info:
        received(_env(array, kind), expected, "trainer-1")
    err = info.value
    assert (err.sender, err.kind, err.step) == ("trainer-1", kind, 3), err.to_doc()
    assert str(err).startswith(f"refused {kind} of step 3 from trainer-1: "), str(err)
    return err


def good(rows: int = 32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, 16, 7, 7)).astype(np.float32)


def test_a_well_formed_batch_passes_and_a_short_last_batch_too():
    assert received(_env(good()), ACT, "trainer-1").shape == (32, 16, 7, 7)
    assert received(_env(good(5)), ACT, "trainer-1").dtype == torch.float32


@pytest.mark.parametrize("how, problem", [("nan", "1 NaN and 0 infinite values among 25088"),
                                          ("inf", "0 NaN and 1 infinite values among 25088")])
def test_nan_and_inf_tensors_from_a_roster_member_are_refused(how, problem):
    assert problem in _refusal(poisoned(good(), how)).problem


@pytest.mark.parametrize("array, said", [
    (good().astype(np.float64), "float64 [32, 16, 7, 7], expected float32 [1..32, 16, 7, 7]"),
    (good()[:, :, :6], "float32 [32, 16, 6, 7], expected float32 [1..32, 16, 7, 7]"),
    (np.zeros((33, 16, 7, 7), np.float32), "float32 [33, 16, 7, 7]"),  # more rows than a batch
    (np.zeros((32, 784), np.float32), "float32 [32, 784]"),  # same size, flattened
])
def test_a_float64_or_wrong_shape_fwd_is_a_refusal_not_a_torch_error(array, said):
    assert said in _refusal(array).problem


def test_an_int8_bwd_of_the_right_shape_is_refused():
    """Today's trainer checked only the gradient's shape and trained on int8 values."""
    grad = Expected("float32", (10,), rows=32)
    err = _refusal(poisoned(np.ones((32, 10), np.float32), "int8"), grad, kind="bwd")
    assert "int8 [32, 10], expected float32 [32, 10]" in err.problem


def test_labels_must_be_int64_rows():
    labels = Expected("int64", (), max_rows=32)
    assert received(_env(np.arange(8), "labels"), labels, "owner").dtype == torch.int64
    _refusal(np.arange(8).astype(np.float32), labels, kind="labels")


def test_weights_losses_and_json_are_never_non_finite():
    w = {"0.weight": torch.ones(3, 3), "0.bias": torch.tensor([0.0, math.inf, math.nan])}
    with pytest.raises(PoisonedInput, match="1 NaN and 1 infinite weights in 0.bias") as info:
        check_weights(w.items(), sender="trainer-2", kind="segment")
    assert info.value.to_doc() == {"sender": "trainer-2", "kind": "segment",
                                   "problem": info.value.problem}  # no step: a segment has none
    assert check_number(0.5, sender="owner", kind="loss", step=1, what="loss") == 0.5
    with pytest.raises(PoisonedInput, match="loss is nan"):
        check_number(math.nan, sender="owner", kind="loss", step=1, what="loss")
    with pytest.raises(ProtocolError, match="loss is inf"):
        Metrics.parse({"loss": math.inf, "correct": 3}, sender="trainer-2")
    with pytest.raises(ValueError, match=r"summary.json would hold a non-finite number at "
                                         r"per_epoch\[1\].loss"):
        json_text({"per_epoch": [{"loss": 1.0}, {"loss": math.nan}]}, what="summary.json")


def test_end_carries_a_refusal_and_a_plain_end_is_unchanged():
    assert End("training complete").to_doc() == {"reason": "training complete"}  # as ever
    refused = {"sender": "trainer-1", "kind": "fwd", "problem": "1 NaN", "step": 3}
    doc = End("refused input", refused=refused).to_doc()
    assert End.parse(doc, sender="trainer-2").refused == refused
    assert End.parse(End("x", stopped=True).to_doc()).stopped
    with pytest.raises(ProtocolError, match="refused must name"):
        End.parse({"reason": "x", "refused": {"sender": "a"}})


def _stopped_run_artefacts(cfg) -> dict:
    """What every cleanly stopped run leaves: summary with `stopped`, no model, a final
    checkpoint the owner saw, a log that verifies against it (and whose first checkpoint, the
    notary's early one, covers the roster alone)."""
    layout = RunLayout(cfg.run_dir)
    summary = json.loads(layout.summary.read_text())
    assert summary["test_accuracy"] is None and summary["model_file"] is None
    assert not layout.model.exists() and not layout.provenance.root.exists()
    keys = cfg.run_dir.parent.parent / "keys"
    r = verify_log(layout.log, owner=load_public(keys / "owner.pub"),
                   witnessed=[layout.checkpoint.read_text()])
    assert r.ok, r.failure
    assert r.per_kind.get("end", 0) >= 1  # the stop is in the log, signed
    with ProvenanceLog.open(layout.log) as plog:
        assert plog.checkpoint_at(0).size == 1  # signed right after the roster
    return summary


def test_a_trainer_refuses_huge_finite_gradients_and_the_run_stops_cleanly(tmp_path):
    """Trainer 2 (the last stage) sends finite gradients of 1e38 (float32, the right shape: they
    pass the receive check) at step 3: they overflow trainer 1's weight gradients, so trainer 1
    refuses them naming trainer 2 (before the review, it trained on them and the owner was
    named for the NaN gradient that followed), sends nothing non-finite on, tells the owner in
    a signed `end`, and every process leaves with EXIT_STOPPED once the notary closed the log.
    (The receive check's int8 refusal, which this run used to make, has its unit test.)"""
    path = write_config(tmp_path, run_id="poison-bwd", trainers=2, run={"max_steps": 12})
    with processes(path, evil="poison:bwd:3:huge", evil_as="trainer-2") as (cfg, tel, procs):
        codes = {n: p.wait(timeout=120) for n, p in procs.items() if n != "broker"}
    assert codes == {"notary": 0, "owner": 3, "trainer-1": 3, "trainer-2": 3}, codes
    summary = _stopped_run_artefacts(cfg)
    st = summary["stopped"]
    assert (st["by"], st["sender"], st["kind"], st["step"]) == ("trainer-1", "trainer-2", "bwd", 3)
    assert st["problem"].startswith("finite gradients up to 1e+38 made trainer-1's "), st
    # steps whose metrics reached the owner: 0..2, and 3's when the last stage's metrics came
    # before the refusal did; trainer 1 never sent a gradient of step 3 to the owner
    assert summary["steps"] in (3, 4), summary["steps"]
    assert "refused bwd of step 3 from trainer-2" in (tel / "trainer-1.jsonl").read_text()
    assert "from trainer-1" not in (tel / "owner.jsonl").read_text()  # the owner refused nothing


def test_the_owner_refuses_an_inf_gradient_and_clicooper_run_exits_3(tmp_path, monkeypatch,
                                                                      capsys):
    """Trainer 1 sends the owner gradients holding infinity at step 2: the owner refuses them
    naming trainer 1, stops the run, and `clicooper run` exits 3 with one line saying who sent
    what; the same id is then refused, offering --force."""
    import clicooper_bus.tools.launch as tr
    from clicooper_bus.tools.cli import main

    real = tr._commands

    def with_evil(cfg, config_path, audit=False):
        cmds = real(cfg, config_path, audit)
        return [(n, [sys.executable, "-m", "tests.evil_trainer", *c[3:]] if n == "trainer-1"
                 else c) for n, c in cmds]

    monkeypatch.setattr(tr, "_commands", with_evil)
    monkeypatch.setenv("EVIL_MODE", "poison:bwd:2:inf")
    path = write_config(tmp_path, run_id="poison-owner", trainers=2, run={"max_steps": 12})
    assert main(["run", "--config", str(path)]) == 3
    err = capsys.readouterr().err
    assert "STOPPED: owner refused bwd of step 2 from trainer-1: 0 NaN and 1 infinite" in err, err
    assert "log verified" in err
    from clicooper_bus.config import load_config

    summary = _stopped_run_artefacts(load_config(path))
    assert summary["stopped"]["by"] == "owner" and summary["stopped"]["sender"] == "trainer-1"
    assert main(["run", "--config", str(path)]) == 1
    assert "--force" in capsys.readouterr().err


# --- attribution to the input that caused it (review: blame landed on an honest party) --------

def test_rows_are_exact_by_the_plan():
    """The owner's batch order is a public function of n, batch_size, seed and epoch: every
    step's rows follow from the plan's train_size (every epoch the same: 32, 32, 32, 4)."""
    from clicooper_bus.ml.data import batch_rows, batches

    assert [batch_rows(100, 32, i) for i in range(batches(100, 32))] == [32, 32, 32, 4]
    assert batch_rows(0, 32, 7) is None  # a plan from before train_size: 1..32 as before
    for i in (-1, 4):
        with pytest.raises(ValueError, match=f"batch {i} is outside the 4 batches"):
            batch_rows(100, 32, i)
    assert ACT.exactly(None) is ACT and ACT.exactly(5).describe() == "float32 [5, 16, 7, 7]"


def _stage(messages, *, middle: bool = False):
    """A scripted stage (`tests.test_trainer_order`: Linear(3, 2), batches of 4) whose plan
    carries 10 training and 6 test samples: steps of 4, 4, 2 rows, test batches of 4, 2."""
    import dataclasses

    from tests.test_trainer_order import _last_stage

    t, bus = _last_stage(messages, in_flight=1)
    t.plan = dataclasses.replace(t.plan, train_size=10, test_size=6)
    if middle:  # trainer-1 of two: its gradients come from "next"
        t.last, t.next, t.kid["next"] = False, "next", NEXT
        t._routes()
    return t, bus


NEXT = "next0000"


def _msg(kind, step, body, sender=None):
    from tests.test_trainer_order import OWNER, PREV, _message

    return _message(kind, sender or (OWNER if kind == "labels" else PREV), step, body)


def _refused_by_stage(script, **kw) -> tuple[PoisonedInput, list]:
    t, bus = _stage(script, **kw)
    with pytest.raises(PoisonedInput) as info:
        t._serve()
    return info.value, bus.sent


def test_a_batch_a_row_short_is_refused_naming_the_activations_sender():
    """Review 1(b): trainer 1 sent 3 rows of a 4-row step and the last stage blamed the owner's
    labels; now the plan's rows are exact, so the activations' sender is named on receipt."""
    err, sent = _refused_by_stage([_msg("fwd", 0, torch.rand(3, 3))])
    assert (err.sender, err.kind, err.step) == ("prev", "fwd", 0)
    assert "float32 [3, 3], expected float32 [4, 3]" in err.problem and not sent
    # the epoch's last step is short by the plan (2 rows): it passes, and a 4-row one does not
    t, _ = _stage([])
    t.queued.clear()
    assert t._train_rows(t.expect_in, _msg("fwd", 2, torch.rand(2, 3)), "prev").rows == 2
    assert t._train_rows(t.expect_in, _msg("fwd", 5, torch.rand(2, 3)), "prev").rows == 2
    err, _ = _refused_by_stage([_msg("fwd", 0, torch.rand(4, 3)),
                                _msg("labels", 0, torch.tensor([0, 1]))])
    assert (err.sender, err.kind) == ("owner", "labels")  # labels short of the plan: the owner's


def test_huge_finite_gradients_are_refused_naming_their_sender_and_nothing_is_sent_on():
    """Review 1(a): finite 1e38 gradients made trainer 1's weights non-finite and the owner was
    blamed for the NaN that followed; now the stage refuses the gradients that did it."""
    err, sent = _refused_by_stage([_msg("fwd", 0, torch.full((4, 3), 10.0)),
                                   _msg("bwd", 0, torch.full((4, 2), 1e38), sender=NEXT)],
                                  middle=True)
    assert (err.sender, err.kind, err.step) == ("next", "bwd", 0), err.to_doc()
    assert err.problem.startswith("finite gradients up to 1e+38 made last's "), err.problem
    assert "non-finite" in err.problem
    assert [k for k, _, _ in sent] == ["fwd"]  # the forward went on; no gradient went back


def test_huge_finite_activations_are_refused_by_the_last_stage_naming_their_sender():
    """Logits from 1e38 activations: whatever turns non-finite (output, loss, weights, Adam's
    state) is the activations' doing, not the labels'; no metrics go to the owner."""
    err, sent = _refused_by_stage([_msg("fwd", 0, torch.full((4, 3), 1e38)),
                                   _msg("labels", 0, torch.tensor([0, 1, 1, 0]))])
    assert (err.sender, err.kind, err.step) == ("prev", "fwd", 0), err.to_doc()
    assert "finite activations up to 1e+38 made last's" in err.problem
    assert "metrics" not in [k for k, _, _ in sent]


def test_evaluation_batches_outside_the_protocol_are_refused_naming_the_predecessor():
    """Review 2: trainer 1 sent 40 evaluation batches mid-training, trainer 2 passed them on and
    the owner blamed trainer 2. An evaluation comes only after the epoch's last step, each
    test batch once, with the plan's rows."""
    mid = [_msg("fwd", 0, torch.rand(4, 3)), _msg("eval_fwd", 0, torch.rand(4, 3))]
    err, _ = _refused_by_stage(mid)
    assert (err.sender, err.kind) == ("prev", "eval_fwd") and "outside its window" in err.problem
    err, _ = _refused_by_stage([_msg("eval_fwd", 1000, torch.rand(4, 3))])
    assert "evaluation batch 1000 is outside the 2 batches of 6 samples" in err.problem
    y = [torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 1, 0]), torch.tensor([1, 0])]
    epoch = [m for s in range(3) for m in (_msg("fwd", s, torch.rand(len(y[s]), 3)),
                                            _msg("labels", s, y[s]))]
    err, sent = _refused_by_stage([*epoch, _msg("eval_fwd", 0, torch.rand(4, 3)),
                                   _msg("eval_fwd", 1, torch.rand(2, 3)),
                                   _msg("eval_fwd", 0, torch.rand(4, 3))])
    assert [m["step"] for k, _, m in sent if k == "eval_out"] == [0, 1]
    assert "evaluation batch 0 of epoch 0 a second time" in err.problem


def test_metrics_only_for_steps_sent_and_not_finished_and_not_after_the_end():
    """Review 2: NaN metrics for step 99999 after the ack made the owner exit 1. Metrics are a
    signed claim about a step: one for a step never sent, a second one, or one after the
    owner's end is refused naming the sender (a clean stop), never kept."""
    from types import SimpleNamespace

    from clicooper_bus.services.owner.books import Books

    books = Books(["trainer-1", "trainer-2"], {"k2": "trainer-2"}, None, "o", "spec", 1)

    def metrics(step):
        h = SimpleNamespace(sender="k2", step=step, kind="metrics")
        return SimpleNamespace(header=h, document=lambda: {"loss": 0.5, "correct": 3})

    def refusal(step) -> str:
        with pytest.raises(PoisonedInput) as info:
            books.on_metrics(metrics(step))
        assert (info.value.sender, info.value.kind) == ("trainer-2", "metrics")
        return info.value.problem

    assert "never sent" in refusal(0)
    books.sent = 2
    books.on_metrics(metrics(1))
    assert books.metrics[1].loss == 0.5
    assert "a second time" in refusal(1)
    assert "never sent" in refusal(99999)
    books.closed = True
    assert "after the owner ended training" in refusal(0)


def test_the_owner_tail_names_the_last_stage_for_huge_outputs():
    """Review 1(c): 1e38 outputs into the owner's tail were recorded as the owner's own loss
    (`sender: owner, kind: loss`); now they are the last stage's `fwd`."""
    from types import SimpleNamespace

    from clicooper_bus.ml.split import SegmentTrainer
    from clicooper_bus.services.owner.training import InFlight, Training

    torch.manual_seed(0)
    tr = Training.__new__(Training)
    sent: list = []
    tr.bus = SimpleNamespace(send_array=lambda kind, to, a, **m: sent.append((kind, a)))
    tr.setup = SimpleNamespace(tail=SegmentTrainer(torch.nn.Linear(3, 2), lr=0.1),
                               data=SimpleNamespace(y_train=np.array([0, 1, 0, 1])),
                               spec=SimpleNamespace(shapes={5: (3,)}),
                               plan=SimpleNamespace(tail=5))
    tr.books = SimpleNamespace(names={"k2": "trainer-2"}, metrics={})
    tr.last = "trainer-2"
    env = _msg("fwd", 0, torch.full((4, 3), 1e38), sender="k2")
    tr.receive = lambda *a, **k: env
    with pytest.raises(PoisonedInput) as info:
        tr._tail_step(InFlight(0, np.arange(4), {"step": 0}, (4, 3), np.array([0, 1, 0, 1])))
    err = info.value
    assert (err.sender, err.kind, err.step) == ("trainer-2", "fwd", 0), err.to_doc()
    assert "made the owner's tail" in err.problem and not tr.books.metrics
    assert all(bool(torch.isfinite(a).all()) for _, a in sent)  # nothing non-finite went back
