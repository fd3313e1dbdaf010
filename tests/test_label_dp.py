"""Randomised response on labels, label decorrelation and the owner's fine-tune: the units, and
two runs over the bus (what the last stage receives is exactly the randomised labels; the
fine-tune changes only the owner's segments, releases nothing, and is reported with its control
arm and the FLOPs it costs)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clicooper_bus.config import load_config
from clicooper_bus.errors import ConfigError
from clicooper_bus.ml.data import batch_order, load_dataset
from clicooper_bus.ml.finetune import finetune, trainable
from clicooper_bus.ml.privacy import defences
from clicooper_bus.ml.privacy.nopeek import HeadPenalty
from clicooper_bus.ml.privacy.randomised_response import (
    SPACE,
    RandomisedResponse,
    keep_threshold,
    realised_epsilon,
)
from clicooper_bus.ml.privacy.secret import secret_path
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.net.wire import parse_header, split_leaf
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tools.run import run
from tests.busrun import write_config

# --- randomised response ---------------------------------------------------------------------


@pytest.mark.parametrize("eps,k", [(0.1, 10), (0.5, 10), (1.0, 2), (3.0, 10), (8.0, 100)])
def test_the_realised_epsilon_holds_and_is_the_target(eps, k):
    t = keep_threshold(eps, k)
    assert realised_epsilon(t, k) <= eps
    assert realised_epsilon(t + 1, k) > eps - 1e-9  # the largest threshold that holds
    assert math.isclose(t / SPACE, math.exp(eps) / (math.exp(eps) + k - 1), rel_tol=1e-12)


@pytest.mark.parametrize("eps,k", [(0.0, 10), (-1.0, 10), (1.0, 1)])
def test_randomised_response_refuses_what_it_cannot_do(eps, k):
    with pytest.raises(ValueError, match="randomised response needs"):
        keep_threshold(eps, k)


def test_each_sample_gets_one_randomised_label_with_the_right_law():
    rr = RandomisedResponse(b"s" * 32, 10, 1.0)
    n = 20000
    ids, y = np.arange(n), np.arange(n) % 10
    got = rr.labels(ids, y)
    assert np.array_equal(got, rr.labels(ids, y))  # drawn once: every call, every epoch
    # in another order, the same labels per sample
    perm = np.random.default_rng(0).permutation(n)
    assert np.array_equal(rr.labels(ids[perm], y[perm]), got[perm])
    q = rr.keep_probability
    kept = float((got == y).mean())
    assert abs(kept - q) < 5 * math.sqrt(q * (1 - q) / n)
    changed = got[got != y] - y[got != y]  # the others are uniform: each offset equally often
    counts = np.bincount(changed % 10, minlength=10)[1:]
    expect = len(changed) / 9
    assert counts.min() > expect - 5 * math.sqrt(expect) and counts.max() < expect + 5 * math.sqrt(expect)
    other = RandomisedResponse(b"t" * 32, 10, 1.0).labels(ids, y)
    assert (other != got).mean() > 0.3  # another secret, other draws


def test_the_summary_states_the_label_epsilon_with_its_scope():
    p = load_config(None, {"privacy": {"label_epsilon": 0.5, "owner_tail": True}}).privacy
    s = defences.spent(p, 3, 3, 0, classes=10)
    assert s["labels"]["epsilon"] <= 0.5 and s["labels"]["epsilon"] > 0.5 - 1e-9
    assert "label" in s["labels"]["adjacency"] and "every run" in s["labels"]["scope"]
    assert defences.spent(load_config(None).privacy, 3, 3, 0)["labels"]["epsilon"] is None
    assert "randomised labels (epsilon 0.5)" in defences.describe(p)


def test_defences_need_the_long_term_secret_for_randomised_response():
    p = load_config(None, {"privacy": {"label_epsilon": 1.0}}).privacy
    with pytest.raises(ValueError, match="long-term secret"):
        defences.Defences.build(p, b"k" * 32, 10, 3)
    d = defences.Defences.build(p, b"k" * 32, 10, 3, label_secret=b"s" * 32)
    y = np.arange(100) % 10
    assert np.array_equal(d.train_labels(np.arange(100), y),
                          RandomisedResponse(b"s" * 32, 10, 1.0).labels(np.arange(100), y))


@pytest.mark.parametrize("privacy,match", [
    ({"finetune_epochs": 1}, "set owner_tail = true"),
    ({"owner_tail": True, "finetune_samples": 10}, "need finetune_epochs"),
    ({"owner_tail": True, "finetune_control": True}, "need finetune_epochs"),
    ({"release": "once", "label_dcor": 1.0}, "keeps fixed"),
    ({"label_epsilon": -1.0}, "at least 0"),
])
def test_bad_lever_config_is_named(privacy, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, {"privacy": privacy})


# --- label decorrelation -----------------------------------------------------------------------


def test_label_decorrelation_reaches_the_head_and_needs_the_steps_labels():
    grads = []
    y = np.arange(32) % 4
    for beta in (0.0, 5.0):
        torch.manual_seed(0)
        head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8))
        t = SegmentTrainer(head, lr=0.0, is_head=True)
        pen = HeadPenalty(0.0, beta, classes=4)
        t.penalty = pen
        pen.labels(0, y)
        out = t.forward(torch.randn(32, 1, 4, 4), 0)
        t.optimizer.step = lambda: None
        t.optimizer.zero_grad = lambda set_to_none=True: None
        t.backward(torch.ones_like(out) * 0.01, 0)
        grads.append(head[1].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(KeyError):
        HeadPenalty(0.0, 1.0, 4)(torch.zeros(4, 2), torch.zeros(4, 3), step=7)


# --- the fine-tune -------------------------------------------------------------------------------


def test_the_fine_tune_trains_only_the_owners_segments():
    data = load_dataset("synthetic", None, 0)
    segs = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(data.input_shape),
                                                                     16), torch.nn.ReLU()),
            torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()),
            torch.nn.Sequential(torch.nn.Linear(16, data.classes))]
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in segs]
    tuned, got = finetune(segs, (0, 2), data, epochs=2, samples=256, batch_size=32, lr=1e-2,
                          seed=0, release=None)
    for s, b in zip(segs, before, strict=True):  # the originals are untouched
        assert all(torch.equal(s.state_dict()[k], v) for k, v in b.items())
    assert all(torch.equal(tuned[1].state_dict()[k], v) for k, v in before[1].items())
    assert not torch.equal(tuned[0][1].weight, before[0]["1.weight"])
    assert not torch.equal(tuned[2][0].weight, before[2]["0.weight"])
    assert got.samples == 256 and got.epochs == 2 and 0.0 <= got.accuracy <= 1.0
    # one step's FLOPs: the three matrix products forward, and backward the head's and the
    # tail's weight gradients and the input gradients through the frozen stage and the tail
    d = math.prod(data.input_shape)
    fwd = 2 * (d * 16 + 16 * 16 + 16 * data.classes)
    bwd = 2 * (d * 16 + 16 * 16 + 2 * 16 * data.classes)
    assert got.flops == pytest.approx((fwd + bwd) * 256 * 2)
    with pytest.raises(ValueError, match="epochs >= 1"):
        finetune(segs, (0, 2), data, epochs=0, samples=0, batch_size=32, lr=1e-2, seed=0,
                 release=None)
    frozen = trainable(segs, (0, 2))
    assert not any(p.requires_grad for p in frozen[1].parameters())


# --- over the bus ----------------------------------------------------------------------------------


def _run(tmp: Path, run_id: str, **sections) -> Path:
    cfg = write_config(tmp, run_id=run_id, trainers=2, **sections)
    assert run(str(cfg), echo=False, free_ports=False, timeout_s=300, audit=None) == 0
    return tmp / "runs" / run_id


def test_the_last_stage_receives_exactly_the_randomised_labels(tmp_path):
    out = _run(tmp_path, "rr", run={"epochs": 2}, log={"retention": "*=all"},
               privacy={"label_epsilon": 0.5, "label_dcor": 1.0})
    secret = bytes.fromhex(secret_path(tmp_path / "keys", "owner").read_text().strip())
    data = load_dataset("synthetic", None, 0)
    rr = RandomisedResponse(secret, data.classes, 0.5)
    seen, kept = 0, []
    with ProvenanceLog.open(out / "log") as plog:
        for i in range(plog.size):
            h = parse_header(split_leaf(plog.leaf(i))[0], plog.limits)
            if h.kind != "labels":
                continue
            ids = batch_order(len(data.y_train), 32, 0, h.epoch)[h.batch]
            got = np.frombuffer(bytes(plog.body(h.body_sha256)), np.int64)
            assert np.array_equal(got, rr.labels(ids, data.y_train[ids]))
            kept.append(got == data.y_train[ids])
            seen += 1
    assert seen >= 2
    assert np.concatenate(kept).mean() < 0.5  # mostly not the true label at epsilon 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["spent"]["labels"]["epsilon"] == pytest.approx(0.5, abs=1e-9)


def test_the_fine_tune_runs_after_the_log_closes_and_reports_its_control(tmp_path):
    out = _run(tmp_path, "ft", run={"epochs": 1},
               privacy={"owner_tail": True, "evaluate": "owner", "label_epsilon": 1.0,
                        "finetune_epochs": 2, "finetune_samples": 512, "finetune_control": True})
    summary = json.loads((out / "summary.json").read_text())
    ft = summary["finetune"]
    assert ft["samples"] == 512 and ft["epochs"] == 2 and ft["flops"] > 0
    assert 0.0 <= ft["accuracy"] <= 1.0 and 0.0 <= ft["control"]["accuracy"] <= 1.0
    assert ft["split_accuracy"] == summary["test_accuracy"]
    assert summary["owner_flops_share"] < ft["owner_flops_share"] < 1.0
    # the certified model is the split-trained one (its digest is what the log's ack names);
    # the fine-tuned one differs only in the owner's segments
    certified = (out / "model.safetensors").read_bytes()
    assert hashlib.sha256(certified).hexdigest() == summary["model_sha256"]
    tuned = (out / ft["model_file"]).read_bytes()
    assert hashlib.sha256(tuned).hexdigest() == ft["model_sha256"]
    a, b = load_file(out / "model.safetensors"), load_file(out / ft["model_file"])
    last = max(int(k.split(".")[0][3:]) for k in a)
    for k in a:
        seg = int(k.split(".")[0][3:])
        assert torch.equal(a[k], b[k]) == (seg not in (0, last)), k
