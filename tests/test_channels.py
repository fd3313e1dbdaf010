"""Label inference on every channel a trainer receives: gradients, linking across epochs, a
channel with no label information, and the per-trainer threat model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clicooper_bus.audit import families
from clicooper_bus.audit.truth import Truth
from clicooper_bus.ml.attacks.base import Knowledge, ThreatModelViolation
from clicooper_bus.ml.attacks.channels import (
    ChannelInference,
    Rows,
    merge_pseudo,
    received_field,
    stage_field,
)
from clicooper_bus.net.roster import Roster
from clicooper_bus.plan import Plan

K, N, EPOCHS = 10, 400, 5
PLAN = Plan("small-cnn", (1, 28, 28), K, (6,), 0, 1e-3, 40)
# one stage taking 128-wide rows (the small CNN cut before its last linear layer), and the same
# with label obfuscation: 2 secret pseudo-classes per class
PLAN_128 = Plan("small-cnn", (1, 28, 28), K, (8,), 0, 1e-3, 40)
PLAN_GAMMA = Plan("small-cnn", (1, 28, 28), K, (8,), 0, 1e-3, 40, outputs=2 * K)


def _truth(labels: np.ndarray, n_aux: int = 0) -> Truth:
    """The truth side of a stand-in run: every training and test label is `labels`, `n_aux`
    public aux images, the public batch order."""
    nothing = np.zeros(0)
    return Truth(nothing, nothing, nothing, torch.zeros(0), nothing, np.zeros((n_aux, 1)),
                 np.arange(K), labels, labels)


def _labels(n=N, seed=0):
    return np.random.default_rng(seed).integers(0, K, n)


def _released(labels, sigma, d=32, seed=1, epochs=EPOCHS):
    """Each sample released once per epoch: its class centre plus fresh noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, d))
    ids = np.tile(np.arange(len(labels)), epochs)
    epochs = np.repeat(np.arange(epochs), len(labels))
    x = centres[labels[ids]] + sigma * rng.normal(size=(len(ids), d))
    return Rows("fwd", "train", ids, epochs, x.astype(np.float32))


def _scored(trainer_rows: dict[str, Rows], labels, trainer="trainer-1", plan=PLAN, stage=None,
            last=False):
    attack = ChannelInference().for_trainer(trainer, 1, last)
    know = Knowledge({"plan": plan, received_field(trainer): trainer_rows,
                      stage_field(trainer): stage})
    out = attack.run(know.view(attack.threat))
    truth = _truth(labels, 0)
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
    assert view.fields == {"plan", received_field("trainer-2"), stage_field("trainer-2")}
    for other in (received_field("trainer-1"), stage_field("trainer-1"), "stages"):
        with pytest.raises(ThreatModelViolation):
            getattr(view, other)
    assert "non-colluding" in attack.threat.party


@pytest.mark.slow
def test_an_owner_tail_run_leaks_its_labels_through_the_gradients(tmp_path):
    """Over the bus, with the owner keeping the last layer (U-shaped split) and noise on the
    release: the last trainer's gradient channel still gives the training labels."""
    from clicooper_bus.audit.auditor import audit_run
    from clicooper_bus.ml.attacks import select
    from clicooper_bus.tools.run import run
    from tests.busrun import write_config

    path = write_config(tmp_path, run_id="tail", trainers=2, run={"epochs": 1},
                        privacy={"owner_tail": True, "mechanism": "gaussian",
                                 "noise_multiplier": 0.3, "clip": 1.0},
                        log={"retention": "fwd=sample:8,bwd=all,*=all"})
    assert run(str(path), echo=False, timeout_s=300, free_ports=False) == 0
    audit = audit_run(tmp_path / "runs" / "tail", attacks=select("channels,completion"))
    rows = {r["trainer"]: r for r in audit.results if r["family"] == "channels"}
    last = rows["trainer-2"]["channels"]
    assert last["bwd"]["ari"] >= 0.9, last["bwd"]
    assert last["bwd"]["samples"] > 0 and last["bwd"]["seen"] >= last["bwd"]["samples"]
    assert set(rows) == {"trainer-1", "trainer-2", "all trainers"}
    # the last stage's own outputs (the features it sends the owner's tail) are attacked, and
    # counted against the rows they were computed from
    assert last["own_out"]["seen"] == last["fwd"]["seen"] > 0 and "own_eval_out" in last
    # evaluation rows are scored on the private half of the test split, not the aux images
    assert last["own_eval_out"]["rows_of"] == "private evaluation images"
    assert rows["all trainers"]["ari"] >= max(rows[t]["ari"] for t in ("trainer-1", "trainer-2"))
    # model completion, per trainer and colluding, on what each received over the bus
    from clicooper_bus.audit.family_completion import lead

    done = {r["trainer"]: r for r in audit.results if r["family"] == "completion"}
    assert set(done) == {"trainer-1", "trainer-2", "all trainers"}
    for t in ("trainer-1", "trainer-2"):
        assert done[t]["how"].startswith("known plaintext"), done[t]["how"]
        assert {"fwd", "eval_fwd"} <= set(done[t]["channels"])
        assert all(0 < m["samples"] <= m["seen"] for m in done[t]["channels"].values())
        assert lead(done["all trainers"]) >= lead(done[t])


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
    truth = _truth(labels, 0)
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


def _pseudo(labels, gamma=2, seed=5):
    """Label obfuscation as the owner does it: gamma pseudo-classes per class, a sample's
    fixed by its id, all of them permuted. Returns the pseudo-labels."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(K * gamma)
    return perm[labels * gamma + rng.integers(0, gamma, len(labels))]


def test_perfect_pseudo_labels_are_merged_into_the_classes_before_scoring():
    """Scored one-to-one, perfect pseudo-labels at gamma 2 read as ARI about 0.5-0.65; the
    attacker can merge them by the mean activation of their rows, and so the auditor does."""
    labels = _labels()
    released = _released(labels, sigma=1.0, d=128, epochs=1)
    pseudo = _pseudo(labels)
    got = Rows("labels", "train", released.ids, released.epochs, pseudo[released.ids][:, None])
    row = _scored({"labels": got, "fwd": released}, labels, plan=PLAN_GAMMA)
    ch = row["channels"]["labels"]
    assert ch["strongest"] == "merged by fwd profiles" and ch["ari"] > 0.99, ch
    from clicooper_bus.audit.scoring import clustering_scores

    one_to_one = clustering_scores(pseudo, labels)["ari"]
    assert one_to_one < 0.7 and row["ari"] > one_to_one + 0.3
    # the merge itself: every pseudo-class lands in its true class's group
    merged = merge_pseudo(pseudo[released.ids], released.x, K)
    assert clustering_scores(merged, labels[released.ids])["ari"] > 0.99


def _logit_stage(centres: np.ndarray) -> torch.nn.Module:
    """A last stage whose logits are each row's similarity to the class centres."""
    lin = torch.nn.Linear(centres.shape[1], len(centres))
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(centres, dtype=torch.float32))
        lin.bias.zero_()
    return lin


def test_the_last_stage_s_own_outputs_are_attacked():
    """Its own outputs on the rows it received, recomputed from its stage: the argmax of the
    logits names the class even where k-means on the inputs does not (noise 3 per coordinate
    around centres a norm-11 apart)."""
    labels = _labels()
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(K, 128))
    released = _released(labels, sigma=3.0, d=128, seed=1, epochs=1)  # the centres of seed 1
    ev = Rows("eval_fwd", "test", np.arange(N), np.zeros(N, int), released.x[:N])
    row = _scored({"fwd": released, "eval_fwd": ev}, labels, plan=PLAN_128,
                  stage=_logit_stage(centres), last=True)
    own, inputs = row["channels"]["own_out"], row["channels"]["fwd"]
    assert own["strongest"] == "argmax" and own["ari"] > 0.9, own
    assert own["ari"] > inputs["ari"] + 0.1, (own, inputs)  # measured 0.956 against 0.793
    assert own["seen"] == N * EPOCHS and "own_eval_out" in row["channels"]
    assert "own_out+linked" not in row["channels"]  # one release per sample: nothing to link
    # not the last stage: its outputs are the next trainer's inputs, attacked there
    assert "own_out" not in _scored({"fwd": released}, labels, plan=PLAN_128,
                                    stage=_logit_stage(centres))["channels"]


def test_own_logits_under_obfuscation_are_argmaxed_then_merged():
    labels = _labels()
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(K, 128))
    released = _released(labels, sigma=1.0, d=128, seed=1, epochs=1)
    # each class's two pseudo-classes have nearly its logit (the model cannot tell them apart),
    # in a secret order: the argmax falls on either, their softmax profiles agree
    siblings = np.repeat(centres, 2, axis=0) + 0.1 * rng.normal(size=(2 * K, 128))
    stage = _logit_stage(siblings[rng.permutation(2 * K)])
    row = _scored({"fwd": released}, labels, plan=PLAN_GAMMA, stage=stage, last=True)
    own = row["channels"]["own_out"]
    assert own["ari"] > 0.9, own


def test_the_colluding_row_is_at_least_each_member_s():
    """Colluders hold what each of them holds: their row takes the strongest member channel
    when the joined channel is weaker (here: there is none to join)."""
    labels = _labels()
    audit = SimpleNamespace(references={"channels_seen": {"trainer-1": {"fwd": N * EPOCHS},
                                                          "trainer-2": {"labels": N}}},
                            results=[])
    truth = _truth(labels, 0)
    know = Knowledge({"plan": PLAN,
                      received_field("trainer-1"): {"fwd": _released(labels, 2.2, epochs=1)},
                      received_field("trainer-2"): {"labels": Rows(
                          "labels", "train", np.arange(N), np.zeros(N, int), labels[:, None])}})
    for attack in ChannelInference().expand(["trainer-1", "trainer-2"]):
        out = attack.run(know.view(attack.threat))
        row = families.family("channels").score(attack, out, truth, audit, None)
        audit.results.append({"name": attack.name, "family": "channels", **row})
    *members, colluding = audit.results
    assert all(colluding["ari"] >= m["ari"] for m in members)
    assert colluding["channel"] == "trainer-2:labels" and colluding["ari"] == pytest.approx(1.0)
    assert "trainer-1:fwd" in colluding["channels"]


def test_evaluation_rows_are_scored_on_the_private_half_only():
    """Rows of the public aux images (which every trainer holds) measure nothing private: a
    channel whose private rows are all wrong scores low even when its aux rows are right."""
    from clicooper_bus.audit.family_channels import private_rows

    labels = _labels(200, seed=4)
    ids = np.arange(200)
    pred = labels.copy()
    pred[100:] = (labels[100:] + 1 + ids[100:] % 3) % K  # wrong, and not a relabelling
    ch = {"ids": ids, "split": "test", "source": "eval_fwd", "variants": {"plain": pred}}
    scored, what = private_rows(ch, 100, K)
    assert what == "private evaluation images" and scored.sum() == 100 and not scored[:100].any()
    truth = _truth(labels, 100)
    audit = SimpleNamespace(references={"channels_seen": {"trainer-1": {"eval_fwd": 200}}})
    attack = ChannelInference().for_trainer("trainer-1", 1, False)
    row = families.family("channels").score(attack, {"eval_fwd": ch}, truth, audit, None)
    assert row["channels"]["eval_fwd"]["samples"] == 100
    assert row["channels"]["eval_fwd"]["matched_accuracy"] < 0.6
    # too few private rows: every row is scored, and the row says they were public images
    scored, what = private_rows({**ch, "ids": ids[:110]}, 100, K)
    assert scored.all() and what.startswith("public aux images only")
    assert private_rows({**ch, "split": "train"}, 100, K)[1] == "training samples"


def test_fully_retained_evaluation_keeps_rows_of_both_halves():
    from clicooper_bus.audit.channels import TARGETS, _Sampler

    sampler = _Sampler(PLAN, 1000, 10000, {"eval_fwd"})
    ids = np.arange(10000)
    kept = ids[sampler.keep("eval_fwd", ids)]
    assert len(kept) == TARGETS
    assert (kept < 5000).sum() == (kept >= 5000).sum() == TARGETS // 2


def test_a_step_replayed_after_a_rollback_is_read_once():
    """A rolled-back step re-sends what it sent the first time: the receiver learns nothing
    new, so the auditor counts and attacks it once (linking would otherwise see one sample
    released twice in an epoch). The same step with a different body is a new release."""
    from clicooper_bus.audit.replay import resent

    def header(body: bytes, step=7, kind="fwd"):
        return SimpleNamespace(sender="o", to="trainer-1", kind=kind, epoch=0, batch=3,
                               step=step, dtype="float32", shape=(2, 4), body_sha256=body)

    sent: set = set()
    assert not resent(header(b"a"), sent)
    assert resent(header(b"a"), sent)
    assert not resent(header(b"b"), sent)  # a different release of the same step
    assert not resent(header(b"a", step=8), sent)
    assert not resent(header(b"a", kind="bwd"), sent)
    # control messages without a step are never folded
    assert not resent(header(b"c", step=None), sent) and not resent(header(b"c", step=None), sent)


def test_a_median_over_releases_resists_heavy_tailed_noise():
    """Linking by mean is undone by heavy-tailed noise (one wild draw moves a mean); the
    coordinate-wise median of a sample's five releases is not, and the channel reports the
    stronger of the two."""
    labels = _labels()
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(K, 32))
    ids = np.tile(np.arange(N), EPOCHS)
    x = centres[labels[ids]] + 0.6 * rng.standard_cauchy(size=(len(ids), 32))
    rows = Rows("fwd", "train", ids, np.repeat(np.arange(EPOCHS), N), x.astype(np.float32))
    ch = _scored({"fwd": rows}, labels)["channels"]
    assert ch["fwd+linked-median"]["releases_per_sample"] == EPOCHS
    assert ch["fwd+linked-median"]["ari"] > ch["fwd+linked"]["ari"] + 0.2, ch


def test_link_median_groups_each_sample_s_releases():
    from clicooper_bus.ml.attacks.linking import link_median

    ids = np.array([3, 1, 3, 1, 3, 1, 2, 2])
    x = np.array([[1.0], [10], [2], [30], [100], [20], [5], [6]], np.float32)
    got_ids, med, counts = link_median(ids, x)
    got = dict(zip(got_ids.tolist(), med[:, 0].tolist(), strict=True))
    assert got == {1: 20.0, 3: 2.0} and counts.tolist() == [3, 3]  # 2: too few releases


def test_a_resent_step_is_read_once_from_a_real_log(tmp_path):
    """A log holding a step sent again byte for byte (a rollback's replay) and once more with
    another body: the channels reader and the replay count the first two as one release and
    the third as a new one."""
    from clicooper_bus.audit.channels import read_channels
    from clicooper_bus.audit.replay import replay
    from clicooper_bus.net.verifier import Verifier
    from clicooper_bus.net.wire import Sender
    from clicooper_bus.tlog.log import ProvenanceLog
    from clicooper_bus.tools.log_demo import demo_identities

    ids = demo_identities(tmp_path / "keys")
    plan = Plan("small-cnn", (1, 28, 28), K, (3,), 0, 1e-3, 4)
    roster = Roster.build("r", owner=ids["owner"].public,
                          trainers=[ids["trainer-1"].public, ids["trainer-2"].public],
                          notary=ids["notary"].public, meta={"plan": plan.to_meta()})
    roster_bytes = roster.sign(ids["owner"])
    plog = ProvenanceLog.create(tmp_path / "log", roster_bytes=roster_bytes, run_id="r",
                                retention="all", fsync="never", signer=ids["notary"])
    owner, verifier = Sender(ids["owner"], "r", nonce=roster.nonce), Verifier(roster, "r")
    rng = np.random.default_rng(0)
    first, second = (rng.normal(size=(4, 6)).astype(np.float32) for _ in range(2))
    sent = [owner.seal("roster", "all", roster_bytes)]
    for step, act in ((0, first), (1, second), (0, first), (0, first + 1)):
        sent.append(owner.seal_array("fwd", "trainer-1", act, step=step, batch=step, epoch=0))
    for env in sent:
        plog.append_envelope(verifier.verify_frames(env.frames()))
    plog.sign_checkpoint()
    plog.close()
    ch = read_channels(tmp_path / "log", n_train=8, n_test=4, full=set())
    assert ch.seen["trainer-1"]["fwd"] == 12 and len(ch.of("trainer-1")["fwd"]) == 12
    assert [b.step for b in replay(tmp_path / "log").released] == [0, 1, 0]
