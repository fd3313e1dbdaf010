"""Poisoned input is refused at the receiver (issue 17 item 4): every tensor a process receives
is checked against the dtype and shape the signed plan implies, and for finite values, before
use; a refusal names the sender, the step and the problem, and the run stops cleanly with
`summary.json` saying why, no model saved, the log verifiable. The cases of the issue each have
a test of the receive check; two live runs prove the clean stop, one refused by a trainer, one
by the owner (through `clicooper run`, exit 3)."""

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


def test_a_trainer_refuses_an_int8_bwd_and_the_run_stops_cleanly(tmp_path):
    """Trainer 2 (the last stage) sends int8 gradients of the right shape at step 3: trainer 1
    refuses them naming trainer 2, tells the owner in a signed `end`, and every process leaves
    with EXIT_STOPPED once the notary closed the log."""
    path = write_config(tmp_path, run_id="poison-bwd", trainers=2, run={"max_steps": 12})
    with processes(path, evil="poison:bwd:3:int8", evil_as="trainer-2") as (cfg, tel, procs):
        codes = {n: p.wait(timeout=120) for n, p in procs.items() if n != "broker"}
    assert codes == {"notary": 0, "owner": 3, "trainer-1": 3, "trainer-2": 3}, codes
    summary = _stopped_run_artefacts(cfg)
    st = summary["stopped"]
    assert (st["by"], st["sender"], st["kind"], st["step"]) == ("trainer-1", "trainer-2", "bwd", 3)
    assert "int8 [32, 1568], expected float32 [32, 1568]" in st["problem"], st  # fc1's input
    # steps whose metrics reached the owner: 0..2, and 3's when the last stage's metrics came
    # before the refusal did; trainer 1 never trained on step 3's gradients
    assert summary["steps"] in (3, 4), summary["steps"]
    assert "refused bwd of step 3 from trainer-2" in (tel / "trainer-1.jsonl").read_text()


def test_the_owner_refuses_an_inf_gradient_and_clicooper_run_exits_3(tmp_path, monkeypatch,
                                                                      capsys):
    """Trainer 1 sends the owner gradients holding infinity at step 2: the owner refuses them
    naming trainer 1, stops the run, and `clicooper run` exits 3 with one line saying who sent
    what; the same id is then refused, offering --force."""
    import clicooper_bus.tools.run as tr
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
