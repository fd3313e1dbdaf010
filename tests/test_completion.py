"""Model completion (Fu et al. 2022) by each trainer on its own stage, and colluding: it labels
the rows a trainer received where the answer is known, sees only that trainer's channels and
stage, the colluding row is never weaker than a member's, and without evaluation traffic of
the labelled images it simulates the layers before the stage.

The channels are built in process from a reference-trained small CNN, as the log would hold
them for an undefended run (every training row released in two epochs, every test image
evaluated through the chain): no bus run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clicooper_bus.audit import families
from clicooper_bus.audit.auditor import Audit, Truth
from clicooper_bus.audit.family_completion import lead
from clicooper_bus.ml.attacks import default_attacks, select
from clicooper_bus.ml.attacks.base import Knowledge, ThreatModelViolation
from clicooper_bus.ml.attacks.channels import received_field, stage_field
from clicooper_bus.ml.attacks.completion import LABELLED, ROWS, ModelCompletion
from clicooper_bus.ml.attacks.linking import Rows
from clicooper_bus.ml.attacks.nets import apply
from clicooper_bus.ml.data import synthetic, to_float
from clicooper_bus.ml.models import default_cuts, model_spec
from clicooper_bus.ml.reference import train_reference
from clicooper_bus.plan import Plan
from clicooper_bus.tlog.logverify import VerifyResult

STAGES = ["trainer-1", "trainer-2"]


def _rows(kind: str, split: str, ids: np.ndarray, epoch: int, acts) -> Rows:
    x = acts.reshape(len(acts), -1).numpy().astype(np.float32)
    return Rows(kind, split, ids, np.full(len(ids), epoch), x)


def _twice(kind: str, ids: np.ndarray, acts) -> Rows:
    """Every row released in epochs 0 and 1 (the same activations: an undefended head)."""
    a, b = _rows(kind, "train", ids, 0, acts), _rows(kind, "train", ids, 1, acts)
    return Rows(kind, "train", np.concatenate([a.ids, b.ids]), np.concatenate([a.epochs, b.epochs]),
                np.concatenate([a.x, b.x]))


@pytest.fixture(scope="module")
def run():
    """(knowledge, truth, audit): two trainers' channels and stages, aux data and labels."""
    data = synthetic(n_train=2500, n_test=2000, seed=0)
    spec = model_spec("small-cnn", data.input_shape, data.classes)
    cuts = default_cuts(spec, 2)
    r = train_reference(data, spec, cuts, seed=0, epochs=1, batch_size=64, lr=1e-3,
                        evaluate_each_epoch=False)
    plan = Plan("small-cnn", data.input_shape, data.classes, cuts, 0, 1e-3, 64)
    head, s1, s2 = (s.eval() for s in r.segments)
    x, xt = to_float(data.x_train), to_float(data.x_test)
    a0, e0 = apply(head, x), apply(head, xt)
    a1, e1 = apply(s1, a0), apply(s1, e0)
    ids, tid = np.arange(len(x)), np.arange(len(xt))
    half = len(xt) // 2
    know = Knowledge({
        "plan": plan, "aux_images": xt[:half], "aux_labels": data.y_test[:half],
        received_field("trainer-1"): {"fwd": _twice("fwd", ids, a0),
                                      "eval_fwd": _rows("eval_fwd", "test", tid, 1, e0)},
        received_field("trainer-2"): {"fwd": _twice("fwd", ids, a1),
                                      "eval_fwd": _rows("eval_fwd", "test", tid, 1, e1)},
        stage_field("trainer-1"): s1, stage_field("trainer-2"): s2, "stages": [s1, s2]})
    truth = Truth(ids, data.x_train / 255.0, data.y_train, xt[half:], data.y_test[half:],
                  xt[:half].numpy(), data.y_test[:half], data.y_train, data.y_test)
    audit = Audit(Path("."), VerifyResult(log="in-process", ok=True), classes=data.classes)
    audit.references["channels_seen"] = {s: {"fwd": 2 * len(x), "eval_fwd": len(xt)}
                                         for s in STAGES}
    return know, truth, audit


def _scored(attack, know, truth, audit) -> dict:
    out = attack.run(know.view(attack.threat))
    row = {"name": attack.name, "family": attack.family,
           **families.of(attack).score(attack, out, truth, audit, None)}
    audit.results.append(row)
    return row


def test_completion_is_in_the_suite_per_trainer_and_colluding():
    assert any(isinstance(a, ModelCompletion) for a in default_attacks())
    names = [a.name for a in select("completion")[0].expand(STAGES)]
    assert names == ["completion-trainer-1", "completion-trainer-2", "completion-colluding"]


def test_a_non_colluding_completion_sees_its_own_trainer_only(run):
    know, _, _ = run
    attack = ModelCompletion().expand(STAGES)[1]
    view = know.view(attack.threat)
    assert view.fields == {"plan", received_field("trainer-2"), stage_field("trainer-2"),
                           "aux_images", "aux_labels"}
    assert len(view.aux_labels) == LABELLED == 50  # the first 50 labels, not all
    for other in (received_field("trainer-1"), stage_field("trainer-1"), "stages", "released"):
        with pytest.raises(ThreatModelViolation):
            getattr(view, other)
    assert "non-colluding" in attack.threat.party


def test_completion_labels_the_rows_each_trainer_received(run):
    """Undefended: each trainer's completed top labels its received rows. Measured accuracy
    1.000 on every channel of every party (the synthetic classes are separable); the own-data
    baseline with 50 labels is 1.000 too, so the pin is absolute, far above chance (about
    0.11)."""
    know, truth, audit = run
    audit.results.clear()
    rows = [_scored(a, know, truth, audit) for a in ModelCompletion().expand(STAGES)]
    for row in rows:
        assert row["accuracy"] >= 0.95 and row["accuracy"] > row["chance"] + 0.7, row
        assert families.family("completion").verdict(row)[0] == families.LEAKS
    one, two, colluding = rows
    for row in (one, two):
        assert row["how"].startswith("known plaintext: its received evaluation rows of 50")
        assert row["labelled"] == 50
        ch = row["channels"]
        assert set(ch) == {"fwd", "fwd+linked", "eval_fwd"}
        # rows used beside rows received: at most ROWS, each sample's latest release
        assert ch["fwd"]["samples"] == min(ROWS, 2500) and ch["fwd"]["seen"] == 5000
        assert ch["fwd+linked"]["releases_per_sample"] == 2.0
        assert ch["eval_fwd"]["samples"] == 1000  # the private half of the test split only
    assert colluding["trainer"] == "all trainers"
    assert all(colluding["accuracy"] >= r["accuracy"] for r in (one, two))
    assert all(lead(colluding) >= lead(r) for r in (one, two))
    assert {"trainer-1:fwd", "trainer-2:fwd"} <= set(colluding["channels"])


def test_the_colluding_row_is_never_below_a_member_s(run):
    """A colluding chain made useless (its first stage zeroed) still reports the members'
    own completions: colluders hold at least what each of them holds."""
    know, truth, audit = run
    audit.results.clear()
    *alone, colluding = ModelCompletion().expand(STAGES)
    members = [_scored(a, know, truth, audit) for a in alone]
    broken = Knowledge(dict(know.values))
    dead = getattr(know.view(colluding.threat), stage_field("trainer-1"))
    for p in dead.parameters():
        p.data.zero_()
    broken.values[stage_field("trainer-1")] = dead
    row = _scored(colluding, broken, truth, audit)
    assert row["channels"]["fwd"]["accuracy"] < 0.5  # its own chain labels nothing
    assert row["accuracy"] >= max(m["accuracy"] for m in members)
    assert lead(row) >= max(lead(m) for m in members)
    assert row["channel"].split(":")[0] in STAGES


def test_without_evaluation_traffic_it_simulates_the_layers_before_its_stage(run):
    """Evaluation on the owner only: the first trainer has no activation of a labelled image,
    so it trains a head simulator on the aux images (matched to its received rows, no labels)
    and completes its stage through it. Measured accuracy 1.000 (chance 0.112), with 300 or
    1,000 aux images."""
    know, truth, audit = run
    values = dict(know.values)
    values[received_field("trainer-1")] = {"fwd": know.values[received_field("trainer-1")]["fwd"]}
    # 300 aux images are enough for the simulator here, and a third of the time of 1,000
    values["aux_images"], values["aux_labels"] = values["aux_images"][:300], \
        values["aux_labels"][:300]
    attack = ModelCompletion().expand(STAGES)[0]
    row = _scored(attack, Knowledge(values), truth, audit)
    assert "simulator" in row["how"] and set(row["channels"]) == {"fwd", "fwd+linked"}
    assert row["accuracy"] >= 0.9, row


def test_simulated_channels_are_completed_with_the_same_top(run):
    """The white-box simulated streams (`fwd (simulated)`, `eval_fwd (simulated)`) are labelled
    by the same completed top as the received rows, and counted against the rows received."""
    from clicooper_bus.ml.attacks.channels import simulated

    know, truth, audit = run
    audit.results.clear()
    mine = dict(know.values[received_field("trainer-1")])
    sim = {simulated(k): Rows(simulated(k), r.split, r.ids, r.epochs, r.x)
           for k, r in mine.items()}
    values = {**know.values, received_field("trainer-1"): {**mine, **sim}}
    attack = ModelCompletion("trainer-1", 1)
    row = _scored(attack, Knowledge(values), truth, audit)
    ch = row["channels"]
    assert {"fwd (simulated)", "fwd (simulated)+linked", "eval_fwd (simulated)"} <= set(ch)
    assert ch["fwd (simulated)"]["accuracy"] == ch["fwd"]["accuracy"]
    assert ch["fwd (simulated)"]["seen"] == ch["fwd"]["seen"] == 5000
    # a simulated channel heading the row is never read as rows the trainer received
    from clicooper_bus.audit.family_completion import _headline

    top = {**row, "channel": "fwd (simulated)+linked", **ch["fwd (simulated)+linked"]}
    assert "simulated white-box with the final weights" in _headline(top)[0]
    assert "received" in _headline({**row, "channel": "fwd", **ch["fwd"]})[0]


def test_the_simulator_reads_out_a_stage_that_ends_in_feature_maps():
    """With the owner's tail at the offloading cut, trainer-1's stage ends in conv feature maps
    (conv2, relu, pool: N x 32 x h x w): the simulator's readout takes them flattened. It
    crashed the audit (mat1 and mat2 shapes cannot be multiplied) of every run with an owner
    tail and owner-side evaluation at that cut."""
    from types import SimpleNamespace

    from clicooper_bus.ml.attacks.base import no_progress
    from clicooper_bus.ml.attacks.inversion import train_simulator
    from clicooper_bus.ml.build import build_segments

    data = synthetic(n_train=64, n_test=64, seed=0)
    spec = model_spec("small-cnn", data.input_shape, data.classes)
    head, stage, *_ = build_segments(spec, (3, 6, 9), 0)
    plan = Plan("small-cnn", data.input_shape, data.classes, (3, 6), 0, 1e-3, 32, tail=9)
    x = to_float(data.x_test)
    assert apply(stage, apply(head, x[:2])).dim() == 4  # the stage's output is not flat
    view = SimpleNamespace(plan=plan, aux_images=x, stages=[stage],
                           released=apply(head, to_float(data.x_train)).numpy())
    sim, _ = train_simulator(view, epochs=1, adv=0.1, seed=0, track=no_progress, labels=None,
                             decoder=False, desc="test")
    assert tuple(apply(sim, x[:4]).shape[1:]) == tuple(view.released.shape[1:])
