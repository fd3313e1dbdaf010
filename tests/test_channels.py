"""Label inference on every channel a trainer receives: gradients, linking across epochs, a
channel with no label information, and the per-trainer threat model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from clicooper_bus.audit import families
from clicooper_bus.ml.attacks.base import Knowledge, ThreatModelViolation
from clicooper_bus.ml.attacks.channels import ChannelInference, Rows, received_field
from clicooper_bus.plan import Plan

K, N, EPOCHS = 10, 400, 5
PLAN = Plan("small-cnn", (1, 28, 28), K, (6,), 0, 1e-3, 40)


def _labels(n=N, seed=0):
    return np.random.default_rng(seed).integers(0, K, n)


def _released(labels, sigma, d=32, seed=1):
    """Each sample released once per epoch: its class centre plus fresh noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, d))
    ids = np.tile(np.arange(len(labels)), EPOCHS)
    epochs = np.repeat(np.arange(EPOCHS), len(labels))
    x = centres[labels[ids]] + sigma * rng.normal(size=(len(ids), d))
    return Rows("fwd", "train", ids, epochs, x.astype(np.float32))


def _scored(trainer_rows: dict[str, Rows], labels, trainer="trainer-1"):
    attack = ChannelInference().for_trainer(trainer)
    know = Knowledge({"plan": PLAN, received_field(trainer): trainer_rows})
    out = attack.run(know.view(attack.threat))
    truth = SimpleNamespace(train_labels=labels, test_labels=labels)
    audit = SimpleNamespace(references={"channels_seen": {trainer: {"fwd": N * EPOCHS}}})
    return families.family("channels").score(attack, out, truth, audit, None)


def test_linking_releases_across_epochs_beats_single_releases():
    labels = _labels()
    row = _scored({"fwd": _released(labels, sigma=2.2)}, labels)
    single, linked = row["channels"]["fwd"]["ari"], row["channels"]["fwd+linked"]["ari"]
    assert linked >= single + 0.2, (single, linked)
    assert row["channel"] == "fwd+linked" and row["channels"]["fwd+linked"]["releases_per_sample"] == EPOCHS


def test_gradient_rows_give_the_labels_by_their_direction():
    """The owner's tail sends back V^T (p - e_y) / B per sample: cosine k-means recovers y."""
    labels = _labels()
    rng = np.random.default_rng(2)
    v = rng.normal(size=(K, 64))
    p = rng.dirichlet(np.ones(K) * 5, size=N)
    grads = ((p - np.eye(K)[labels]) @ v / 40).astype(np.float32)
    rows = Rows("bwd", "train", np.arange(N), np.zeros(N, int), grads)
    row = _scored({"bwd": rows}, labels)
    assert row["channels"]["bwd"]["ari"] >= 0.9 and row["channel"].startswith("bwd")


def test_a_channel_without_label_information_scores_near_chance():
    labels = _labels()
    rng = np.random.default_rng(3)
    rows = Rows("fwd", "train", np.tile(np.arange(N), 2), np.repeat([0, 1], N),
                rng.normal(size=(2 * N, 32)).astype(np.float32))
    row = _scored({"fwd": rows}, labels)
    assert abs(row["ari"]) < 0.05
    assert row["matched_accuracy"] - row["matched_accuracy_chance"] < 0.1


def test_received_labels_are_scored_as_they_are():
    labels = _labels()
    rows = Rows("labels", "train", np.arange(N), np.zeros(N, int), labels[:, None])
    row = _scored({"labels": rows}, labels)
    assert row["channel"] == "labels" and row["ari"] == pytest.approx(1.0)


def test_a_non_colluding_trainer_sees_only_its_own_channels():
    labels = _labels()
    know = Knowledge({"plan": PLAN, received_field("trainer-1"): {"fwd": _released(labels, 1.0)},
                      received_field("trainer-2"): {"bwd": _released(labels, 1.0)}})
    attack = ChannelInference().for_trainer("trainer-2")
    view = know.view(attack.threat)
    assert view.fields == {"plan", received_field("trainer-2")}
    with pytest.raises(ThreatModelViolation):
        getattr(view, received_field("trainer-1"))
    assert "non-colluding" in attack.threat.party


@pytest.mark.slow
def test_an_owner_tail_run_leaks_its_labels_through_the_gradients(tmp_path):
    """Over the bus, with the owner keeping the last layer (U-shaped split) and noise on the
    release: the last trainer's gradient channel still gives the training labels."""
    from clicooper_bus.audit.auditor import audit_run
    from clicooper_bus.ml.attacks import select
    from clicooper_bus.tools.run import run
    from tests.busrun import write_config

    path = write_config(tmp_path, run_id="tail", trainers=2, run={"epochs": 2},
                        privacy={"owner_tail": True, "mechanism": "gaussian",
                                 "noise_multiplier": 0.3, "clip": 1.0},
                        log={"retention": "fwd=sample:8,bwd=all,*=all"})
    assert run(str(path), echo=False, timeout_s=300, free_ports=False) == 0
    audit = audit_run(tmp_path / "runs" / "tail", attacks=select("channels"))
    rows = {r["trainer"]: r for r in audit.results}
    last = rows["trainer-2"]["channels"]
    assert last["bwd"]["ari"] >= 0.9, last["bwd"]
    assert last["bwd"]["samples"] > 0 and last["bwd"]["seen"] >= last["bwd"]["samples"]
    assert set(rows) == {"trainer-1", "trainer-2", "all trainers"}


def test_colluding_trainers_join_what_they_received_of_each_sample():
    """Two trainers each see a noisy copy of the same releases: joined, the noise halves."""
    labels = _labels()
    a, b = _released(labels, sigma=0.0, seed=1), _released(labels, sigma=0.0, seed=1)
    b.x = (b.x + np.random.default_rng(9).normal(scale=2.2, size=b.x.shape)).astype(np.float32)
    a.x = (a.x + np.random.default_rng(8).normal(scale=2.2, size=a.x.shape)).astype(np.float32)
    template = ChannelInference()
    attacks = template.expand(["trainer-1", "trainer-2"])
    assert [x.name for x in attacks] == ["channels-trainer-1", "channels-trainer-2",
                                         "channels-colluding"]
    colluding = attacks[-1]
    know = Knowledge({"plan": PLAN, received_field("trainer-1"): {"fwd": a},
                      received_field("trainer-2"): {"fwd": b}})
    view = know.view(colluding.threat)
    assert view.fields == {"plan", received_field("trainer-1"), received_field("trainer-2")}
    out = colluding.run(view)
    truth = SimpleNamespace(train_labels=labels, test_labels=labels)
    audit = SimpleNamespace(references={"channels_seen": {"trainer-1": {"fwd": N * EPOCHS}}})
    row = families.family("channels").score(colluding, out, truth, audit, None)
    alone = _scored({"fwd": a}, labels)["channels"]["fwd"]["ari"]
    assert row["channels"]["joined"]["ari"] > alone + 0.05, (row["channels"], alone)
    assert row["trainer"] == "all trainers" and row["seen"] == N * EPOCHS


def test_a_channel_with_too_few_retained_samples_is_left_out():
    labels = _labels()
    rows = Rows("bwd", "train", np.arange(5), np.zeros(5, int),
                np.random.default_rng(4).normal(size=(5, 8)).astype(np.float32))
    row = _scored({"bwd": rows}, labels)
    assert row["channel"] is None and row["channels"] == {} and row["note"] == "no retained channel"
