"""Each attack recovers what it should where the answer is known, and sees nothing outside its
threat model.

The synthetic dataset's label is a known function of the image (class template plus noise), so
on it: clustering must find the classes, decoders must reconstruct far above the mean image,
extraction must rebuild the model and name its classes, even behind expanded, permuted labels.
A broken attack (scrambled outputs, a wrong target order, an unmatched head) fails these.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clicooper_bus.ml.attacks import default_attacks, expand_per_trainer, select
from clicooper_bus.ml.attacks.base import FIELDS, ThreatModel, ThreatModelViolation, View
from clicooper_bus.ml.attacks.clustering import ClusteringAttack
from clicooper_bus.ml.attacks.extraction import ExtractionAttack
from clicooper_bus.ml.attacks.inversion import (
    ClassMeanAttack,
    SDARInversion,
    UnSplitInversion,
    WhiteBoxDecoder,
)
from clicooper_bus.ml.data import Dataset, synthetic
from clicooper_bus.ml.models import default_cuts, model_spec
from clicooper_bus.ml.reference import train_reference
from clicooper_bus.plan import Plan
from tests import attack_harness


def _train(data: Dataset, classes_out: int | None = None):
    spec = model_spec("small-cnn", data.input_shape, classes_out or data.classes)
    cuts = default_cuts(spec, 2)
    r = train_reference(data, spec, cuts, seed=0, epochs=1, batch_size=64, lr=1e-3,
                        evaluate_each_epoch=False)
    return Plan("small-cnn", data.input_shape, classes_out or data.classes, cuts, 0, 1e-3, 64), r


@pytest.fixture(scope="module")
def syn():
    data = synthetic(n_train=3000, n_test=2000, seed=0)
    plan, r = _train(data)
    return attack_harness.build(data, plan, r.segments, released=1000)


def test_clustering_finds_the_classes(syn):
    s = attack_harness.run(ClusteringAttack(), *syn)
    assert s["ari"] > 0.9 and s["success_rate"] == 1.0
    assert s["matched_accuracy_chance"] < 0.2 < 0.9 < s["matched_accuracy"]
    assert set(s["variants"]) >= {"plain", "standardised", "pca10", "standardised+pca50"}
    assert s["reference_raw_pixels"]["ari"] > 0.9  # the templates are separable in pixels


def test_whitebox_decoder_reconstructs(syn):
    s = attack_harness.run(WhiteBoxDecoder(targets=300, epochs=6), *syn)
    assert s["samples"] == 300
    assert s["ssim"] > s["floors"]["mean_image"] + 0.5, s


def test_decoder_over_an_unmatched_head_is_no_attack(syn):
    """The same decoder trained through a head that has nothing to do with the released
    activations scores near the floor: the white-box attack's score comes from the match."""
    knowledge, truth, audit = syn
    plan = knowledge.values["plan"]
    from clicooper_bus.ml.attacks.nets import head_clone

    other = head_clone(plan, seed=99).eval()
    unmatched = dict(knowledge.values, release=lambda x: other(x).detach())
    k2 = type(knowledge)(unmatched)
    s = attack_harness.run(WhiteBoxDecoder(targets=300, epochs=6), k2, truth, audit)
    matched = attack_harness.run(WhiteBoxDecoder(targets=300, epochs=6), *syn)
    assert s["ssim"] < matched["ssim"] - 0.3


def test_class_mean_attacker_reaches_the_class_mean_line(syn):
    s = attack_harness.run(ClassMeanAttack(targets=300), *syn)
    assert abs(s["ssim"] - s["floors"]["class_mean"]) < 0.05, s


def test_unsplit_and_sdar_beat_the_mean_image(syn):
    u = attack_harness.run(UnSplitInversion(targets=200, iters=200), *syn)
    assert u["ssim"] > u["floors"]["mean_image"] + 0.3, u
    d = attack_harness.run(SDARInversion(targets=300, epochs=6), *syn)
    assert d["ssim"] > d["floors"]["mean_image"] + 0.3, d


@pytest.mark.parametrize("labelled", [0, 10, 50])
def test_extraction_rebuilds_the_model(syn, labelled):
    s = attack_harness.run(ExtractionAttack(labelled), *syn)
    assert s["accuracy"] > 0.95 and s["owner_accuracy"] > 0.95 and s["chance"] < 0.2


def expand(y: np.ndarray, classes: int, gamma: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Label expansion as the privacy issue specifies it, done here until it lands: gamma
    pseudo-classes per class, a sample's drawn at random, and a secret permutation of all
    pseudo-classes. Returns the pseudo-labels and the true class of each pseudo-class."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(classes * gamma)
    pseudo = perm[y * gamma + rng.integers(0, gamma, len(y))]
    decode = np.empty(classes * gamma, np.int64)
    decode[perm] = np.arange(classes * gamma) // gamma
    return pseudo, decode


def test_extraction_sees_through_expanded_permuted_labels():
    data = synthetic(n_train=3000, n_test=2000, seed=1)
    pseudo, decode = expand(data.y_train, data.classes, 3, seed=7)
    assert (decode[pseudo] == data.y_train).all()
    trained = Dataset("synthetic", data.x_train, pseudo, data.x_test, data.y_test, 30)
    plan, r = _train(trained, classes_out=30)
    plan = Plan(plan.model, plan.input_shape, data.classes, plan.cuts, 0, 1e-3, 64)
    k, truth, audit = attack_harness.build(data, plan, r.segments, released=1500,
                                           received=pseudo, decode=decode)
    assert audit.settings["owner_accuracy_eval_half"] > 0.95
    for labelled in (0, 50):
        s = attack_harness.run(ExtractionAttack(labelled), k, truth, audit)
        assert s["accuracy"] > 0.9, (labelled, s)


# --- threat models ----------------------------------------------------------------------


def test_no_field_carries_the_truth():
    """There is no field for training labels, training images or the evaluation half: an
    attack cannot be handed them, whatever it declares."""
    for name in FIELDS:
        assert "train" not in name and "eval_images" not in name and "truth" not in name


def test_declared_views_only(syn):
    knowledge, _, _ = syn
    with_labels = {"class-mean", "sdar", "extraction-10", "extraction-50",
                   "completion-trainer-1", "completion-trainer-2", "completion-colluding"}
    with_release = {"whitebox-decoder", "class-mean"}
    for attack in expand_per_trainer(default_attacks(), ["trainer-1", "trainer-2"]):
        view = knowledge.view(attack.threat)
        assert view.fields == attack.threat.sees
        assert ("aux_labels" in view.fields) == (attack.name in with_labels), attack.name
        assert ("release" in view.fields) == (attack.name in with_release), attack.name
        for undeclared in set(FIELDS) - attack.threat.sees:
            with pytest.raises(ThreatModelViolation, match=undeclared):
                getattr(view, undeclared)
        if attack.name.startswith("extraction-") and attack.name[-1].isdigit():
            n = int(attack.name.split("-")[1])
            assert len(view.aux_labels) == n  # only the first n labels, not all
    aux = knowledge.values["aux_images"]
    assert len(aux) == 1000  # the first half of a 2,000-image test split, never the second


def test_views_are_private_copies(syn):
    """An attack cannot reach past its fields through a view's arrays, nor change what the
    auditor scores against or what the next attack gets."""
    knowledge, truth, _ = syn
    view = knowledge.view(ExtractionAttack(10).threat)
    assert view.aux_labels.base is None and not view.aux_labels.flags.writeable
    assert not view.released.flags.writeable
    view.aux_images.zero_()
    assert float(knowledge.values["aux_images"].abs().sum()) > 0
    assert float(abs(truth.aux).sum()) > 0
    stage = view.stages[0]
    for p in stage.parameters():
        p.data.zero_()
    assert any(float(p.detach().abs().sum()) > 0 for p in knowledge.values["stages"][0].parameters())
    release = knowledge.view(WhiteBoxDecoder().threat).release
    assert release is not knowledge.values["release"]


def test_an_attack_reading_beyond_its_threat_model_fails(syn):
    knowledge, _, _ = syn

    class Greedy(ClusteringAttack):
        def run(self, view, track=None):
            return view.aux_labels  # the clustering attacker has no labels

    with pytest.raises(ThreatModelViolation):
        Greedy().run(knowledge.view(Greedy.threat))


def test_threat_model_declarations_are_checked():
    with pytest.raises(ValueError, match="unknown fields"):
        ThreatModel("x", frozenset({"training_labels"}), "")
    with pytest.raises(ValueError, match="aux_labels"):
        ThreatModel("x", frozenset({"aux_images"}), "", aux_labels=10)
    v = View(ThreatModel("x", frozenset({"plan"}), ""), {"plan": 1, "released": 2})
    assert v.plan == 1 and v.fields == {"plan"}


def test_select_names_attacks():
    assert [a.name for a in select("unsplit,clustering")] == ["clustering", "unsplit"]
    with pytest.raises(Exception, match="unknown attack"):
        select("clustering,telepathy")


def test_decoder_shapes():
    from clicooper_bus.ml.attacks.nets import Decoder

    for act in ((32, 7, 7), (64, 14, 14), (128,)):
        out = Decoder(act, (1, 28, 28))(torch.zeros(2, *act)).detach()
        assert out.shape == (2, 1, 28, 28) and float(out.min()) >= 0 and float(out.max()) <= 1
