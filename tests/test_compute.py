"""Who computes what (`ml/compute.py`, `clicooper plan`): the measured table against closed-form
counts, and the command's output. Unit tests only: no process starts, nothing trains.

What torch's FlopCounterMode counts (checked here): 2 FLOPs per multiply-accumulate of matrix
products and convolutions; a linear layer's bias (addmm), ReLU, pooling, flatten and
cross-entropy count 0."""

from __future__ import annotations

import json
import re

import pytest

from clicooper_bus.ml import data as data_mod
from clicooper_bus.ml.compute import compute_plan
from clicooper_bus.ml.models import default_cuts, model_spec, resolve_spec
from clicooper_bus.tools.cli import main

# flatten | linear 8->16 | relu, linear 16->12 | relu, linear 12->4
LINEAR = resolve_spec("linear-test", [{"op": "flatten"}, {"op": "linear", "out": 16},
                                      {"op": "relu"}, {"op": "linear", "out": 12},
                                      {"op": "relu"}, {"op": "linear", "out": "classes"}],
                      (1, 2, 4), 4, default_cut=2)


def test_linear_spec_matches_closed_form():
    plan = compute_plan(LINEAR, (2, 4), batch_size=3, trainers=["t1", "t2"])
    head, t1, t2 = plan.participants
    assert [p.participant for p in plan.participants] == ["owner (head)", "t1", "t2"]
    # forward: 2 * in * out per sample (bias and ReLU not counted)
    assert (head.fwd_flops, t1.fwd_flops, t2.fwd_flops) == (2 * 8 * 16, 2 * 16 * 12, 2 * 12 * 4)
    # backward: weight gradient 2 * in * out, plus the input gradient 2 * in * out in a trainer's
    # stage; the head's input is data, so it computes no input gradient
    assert head.bwd_flops == 2 * 8 * 16
    assert (t1.bwd_flops, t2.bwd_flops) == (4 * 16 * 12, 4 * 12 * 4)
    assert (head.params, t1.params, t2.params) == (8 * 16 + 16, 16 * 12 + 12, 12 * 4 + 4)
    # float32 activations and gradients, int64 labels to the last stage
    assert (head.bytes_sent, head.bytes_received) == (16 * 4 + 8, 16 * 4)
    assert (t1.bytes_sent, t1.bytes_received) == (16 * 4 + 12 * 4, 16 * 4 + 12 * 4)
    assert (t2.bytes_sent, t2.bytes_received) == (12 * 4, 12 * 4 + 8)
    total = 3 * 256 + 3 * 384 + 3 * 96 - 256  # head's backward is 1x, the stages' 2x
    assert plan.train_flops == total
    assert plan.owner_share == pytest.approx(512 / total)


def test_owner_tail_sends_no_labels_and_counts_as_the_owners():
    plan = compute_plan(LINEAR, (2, 4), tail=5, batch_size=2)
    head, s1, s2, tail = plan.participants
    assert tail.participant == "owner (tail)" and tail.role == "tail"
    assert s2.fwd_flops == 0 and s2.params == 0  # a ReLU alone
    assert (tail.fwd_flops, tail.bwd_flops) == (2 * 12 * 4, 4 * 12 * 4)
    assert not any(e.what == "labels" for e in plan.edges)
    assert (s2.bytes_sent, s2.bytes_received) == (12 * 4 * 2, 12 * 4 * 2)
    assert (tail.bytes_sent, tail.bytes_received) == (12 * 4, 12 * 4)
    assert plan.owner_flops == head.train_flops + tail.train_flops


CONV1 = 16 * 1 * 5 * 5 * 28 * 28  # multiply-accumulates: out x in x kernel x output pixels
CONV2 = 32 * 16 * 5 * 5 * 14 * 14
FC1 = 32 * 7 * 7 * 128


def test_the_offloading_default_matches_the_convolutions_closed_form():
    """The small CNN's default cut (issue 14 item 3): the owner keeps conv1 and its pool, the
    first trainer takes conv2; FlopCounterMode's count equals the closed form, 2 FLOPs a MAC."""
    spec = model_spec("small-cnn", (1, 28, 28), 10)
    plan = compute_plan(spec, default_cuts(spec, 2), batch_size=2)
    head, first = plan.participants[0], plan.participants[1]
    assert head.layers == (0, 3) and first.layer_ops[0] == "conv2d"
    assert head.fwd_flops == 2 * CONV1
    assert head.bwd_flops == 2 * CONV1  # its input is data: the weight gradient only
    assert first.fwd_flops == 2 * CONV2 and first.bwd_flops == 4 * CONV2
    assert plan.edges[0].shape == (16, 14, 14) and plan.edges[0].fwd_bytes == 16 * 14 * 14 * 4
    assert plan.owner_share <= 0.15  # the bound; 7.2 % measured


def test_the_old_cut_matches_the_convolutions_closed_form():
    """Cut after both convolutions (`cuts = [6, 8]`, where docs/RESULTS.md was measured): the
    owner's head does 93 % of the training FLOPs."""
    spec = model_spec("small-cnn", (1, 28, 28), 10)
    plan = compute_plan(spec, (6, 8), batch_size=2)
    head = plan.participants[0]
    assert head.fwd_flops == 2 * (CONV1 + CONV2)
    assert head.bwd_flops == 2 * CONV1 + 4 * CONV2  # conv1: weight gradient only
    assert plan.participants[1].fwd_flops == 2 * FC1
    assert plan.edges[0].shape == (32, 7, 7) and plan.edges[0].fwd_bytes == 32 * 7 * 7 * 4
    assert plan.owner_share > 0.9


@pytest.fixture
def no_dataset(monkeypatch):
    """The command needs only the data's shape and classes: a tiny synthetic set of Fashion-MNIST's
    shape (28x28x1, 10 classes) stands in, so the tests need no dataset package."""
    monkeypatch.setattr(data_mod, "load_dataset",
                        lambda name, path=None, seed=0: data_mod.synthetic(8, 8, 10, seed))


def test_plan_command_prints_every_participant_and_the_owner_share(no_dataset, capsys):
    assert main(["plan", "--config", "configs/demo.toml"]) == 0
    out = capsys.readouterr().out
    for name in ("owner (head)", "trainer-1", "trainer-2"):
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), out
    share = float(re.search(r"owner's share of training FLOPs: ([\d.]+)%", out).group(1))
    assert 0 < share <= 15  # issue 14's acceptance: the demo offloads; 7.2 % measured
    assert main(["plan", "--config", "configs/demo.toml", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["participant"] for p in doc["participants"]] == ["owner (head)", "trainer-1",
                                                               "trainer-2"]
    assert round(100 * doc["owner_share"], 1) == share
    assert doc["source"] == "torch.utils.flop_counter.FlopCounterMode"


def test_plan_command_shows_the_owner_tail(no_dataset, capsys):
    assert main(["plan", "--config", "configs/defended.toml"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^owner \(tail\)\s", out, re.M) and "labels" not in out
