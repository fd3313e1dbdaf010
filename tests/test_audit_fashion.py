"""Acceptance of the attack suite on the real task: an undefended small CNN trained two
epochs on half of Fashion-MNIST's training set over the bus, audited by an auditor following
the run, and extraction behind label expansion (gamma 10, permuted) trained in process. The
pins keep an attack from silently weakening; the measured values are in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clicooper_bus.ml.data import FASHION_DIR, Dataset, load_fashion
from clicooper_bus.ml.models import check_cuts, model_spec
from clicooper_bus.ml.reference import train_reference
from clicooper_bus.plan import Plan
from clicooper_bus.tools.run import run
from tests import attack_harness
from tests.busrun import write_config
from tests.test_attacks import expand

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)")]


@pytest.fixture(scope="module")
def fashion_run(tmp_path_factory) -> tuple[dict, Path]:
    """The audited run: (its report, its run directory)."""
    tmp = tmp_path_factory.mktemp("fashion")
    # half the training set, two epochs: the pins below hold with margin, in a third of the time;
    # cut after both convolutions, where the owner computes them and a step costs half what it
    # costs at the offloading default (the suite's time; the demo audits the default's cut,
    # and tests/test_channels.py attacks it over the bus)
    cfg = write_config(tmp, run_id="fm3", trainers=2,
                       run={"epochs": 2, "batch_size": 128, "threads": 2},
                       data={"name": "fashion-mnist", "train_limit": 30000},
                       model={"cuts": [6, 8]})
    # the attacks pinned below. The channel attacks on this data are the demo's (and
    # tests/test_channels.py's); the white-box decoder, UnSplit and SDAR (39 s, 72 s and 63 s
    # here) are pinned in tests/test_attacks.py: this keeps the run within the suite's time
    attacks = "clustering,class-mean,extraction-50"
    assert run(str(cfg), echo=False, free_ports=False, timeout_s=900, audit=attacks) == 0
    doc = json.loads((tmp / "runs" / "fm3" / "audit" / "report.json").read_text())
    print(json.dumps({a["name"]: {k: a[k] for k in ("ari", "ssim", "accuracy") if k in a}
                      for a in doc["attacks"]}))
    return doc, tmp / "runs" / "fm3"


@pytest.fixture(scope="module")
def report(fashion_run) -> dict:
    return fashion_run[0]


def _attack(doc: dict, name: str) -> dict:
    return next(a for a in doc["attacks"] if a["name"] == name)


def test_undefended_run_leaks_as_measured(report):
    assert report["integrity"]["ok"] and not report["forced"]
    assert report["settings"]["released_samples"] >= 2000
    clus = _attack(report, "clustering")
    assert clus["ari"] >= 0.38  # measured here 0.45 (two epochs; 0.48 after three); raw pixels 0.36
    assert clus["matched_accuracy"] > clus["matched_accuracy_chance"] + 0.3
    cm = _attack(report, "class-mean")
    floors = cm["floors"]
    assert 0.1 < floors["mean_image"] < 0.17 and floors["black"] < 0.08  # 0.13, 0.05
    assert abs(cm["ssim"] - floors["class_mean"]) <= 0.03  # the class-mean line, 0.36
    ext = _attack(report, "extraction-50")
    assert ext["accuracy"] >= ext["owner_accuracy"] - 0.02


def test_the_delivered_model_reproduces_the_runs_accuracy(fashion_run, tmp_path):
    """A Fashion-MNIST model as a user loads it (issue 14, item 5): `load_model` on the run
    directory, `predict` on the test set as a user's npz, the summary's accuracy exactly."""
    import numpy as np

    import clicooper_bus
    from clicooper_bus.ml.delivered import predict

    run_dir = fashion_run[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    data = load_fashion()
    npz = tmp_path / "test.npz"
    np.savez(npz, x_test=data.x_test[:, 0], y_test=data.y_test)
    p = predict(clicooper_bus.load_model(run_dir), npz)
    # measured 0.8498 here since dropout draws per step (0.85+ on the CI host: other kernels)
    assert p.accuracy == summary["test_accuracy"] > 0.84, (p.accuracy, summary["test_accuracy"])


def test_extraction_behind_label_expansion():
    data = load_fashion()
    pseudo, decode = expand(data.y_train, 10, 10, seed=3)
    n = 30_000  # half the training set, at twice the learning rate: half the test's time
    trained = Dataset("fashion-mnist", data.x_train[:n], pseudo[:n], data.x_test, data.y_test,
                      100)
    spec = model_spec("small-cnn", data.input_shape, 100)
    # after both convolutions, where the 0.893 below was measured: the extraction attack's
    # head simulator regresses on 1,568 values a release there, twice as fast as at the
    # offloading default's 3,136 (this test is about the label expansion, not the cut)
    cuts = check_cuts(spec, (6, 8, 9), 3)
    r = train_reference(trained, spec, cuts, seed=0, epochs=2, batch_size=128, lr=2e-3,
                        evaluate_each_epoch=False)
    plan = Plan("small-cnn", data.input_shape, 10, cuts, 0, 1e-3, 128)
    k, truth, audit = attack_harness.build(data, plan, r.segments, released=2048,
                                           received=pseudo, decode=decode)
    owner = audit.settings["owner_accuracy_eval_half"]
    assert owner > 0.83  # gamma 10: 0.845 measured (0.878 to 0.893 after 3 full epochs)
    from clicooper_bus.ml.attacks.extraction import ExtractionAttack

    s50 = attack_harness.run(ExtractionAttack(50), k, truth, audit)
    assert s50["accuracy"] >= owner - 0.02, (s50, owner)  # measured 0.839 vs 0.845
    s0 = attack_harness.run(ExtractionAttack(0), k, truth, audit)
    print(f"owner {owner:.3f}; extraction, no labels {s0['accuracy']:.3f}; 50 labels "
          f"{s50['accuracy']:.3f}")
    assert s0["accuracy"] > s0["chance"] + 0.2
