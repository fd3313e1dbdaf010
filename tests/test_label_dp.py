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
from safetensors import safe_open
from safetensors.torch import load_file

from clicooper_bus.config import load_config
from clicooper_bus.errors import ClicooperError, ConfigError
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
from clicooper_bus.tools.finetune import finetune_run
from clicooper_bus.tools.run import run
from tests.busrun import write_config

# --- randomised response ---------------------------------------------------------------------


@pytest.mark.parametrize("eps,k", [(1e-6, 10), (0.1, 10), (0.5, 10), (1.0, 2), (3.0, 10),
                                   (8.0, 100), (40.0, 2), (50.0, 10)])
def test_the_realised_epsilon_holds_and_is_the_target(eps, k):
    t = keep_threshold(eps, k)
    assert realised_epsilon(t, k) <= eps
    # the largest that holds, within the 1e-12 relative margin kept for the float error
    assert t + 1 == SPACE or realised_epsilon(t + 1, k) * (1 + 1e-12) > eps
    assert t * k >= SPACE  # never below 1/K: the loss is then the keep's, not its inverse's
    assert math.isclose(t / SPACE, 1 / (1 + (k - 1) * math.exp(-eps)), rel_tol=1e-9)


@pytest.mark.parametrize("eps,k", [(0.0, 10), (-1.0, 10), (1.0, 1), (51.0, 10), (710.0, 10),
                                   (1e-25, 10)])
def test_randomised_response_refuses_what_it_cannot_do(eps, k):
    with pytest.raises(ValueError, match="randomised response"):
        keep_threshold(eps, k)


def _images(n: int) -> np.ndarray:
    """n distinct tiny images."""
    return np.arange(n, dtype=np.uint32).view(np.uint8).reshape(n, 1, 2, 2)


def test_each_sample_gets_one_randomised_label_with_the_right_law():
    n = 20000
    images, ids, y = _images(n), np.arange(n), np.arange(n) % 10
    rr = RandomisedResponse(b"s" * 32, 10, 1.0, images)
    got = rr.labels(ids, y)
    assert np.array_equal(got, rr.labels(ids, y))  # drawn once: every call, every epoch
    # the draw follows the image, not its index: a reshuffled (or cut) dataset gets the same
    perm = np.random.default_rng(0).permutation(n)
    shuffled = RandomisedResponse(b"s" * 32, 10, 1.0, images[perm])
    assert np.array_equal(shuffled.labels(ids, y[perm]), got[perm])
    q = rr.keep_probability
    kept = float((got == y).mean())
    assert abs(kept - q) < 5 * math.sqrt(q * (1 - q) / n)
    changed = got[got != y] - y[got != y]  # the others are uniform: each offset equally often
    counts = np.bincount(changed % 10, minlength=10)[1:]
    expect = len(changed) / 9
    assert counts.min() > expect - 5 * math.sqrt(expect) and counts.max() < expect + 5 * math.sqrt(expect)
    other = RandomisedResponse(b"t" * 32, 10, 1.0, images).labels(ids, y)
    assert (other != got).mean() > 0.3  # another secret, other draws


def test_runs_at_two_epsilons_do_not_give_the_label_away():
    """Keyed by the image alone, a sample kept at epsilon 0.4 was kept at 1.0 too: wherever
    the two runs' labels differed, the one of 1.0 was the true label, every time. The epsilon
    is in the key now: the draws are independent, and a difference says little."""
    n = 20000
    images, ids, y = _images(n), np.arange(n), np.arange(n) % 10
    low = RandomisedResponse(b"s" * 32, 10, 0.4, images).labels(ids, y)
    high = RandomisedResponse(b"s" * 32, 10, 1.0, images).labels(ids, y)
    differ = low != high
    assert differ.mean() > 0.5
    q = RandomisedResponse(b"s" * 32, 10, 1.0, images[:1]).keep_probability
    # with independent draws the high label is true about q x (1 - q_low) / P(differ) of the
    # time: well below 1
    assert (high[differ] == y[differ]).mean() < q + 0.1


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
    images = _images(100)
    d = defences.Defences.build(p, b"k" * 32, 10, 3, label_secret=b"s" * 32,
                                train_images=images)
    y = np.arange(100) % 10
    want = RandomisedResponse(b"s" * 32, 10, 1.0, images).labels(np.arange(100), y)
    assert np.array_equal(d.train_labels(np.arange(100), y), want)


@pytest.mark.parametrize("privacy,match", [
    ({"finetune_epochs": 1}, "set owner_tail = true"),
    ({"owner_tail": True, "finetune_samples": 10}, "need finetune_epochs"),
    ({"owner_tail": True, "finetune_control": True}, "need finetune_epochs"),
    ({"release": "once", "label_dcor": 1.0}, "keeps fixed"),
    ({"label_epsilon": -1.0}, "at least 0"),
    ({"label_epsilon": 60.0}, "at most 50"),
    ({"label_epsilon": 1e-12}, "finer than randomised response resolves"),
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
    """With pseudo-classes on top: the logged labels decode to the randomised ones."""
    out = _run(tmp_path, "rr", run={"epochs": 2}, log={"retention": "*=all"},
               privacy={"label_epsilon": 0.5, "label_dcor": 1.0, "label_gamma": 3})
    secret = bytes.fromhex(secret_path(tmp_path / "keys", "owner").read_text().strip())
    data = load_dataset("synthetic", None, 0)
    rr = RandomisedResponse(secret, data.classes, 0.5, data.x_train)
    groups = np.array(json.loads((out / "label_groups.json").read_text())["groups"])
    seen, kept = 0, []
    with ProvenanceLog.open(out / "log") as plog:
        for i in range(plog.size):
            h = parse_header(split_leaf(plog.leaf(i))[0], plog.limits)
            if h.kind != "labels":
                continue
            ids = batch_order(len(data.y_train), 32, 0, h.epoch)[h.batch]
            # pseudo-classes of the randomised labels: the owner's grouping decodes them
            got = groups[np.frombuffer(bytes(plog.body(h.body_sha256)), np.int64)]
            assert np.array_equal(got, rr.labels(ids, data.y_train[ids]))
            kept.append(got == data.y_train[ids])
            seen += 1
    assert seen >= 2
    assert np.concatenate(kept).mean() < 0.5  # mostly not the true label at epsilon 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["spent"]["labels"]["epsilon"] == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ClicooperError, match="sets no \\[privacy\\] finetune_epochs"):
        finetune_run(out)


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
    with safe_open(str(out / ft["model_file"]), framework="pt") as f:
        meta = f.metadata()
    assert meta["certified"] == "false" and meta["finetuned_from"] == summary["model_sha256"]
    assert ft["cpu_s"] > 0 and ft["control"]["flops"] == ft["flops"]
    a, b = load_file(out / "model.safetensors"), load_file(out / ft["model_file"])
    last = max(int(k.split(".")[0][3:]) for k in a)
    for k in a:
        seg = int(k.split(".")[0][3:])
        assert torch.equal(a[k], b[k]) == (seg not in (0, last)), k


@pytest.mark.parametrize("labels", [[7, 7], [3], [1, 1, 1, 1]])
def test_a_batch_of_one_class_adds_nothing_to_the_head(labels):
    """dCor with a constant variable is 0 with a zero gradient, not NaN: a last batch of one
    class (or of one sample) left the head's weights NaN, and the run blamed stage 1."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8))
    t = SegmentTrainer(head, lr=1e-2, is_head=True)
    t.penalty = pen = HeadPenalty(1.0, 1.0, classes=10)
    pen.labels(0, np.array(labels))
    out = t.forward(torch.randn(len(labels), 1, 4, 4), 0)
    t.backward(torch.ones_like(out) * 0.01, 0)
    assert all(torch.isfinite(p).all() for p in head.parameters())
