"""The defences on real runs over the bus: what crosses the network and lands in the log is
protected (noisy clipped activations, pseudo-labels, nothing of the secret), the owner tail
keeps every label home, `once` releases each sample once, and the auditor reports the epsilon
the run spent and attacks what the defences left."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clicooper_bus.audit.replay import replay
from clicooper_bus.ml.data import batch_order, load_dataset
from clicooper_bus.ml.models import build_segments, plan_spec
from clicooper_bus.ml.privacy import accountant
from clicooper_bus.ml.privacy.secret import secret_path
from clicooper_bus.net.wire import parse_header, split_leaf
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tools.run import run
from tests.busrun import write_config

NOISE = 0.05


def _run(tmp: Path, run_id: str, attacks: str, **sections) -> Path:
    cfg = write_config(tmp, run_id=run_id, trainers=2, **sections)
    assert run(str(cfg), echo=False, free_ports=False, timeout_s=300, audit=attacks) == 0
    return tmp / "runs" / run_id


@pytest.fixture(scope="module")
def obfuscated(tmp_path_factory) -> Path:
    """Gaussian activation protection and secret label obfuscation, every body retained."""
    tmp = tmp_path_factory.mktemp("obf")
    # the tests below read the report's settings (epsilon, label obfuscation, the owner's
    # accuracy), which do not depend on the attacks: the cheapest one (class-mean; clustering
    # and extraction-50 cost 25 s more CPU and no test here read their scores)
    return _run(tmp, "obf", "class-mean", run={"epochs": 2},
                privacy={"mechanism": "gaussian", "noise_multiplier": NOISE, "label_gamma": 3},
                log={"retention": "*=all"})


@pytest.fixture(scope="module")
def tail(tmp_path_factory) -> Path:
    """Owner tail, head fixed with per-sample noise released once, evaluation on the owner."""
    tmp = tmp_path_factory.mktemp("tail")
    return _run(tmp, "tail", "extraction-unlabelled,extraction-50", run={"epochs": 2},
                privacy={"mechanism": "gaussian", "noise_multiplier": NOISE, "release": "once",
                         "owner_tail": True, "evaluate": "owner"})


def _leaves_and_bodies(run_dir: Path):
    with ProvenanceLog.open(run_dir / "log") as plog:
        for i in range(plog.size):
            leaf = bytes(plog.leaf(i))
            h = parse_header(split_leaf(leaf)[0], plog.limits)
            body = plog.body(h.body_sha256)
            yield h, leaf, None if body is None else bytes(body)


def test_the_log_holds_neither_the_secret_nor_the_labels(obfuscated):
    keys = obfuscated.parent.parent / "keys"
    secret = bytes.fromhex(secret_path(keys, "owner").read_text().strip())
    data = load_dataset("synthetic", None, 0)
    entries = list(_leaves_and_bodies(obfuscated))
    everything = b"".join(leaf + (body or b"") for _, leaf, body in entries)
    assert secret not in everything and secret.hex().encode() not in everything
    labels_seen = 0
    for h, _, body in entries:
        if h.kind == "labels":
            assert body is not None  # retention *=all: every body is in the log
            truth = data.y_train[batch_order(len(data.y_train), 32, 0, h.epoch)[h.batch]]
            assert not np.array_equal(np.frombuffer(body, np.int64), truth)
            # the batch's true label array is nowhere in the log, in any header or body
            assert truth.astype(np.int64).tobytes() not in everything
            labels_seen += 1
    assert labels_seen == 2 * 63  # every step's labels went out, obfuscated
    for f in obfuscated.rglob("*"):
        if f.is_file() and f.suffix in (".toml", ".json", ".md", ".txt", ".jsonl"):
            assert secret.hex() not in f.read_text(errors="replace")


def test_pseudo_labels_decode_to_the_truth_with_the_owners_grouping(obfuscated):
    # the grouping is the owner's alone: not in the model file, which may be handed on
    assert not any(k.startswith("decode") for k in load_file(str(obfuscated / "model.safetensors")))
    path = obfuscated / "label_groups.json"
    assert (path.stat().st_mode & 0o077) == 0
    groups = np.asarray(json.loads(path.read_text())["groups"])
    assert sorted(np.bincount(groups).tolist()) == [3] * 10
    data = load_dataset("synthetic", None, 0)
    r = replay(obfuscated / "log")
    for b in r.labels:
        truth = data.y_train[batch_order(len(data.y_train), 32, 0, b.epoch)[b.batch]]
        assert (groups[b.array] == truth).all()


def test_released_activations_are_clipped_and_noisy(obfuscated):
    r = replay(obfuscated / "log")
    acts = np.concatenate([b.array.reshape(len(b.array), -1) for b in r.released])
    d = acts.shape[1]
    sq = (acts.astype(np.float64) ** 2).sum(1)
    # ||clip(a) + n||^2 has mean ||clip(a)||^2 + d sigma^2 with ||clip(a)|| <= 1
    assert d * NOISE**2 * 0.95 < sq.mean() < (1 + d * NOISE**2) * 1.05


def test_summary_and_report_state_the_epsilon_spent(obfuscated):
    summary = json.loads((obfuscated / "summary.json").read_text())
    spent = summary["privacy"]["spent"]
    expected = accountant.spent("gaussian", NOISE, 1.0, 2, 1e-5).epsilon
    assert spent["epsilon"] == pytest.approx(expected) and spent["releases"] == 2
    assert spent["sensitivity"] == 2.0 and "replace-one" in spent["adjacency"]
    assert "NOT a differential-privacy guarantee for the run" in spent["scope"]  # per-step
    report = json.loads((obfuscated / "audit" / "report.json").read_text())
    s = report["settings"]
    assert s["epsilon"]["epsilon"] == pytest.approx(expected)  # recomputed, not copied
    assert s["configuration"].startswith("gaussian (noise x0.05")
    assert "3 secret pseudo-classes" in s["label_obfuscation"]
    md = (obfuscated / "audit" / "report.md").read_text()
    assert f"epsilon {expected:.4g}" in md
    assert summary["test_accuracy"] > 0.8  # the owner decodes its pseudo-classes
    assert s["owner_accuracy_eval_half"] > 0.8  # ... and so does the auditor, from the model


def test_owner_tail_keeps_every_label_home(tail):
    kinds: dict[str, int] = {}
    for h, _, _ in _leaves_and_bodies(tail):
        kinds[h.kind] = kinds.get(h.kind, 0) + 1
    steps = 2 * 63
    assert "labels" not in kinds and "metrics" not in kinds
    assert "eval_fwd" not in kinds and "eval_out" not in kinds  # evaluated on the owner
    # owner -> trainer-1 -> trainer-2 -> owner, and the gradients back the same way
    assert kinds["fwd"] == kinds["bwd"] == 3 * steps
    summary = json.loads((tail / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.8
    assert summary["privacy"]["spent"]["releases"] == 1
    assert summary["privacy"]["spent"]["scope"].startswith("the whole run")  # once: head fixed
    assert "test_set" not in summary["privacy"]["spent"]


def test_once_keeps_the_head_and_each_release(tail):
    from clicooper_bus.net.roster import Roster
    from clicooper_bus.plan import Plan

    r = replay(tail / "log")
    plan: Plan = r.plan
    assert plan.tail and plan.segment_cuts == (*plan.cuts, plan.tail)
    head0 = build_segments(plan_spec(plan), plan.segment_cuts, plan.seed)[0].state_dict()
    weights = load_file(str(tail / "model.safetensors"))
    for k, v in head0.items():
        assert torch.equal(weights[f"seg0.{k}"], v)  # the head never moved
    assert isinstance(r.roster, Roster)
    rows: dict[int, list[np.ndarray]] = {}
    for b in r.released:
        idx = batch_order(2000, 32, 0, b.epoch)[b.batch]
        for i, sample in enumerate(idx):
            rows.setdefault(int(sample), []).append(b.array[i])
    repeated = [v for v in rows.values() if len(v) > 1]
    assert len(repeated) > 20
    for v in repeated:
        assert np.array_equal(v[0], v[1])  # released once: the same noisy value every epoch


def test_extraction_without_the_owners_tail(tail):
    report = json.loads((tail / "audit" / "report.json").read_text())
    by = {a["name"]: a for a in report["attacks"]}
    assert "linear tail fitted on 50" in by["extraction-50"]["how"]
    assert "k-means groups" in by["extraction-unlabelled"]["how"]
    assert report["settings"]["label_obfuscation"].startswith("no label message leaves")
    assert 0.0 <= by["extraction-50"]["accuracy"] <= 1.0
