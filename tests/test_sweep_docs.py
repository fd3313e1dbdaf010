"""The sweep's documents judge the strongest view (issue 13): label inference over every channel
a trainer received, for one trainer alone and for all trainers colluding, and extraction as its
gain over the attackers' own-data baseline. A run that hides its released activations but whose
gradients give the labels away must not read as meeting the clustering target."""

from __future__ import annotations

import pytest

from clicooper_bus.tools.sweep_docs import extraction_gain, judge, label_cell
from clicooper_bus.tools.sweep_rows import aggregate, label_inference

ALONE = {"party": "trainer-2, alone (non-colluding)"}
TOGETHER = {"party": "all trainers colluding (trainer-1, trainer-2)"}


def _attack(family, name, ari, matched, chance, threat, **kw):
    return {"family": family, "name": name, "ari": ari, "matched_accuracy": matched,
            "matched_accuracy_chance": chance, "threat_model": threat, **kw}


ATTACKS = [
    _attack("clustering", "clustering", 0.02, 0.15, 0.12, {"party": "trainer-1 (first stage), alone"}),
    _attack("channels", "channels-trainer-2", 0.91, 0.95, 0.11, ALONE, trainer="trainer-2",
            channel="bwd"),
    _attack("completion", "completion-colluding", 0.95, 0.97, 0.10, TOGETHER,
            trainer="all trainers", channel="fwd"),
    {"family": "extraction", "name": "extraction-50", "accuracy": 0.9, "threat_model": TOGETHER},
]


def test_the_strongest_label_inference_is_taken_over_every_channel_per_threat_model():
    li = label_inference(ATTACKS)
    assert li["label_alone"] == {"ari": 0.91, "matched_over_chance": pytest.approx(0.84)}
    assert li["label_alone_where"] == "trainer-2: bwd (channels-trainer-2)"
    # colluding trainers can do whatever one of them can, and more
    assert li["label_colluding"] == {"ari": 0.95, "matched_over_chance": pytest.approx(0.87)}
    assert li["label_colluding_where"] == "all trainers: fwd (completion-colluding)"
    assert label_inference(ATTACKS[3:]) == {"label_alone": {"ari": None, "matched_over_chance":
                                                            None}, "label_alone_where": None,
                                            "label_colluding": {"ari": None,
                                                                "matched_over_chance": None},
                                            "label_colluding_where": None}


def _row(**kw):
    r = {"accuracy": 0.88, "ari": 0.01, "ari_variant": "plain", "success": 0.0,
         "ssim_over_class_mean": 0.0, "extraction": {"extraction-50": 0.70},
         "extraction_baseline": {"extraction-50": 0.65}, "extraction_chance": 0.1,
         "epsilon": 50.0, "delta": 1e-5, "adjacency": "replace-one: x", "epsilon_covers": "the run",
         "label_colluding": {"ari": 0.02, "matched_over_chance": 0.03},
         "label_colluding_where": "trainer-2: bwd (channels-trainer-2)"}
    r.update(kw)
    return r


def test_the_targets_are_judged_on_every_channel_and_the_own_data_baseline():
    base = _row(accuracy=0.90, epsilon=None)
    assert [ok for _, _, ok in judge(_row(), base)] == [True] * 6
    # the first stage's activations hide the labels (ARI 0.01), its gradients do not
    leaky = {t: ok for t, _, ok in judge(_row(label_colluding={"ari": 0.9,
                                                               "matched_over_chance": 0.8}), base)}
    assert [t for t, ok in leaky.items() if not ok] == [
        "label inference over every channel, trainers colluding: ARI <= 0.05",
        "... matched accuracy <= chance + 5 points"]
    # 0.70 is 60 points over chance but only 5 over what 50 labels give on the aux data alone
    assert extraction_gain(_row()) == pytest.approx(0.05)
    far = judge(_row(extraction={"extraction-50": 0.80}), base)
    assert [ok for t, _, ok in far if t.startswith("extraction")] == [False]
    unmeasured = judge(_row(label_colluding={"ari": None, "matched_over_chance": None},
                            extraction_baseline={}), base)
    assert not [t for t, _, _ in unmeasured if "label" in t or "extraction" in t]


def test_the_label_cell_carries_the_range_over_seeds():
    rows = [_row(name="d", epochs=3, label_colluding={"ari": a, "matched_over_chance": 0.1})
            for a in (0.1, 0.3)]
    r = aggregate("d", rows)
    assert label_cell(r, "label_colluding") == (
        "ARI 0.200 (0.100 to 0.300), matched accuracy +0.100 over chance "
        "(trainer-2: bwd (channels-trainer-2))")
    assert label_cell(_row(), "label_alone") == "-"


def test_the_owner_share_the_control_arm_and_the_label_epsilon_are_judged():
    """Issue 15: the owner's share of the FLOPs (fine-tune included) is a target; a control arm
    within a point of the fine-tuned accuracy says the trainers contributed nothing; the label
    epsilon counts as an epsilon stated."""
    base = _row(accuracy=0.90, epsilon=None)
    r = _row(owner_share=0.137, control_accuracy=0.875, accuracy=0.88, epsilon=None,
             adjacency=None, label_epsilon=0.4)
    got = {t: (v, ok) for t, v, ok in judge(r, base)}
    assert got["owner's share of the training FLOPs <= 15%"] == ("13.7%", True)
    control = [v for t, v in got.items() if t.startswith("the trainers contribute")]
    assert control == [("control 0.8750 (-0.5 points)", False)]
    assert got["epsilon reported with its adjacency"][1]
    assert "labels 0.4" in got["epsilon reported with its adjacency"][0]
    assert not judge(_row(owner_share=0.2), base)[1][2]
    helped = judge(_row(control_accuracy=0.80), base)
    assert [ok for t, _, ok in helped if t.startswith("the trainers contribute")] == [True]


def test_a_rows_accuracy_is_what_the_owner_ends_with():
    from clicooper_bus.tools.sweep_rows import accuracies

    plain = {"test_accuracy": 0.61, "owner_flops_share": 0.072}
    assert accuracies(plain) == {"accuracy": 0.61, "split_accuracy": 0.61,
                                 "control_accuracy": None, "owner_share": 0.072}
    tuned = {**plain, "finetune": {"accuracy": 0.83, "owner_flops_share": 0.137,
                                   "control": {"accuracy": 0.80}}}
    assert accuracies(tuned) == {"accuracy": 0.83, "split_accuracy": 0.61,
                                 "control_accuracy": 0.80, "owner_share": 0.137}
