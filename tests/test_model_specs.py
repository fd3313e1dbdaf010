"""Model specs as data (issue 14 item 1): built-ins as TOML files, specs inline or in a file,
shape inference, validation before anything starts, the plan carrying the resolved layers, and
the ResNet spec training over the bus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clicooper_bus.config import load_config
from clicooper_bus.errors import ConfigError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.delivered import load_model, model_metadata
from clicooper_bus.ml.models import (
    assemble,
    build_segment,
    build_segments,
    configured_split,
    default_cuts,
    model_spec,
    plan_spec,
    resolve_spec,
    state_dict_with_prefix,
)
from clicooper_bus.model_spec import ZOO, builtin_models
from clicooper_bus.net.identity import load_public
from clicooper_bus.plan import Plan
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tools.run import prepare, run
from tests.busrun import write_config

SHAPES = [(1, 28, 28), (3, 32, 32)]


def _hand_small_cnn(c: int, flat: int, classes: int) -> list[nn.Module]:
    """The small CNN exactly as the code before specs were data built it."""
    return [nn.Conv2d(c, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, classes)]


def _hand_vgg_small(c: int, flat: int, classes: int) -> list[nn.Module]:
    return [nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(), nn.Linear(256, classes)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,hand,width,cut", [("small-cnn", _hand_small_cnn, 32, 3),
                                                 ("vgg-small", _hand_vgg_small, 64, 5)])
def test_builtins_have_the_weights_of_the_hand_built_models(name, hand, width, cut, shape):
    """Same modules, same order, same seed: bit-identical initial weights (tests pin numbers on
    these models)."""
    c, h, w = shape
    spec = model_spec(name, shape, 10)
    assert spec.head_end == cut
    torch.manual_seed(11)
    want = nn.Sequential(*hand(c, width * (h // 4) * (w // 4), 10)).state_dict()
    got = assemble(build_segments(spec, (cut,), seed=11)).state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["small-cnn", "vgg-small", "resnet-8", "resnet-20"])
def test_a_trainer_building_only_its_stage_gets_the_whole_models_weights(name, shape):
    """`build_segment` (what a trainer builds: the layers before its stage only have their
    random numbers drawn) gives each segment bit for bit as `build_segments` (the owner's
    whole model, hence the hand-built models' weights above)."""
    spec = model_spec(name, shape, 10)
    for stages in (1, 3):
        cuts = default_cuts(spec, stages)
        whole = build_segments(spec, cuts, seed=11)
        for i, seg in enumerate(whole):
            want, got = seg.state_dict(), build_segment(spec, cuts, 11, i).state_dict()
            assert list(got) == list(want)
            assert all(torch.equal(got[k], want[k]) for k in want), (stages, i)


def test_builtins_are_data_files_shipped_in_the_package():
    assert {"small-cnn", "vgg-small", "resnet-8", "resnet-20"} <= set(builtin_models())
    assert (ZOO / "resnet-8.toml").read_text().count('op = "residual"') == 3
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"ml/zoo/*.toml"' in pyproject  # in the wheel's package data


@pytest.mark.parametrize("name,params", [("resnet-8", 77_754), ("resnet-20", 272_186)])
@pytest.mark.parametrize("shape", SHAPES)
def test_resnet_fits_both_shapes(name, params, shape):
    spec = model_spec(name, shape, 10)
    assert spec.head_end == 3  # the owner keeps only the stem
    assert not any(la["op"] == "batchnorm" for la in spec.layers)
    segs = build_segments(spec, (3, 8), seed=0)
    x = torch.rand(4, *shape)
    out = assemble(segs)(x)
    assert out.shape == (4, 10)
    n = sum(p.numel() for p in assemble(segs).parameters())
    assert n == params + (shape[0] - 1) * 16 * 9  # only the stem sees the input channels
    assert spec.shapes[3] == (16, *shape[1:]) and spec.shapes[-1] == (10,)
    torch.testing.assert_close(assemble(segs)(x[:1]), out[:1])  # per sample: no batch norm


def test_resolved_layers_are_explicit_and_resolve_to_themselves():
    spec = model_spec("resnet-8", (3, 32, 32), 7)
    block = spec.layers[5]
    assert block["body"][0] == {"op": "conv2d", "in": 16, "out": 32, "kernel": 3, "stride": 2,
                                "padding": 1, "groups": 1, "bias": False}
    assert block["shortcut"][1] == {"op": "groupnorm", "groups": 8, "eps": 1e-5,
                                    "affine": True, "channels": 32}
    assert spec.layers[-1] == {"op": "linear", "in": 64, "out": 7, "bias": True}
    again = resolve_spec("resnet-8", json.loads(json.dumps(spec.layers)), (3, 32, 32), 7, 3)
    assert again == spec and again.digest((3,)) == spec.digest((3,))


def test_every_op_builds():
    layers = [{"op": "conv2d", "out": 8, "kernel": 3, "padding": 1, "groups": 1},
              {"op": "gelu"}, {"op": "avgpool", "kernel": 2},
              {"op": "conv2d", "out": 8, "kernel": 3, "padding": 1, "groups": 4, "bias": False},
              {"op": "layernorm"}, {"op": "maxpool", "kernel": 3, "stride": 2, "padding": 1},
              {"op": "residual", "body": [{"op": "conv2d", "out": 8, "kernel": 1},
                                          {"op": "groupnorm", "groups": 2}]},
              {"op": "adaptive_avgpool", "size": 2}, {"op": "flatten"},
              {"op": "dropout", "p": 0.1}, {"op": "linear", "out": 5}, {"op": "relu"},
              {"op": "linear", "out": "classes"}]
    spec = resolve_spec("zoo-of-ops", layers, (3, 12, 12), 4, 2)
    assert [s for s in spec.shapes] == [(3, 12, 12), (8, 12, 12), (8, 12, 12), (8, 6, 6),
                                        (8, 6, 6), (8, 6, 6), (8, 3, 3), (8, 3, 3), (8, 2, 2),
                                        (32,), (32,), (5,), (5,), (4,)]
    assert spec.layers[4]["shape"] == [8, 6, 6] and spec.layers[10]["in"] == 32
    net = assemble(build_segments(spec, (2,), 0)).eval()
    assert net(torch.rand(2, 3, 12, 12)).shape == (2, 4)


BASE = [{"op": "conv2d", "out": 8, "kernel": 3}, {"op": "relu"}, {"op": "flatten"},
        {"op": "linear", "out": "classes"}]


@pytest.mark.parametrize("layers,message", [
    ([{"op": "conv3d", "out": 8}, *BASE[1:]], "layer 0: unknown op 'conv3d'"),
    ([{"out": 8}, *BASE[1:]], "layer 0: a layer is a table with op"),
    ([{"op": "conv2d", "out": 8, "kernal": 3}, *BASE[1:]],
     "layer 0 (conv2d): unknown parameter kernal; conv2d takes out, kernel"),
    ([{"op": "conv2d", "out": 8}, *BASE[1:]], "layer 0 (conv2d): missing parameter kernel"),
    ([{"op": "conv2d", "out": 8, "kernel": "3"}, *BASE[1:]],
     "layer 0 (conv2d): kernel must be an integer in 1..16777216, got '3'"),
    ([{"op": "conv2d", "out": 8, "kernel": 3, "bias": 1}, *BASE[1:]],
     "layer 0 (conv2d): bias must be true or false, got 1"),
    ([*BASE[:3], {"op": "dropout", "p": 1.5}, BASE[3]], "layer 3 (dropout): p must be"),
    ([{"op": "conv2d", "out": 8, "kernel": 30}, *BASE[1:]],
     "layer 0 (conv2d) does not fit its input 1x28x28"),
    ([{"op": "conv2d", "out": 6, "kernel": 3, "groups": 4}, *BASE[1:]],
     "layer 0 (conv2d) does not fit its input 1x28x28"),
    ([BASE[0], {"op": "groupnorm", "groups": 3}, *BASE[1:]],
     "layer 1 (groupnorm) does not fit its input 8x26x26"),
    ([*BASE[:2], {"op": "linear", "out": "classes"}],
     "layer 2 (linear) takes a flat input (features), but its input is 8x26x26: put"),
    ([*BASE[:3], {"op": "linear", "in": 1000, "out": "classes"}],
     "layer 3 (linear): in = 1000, but its input is 5408"),
    ([*BASE[:3], {"op": "maxpool", "kernel": 2}, BASE[3]],
     "layer 3 (maxpool) takes C x H x W feature maps, but its input is 5408"),
    ([BASE[0], {"op": "residual", "body": [{"op": "relu"}, {"op": "conv2d", "out": 4,
                                                            "kernel": 3, "groups": 3}]},
      *BASE[1:]], "layer 1.body.1 (conv2d) does not fit its input 8x26x26"),
    ([BASE[0], {"op": "residual", "body": [{"op": "conv2d", "out": 16, "kernel": 1}]},
      *BASE[1:]], "layer 1 (residual): its body turns 8x26x26 into 16x26x26 but its shortcut "
                  "into 8x26x26"),
    ([BASE[0], {"op": "residual"}, *BASE[1:]], "layer 1 (residual): missing parameter body"),
    (BASE[:3], "its output is 5408 per sample, but must be 10"),
    ([BASE[0], {"op": "avgpool", "kernel": 64}, *BASE[1:]],
     "layer 1 (avgpool) does not fit its input 8x26x26"),
])
def test_a_bad_spec_names_the_layer_and_the_shapes(layers, message):
    with pytest.raises(ConfigError) as info:
        resolve_spec("bad", layers, (1, 28, 28), 10, 1)
    assert message in str(info.value)


def test_bad_cuts_and_default_cut():
    with pytest.raises(ConfigError, match="default_cut 4 must be a top-level layer index in 1..3"):
        resolve_spec("bad", BASE, (1, 28, 28), 10, 4)
    cfg = load_config(None, {"model": {"name": "resnet-8", "cuts": [3, 3]}})
    with pytest.raises(ConfigError, match=r"\[model\] on 1x28x28 images, 10 outputs: cuts "
                                          r"\[3, 3\] must be 2 strictly increasing top-level"):
        configured_split(cfg, (1, 28, 28), 10)
    cfg = load_config(None, {"model": {"name": "resnet-8", "cuts": [3, 12]}})
    with pytest.raises(ConfigError, match="in 1..11"):
        configured_split(cfg, (1, 28, 28), 10)


def test_config_inline_layers_tables_and_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\ndefault_cut = 2\n'
                    '[[model.layers]]\nop = "conv2d"\nout = 4\nkernel = 3\n'
                    '[[model.layers]]\nop = "residual"\n'
                    'body = [{ op = "conv2d", out = 4, kernel = 3, padding = 1 }]\n'
                    '[[model.layers]]\nop = "flatten"\n'
                    '[[model.layers]]\nop = "linear"\nout = "classes"\n')
    cfg = load_config(path)
    assert cfg.model.name == "custom" and len(cfg.model.layers) == 4
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())  # the run's config.toml holds the layers inline
    assert load_config(again) == cfg
    spec, cuts, tail = configured_split(cfg, (3, 32, 32), 10)
    assert cuts == (2, 3) and tail == 0 and spec.layers[1]["body"][0]["in"] == 4


def test_config_spec_file_is_relative_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    shutil.copy(ZOO / "resnet-8.toml", tmp_path / "models" / "mine.toml")
    path = tmp_path / "c.toml"
    path.write_text('[model]\nspec = "models/mine.toml"\n')
    monkeypatch.chdir("/")  # not relative to the working directory
    cfg = load_config(path)
    assert cfg.model.name == "resnet-8" and cfg.model.spec == "" and cfg.model.default_cut == 3
    spec, cuts, _ = configured_split(cfg, (1, 28, 28), 10)
    assert spec == model_spec("resnet-8", (1, 28, 28), 10) and cuts[0] == 3
    for body, message in [('spec = "nope.toml"', "model spec file .*nope.toml does not exist"),
                          ('spec = "models/mine.toml"\nlayers = [{ op = "relu" }]',
                           "gives both spec"),
                          ('name = "resnet-9"', "'resnet-9' is not a built-in model"),
                          ('layers = ["relu"]', "layer 0 must be a table")]:
        path.write_text(f"[model]\n{body}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    (tmp_path / "models" / "bad.toml").write_text('name = "x"\nlayer = []\n')
    path.write_text('[model]\nspec = "models/bad.toml"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path)


def test_every_model_key_is_documented_with_its_default():
    text = load_config(None).to_toml()
    section = text[text.index("[model]"):text.index("[participants]")]
    for key in ("name", "spec", "layers", "default_cut", "cuts"):
        assert f"\n{key} = " in section
    assert section.count("\n# ") == 5


def test_prepare_refuses_a_bad_spec_before_any_key_or_directory(tmp_path):
    path = write_config(tmp_path, trainers=2, model={"layers": [
        {"op": "conv2d", "out": 8, "kernel": 3}, {"op": "relu"},
        {"op": "linear", "out": "classes"}]})
    with pytest.raises(ConfigError, match=r"layer 2 \(linear\) takes a flat input \(features\), "
                                          r"but its input is 8x26x26"):
        prepare(str(path), {}, None, free_ports=False)
    assert not (tmp_path / "keys").exists() and not (tmp_path / "runs").exists()


def test_plan_carries_the_layers_and_the_file_alone_loads(tmp_path):
    cfg = load_config(None, {"model": {"name": "resnet-8"}})
    spec, cuts, _ = configured_split(cfg, (3, 32, 32), 10)
    plan = Plan(spec.name, (3, 32, 32), 10, cuts, 5, 1e-3, 16, layers=spec.layers)
    back = Plan.from_meta(plan.to_meta())
    assert back == plan and plan_spec(back) == spec
    assert plan_spec(back).digest(cuts) == spec.digest(cuts) != spec.digest((3, 9))
    # a trainer builds from the layers, not the name: renaming the model keeps the network
    renamed = Plan.from_meta(plan.to_meta().replace('"model": "resnet-8"', '"model": "other"'))
    assert plan_spec(renamed).layers == spec.layers
    segs = build_segments(spec, cuts, 5)
    file = tmp_path / "model.safetensors"
    save_file(state_dict_with_prefix(segs), str(file), metadata=model_metadata(
        run_id="r", spec=spec, plan=plan, digest=spec.digest(cuts), release=None))
    with safe_open(str(file), "pt") as f:
        meta_spec = json.loads(f.metadata()["spec"])
    assert meta_spec["layers"][3]["body"][0]["in"] == 16  # resolved: the file alone is enough
    net = load_model(file)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(net(x), assemble(segs).eval()(x))


# --- over the bus ------------------------------------------------------------------------------

def _colour_npz(path: Path, classes: int = 4, n_train: int = 320, n_test: int = 128) -> None:
    """32x32x3 images: a per-class random 4x4 colour template, upsampled, plus noise."""
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (classes, 4, 4, 3)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.arange(n) % classes)
        big = templates[y].repeat(8, 1).repeat(8, 2)
        return np.clip(big + rng.normal(0, 40, big.shape), 0, 255).astype(np.uint8), y

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)


def _bus_run(tmp_path: Path, run_id: str, **sections) -> tuple[float, object]:
    path = write_config(tmp_path, run_id=run_id, trainers=2, **sections)
    assert run(str(path), echo=False, timeout_s=120, free_ports=False) == 0
    cfg = load_config(path)
    layout = RunLayout(cfg.run_dir)
    summary = json.loads(layout.summary.read_text())
    owner = load_public(Path(cfg.participants.keys) / f"{cfg.participants.owner}.pub")
    result = verify_log(layout.log, owner=owner, witnessed=[layout.checkpoint.read_text()])
    return summary["test_accuracy"], result


def test_resnet8_trains_over_the_bus_on_fashion_mnist(tmp_path):
    """480 Fashion-MNIST images, one epoch of batch 16 (30 steps): well above chance (0.1; the
    in-process reference of this split reaches 0.43)."""
    acc, verified = _bus_run(tmp_path, "r8-fashion", model={"name": "resnet-8"},
                             data={"name": "fashion-mnist", "train_limit": 480,
                                   "test_limit": 300},
                             run={"batch_size": 16, "lr": 1e-3})
    assert verified.ok, verified.failure
    print(f"resnet-8 over the bus, fashion-mnist subset: test accuracy {acc:.3f}")
    assert acc >= 0.3, f"test accuracy {acc}"


def test_resnet8_spec_file_trains_over_the_bus_on_32x32x3(tmp_path):
    """The ResNet spec, copied as a user's own file, on a 32x32x3 npz of 4 classes."""
    _colour_npz(tmp_path / "colours.npz")
    shutil.copy(ZOO / "resnet-8.toml", tmp_path / "my-resnet.toml")
    acc, verified = _bus_run(tmp_path, "r8-npz", model={"spec": str(tmp_path / "my-resnet.toml")},
                             data={"name": "npz", "path": str(tmp_path / "colours.npz")},
                             run={"batch_size": 16, "lr": 1e-3})
    assert verified.ok, verified.failure
    print(f"resnet-8 over the bus, 32x32x3 npz: test accuracy {acc:.3f}")
    assert acc >= 0.6, f"test accuracy {acc}"  # chance: 0.25


def test_a_laplace_release_too_wide_for_the_lattice_is_refused_before_the_run():
    wide = [{"op": "conv2d", "out": 1400, "kernel": 3, "padding": 1}, {"op": "flatten"},
            {"op": "linear", "out": "classes"}]
    over = {"model": {"layers": wide, "default_cut": 1}, "run": {"batch_size": 8},
            "privacy": {"mechanism": "laplace", "noise_multiplier": 1.0}}
    with pytest.raises(ConfigError, match=r"\[privacy\] at cut 1: a Laplace release of 1097600 "
                                          r"values"):
        configured_split(load_config(None, over), (1, 28, 28), 10)
    over["privacy"]["mechanism"] = "gaussian"  # L2: no such limit
    configured_split(load_config(None, over), (1, 28, 28), 10)
