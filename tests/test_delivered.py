"""The delivered model as a user gets it (`clicooper_bus.load_model`, `clicooper predict`): a
tiny run over the bus, then the model, loaded from its run directory or from the file alone,
gives the summary's test accuracy exactly, with the owner's release clip and label decoding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import clicooper_bus
from clicooper_bus.config import load_config
from clicooper_bus.errors import ClicooperError
from clicooper_bus.ml.data import load_dataset
from clicooper_bus.ml.delivered import predict
from clicooper_bus.tools.cli import main
from clicooper_bus.tools.run import run
from tests.busrun import write_config


def _train(tmp: Path, run_id: str, **sections) -> tuple[Path, Path, dict]:
    """A finished tiny run: (run dir, its test set as a user's npz, its summary)."""
    path = write_config(tmp, run_id=run_id, **sections)
    assert run(str(path), echo=False, timeout_s=240, free_ports=False) == 0
    cfg = load_config(path)
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed).limit(
        cfg.data.train_limit or None, cfg.data.test_limit or None)
    npz = tmp / "test.npz"  # the documented layout: uint8 N x H x W, integer labels
    np.savez(npz, x_test=data.x_test[:, 0], y_test=data.y_test)
    return cfg.run_dir, npz, json.loads((cfg.run_dir / "summary.json").read_text())


def _scores(model: torch.nn.Module, npz: Path) -> np.ndarray:
    return predict(model, npz).scores


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Undefended: evaluated through the chain after 6 steps (not yet perfect), two trainers."""
    return _train(tmp_path_factory.mktemp("plain"), "use", trainers=2, run={"max_steps": 6})


def test_load_model_reproduces_the_summary_accuracy_exactly(plain):
    run_dir, npz, summary = plain
    model = clicooper_bus.load_model(run_dir)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.scores == "logits" and model.classes == 10 and model.input_shape == (1, 28, 28)
    p = predict(model, npz)
    assert p.scores.shape == (len(p.labels), 10)
    assert p.accuracy == summary["test_accuracy"], (p.accuracy, summary["test_accuracy"])
    assert 0.1 < p.accuracy < 1.0  # trained, and not a set every model gets right


def test_the_file_alone_is_enough(plain, tmp_path):
    run_dir, npz, _ = plain
    alone = tmp_path / "elsewhere" / "delivered.safetensors"
    alone.parent.mkdir()
    shutil.copy(run_dir / "model.safetensors", alone)
    with safe_open(str(alone), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "clicooper-model/1" and json.loads(meta["plan"])["cuts"]
    got = _scores(clicooper_bus.load_model(alone), npz)
    assert np.array_equal(got, _scores(clicooper_bus.load_model(run_dir), npz))


def test_a_file_without_the_metadata_loads_from_its_run_only(plain, tmp_path):
    """A model file from before the metadata: from its run directory (plan from the log's
    roster, release from config.toml) it gives the same scores; alone, a clear refusal."""
    run_dir, npz, _ = plain
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    with safe_open(str(old / "model.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, old / "model.safetensors",
              metadata={k: meta[k] for k in ("run_id", "model", "model_spec", "cuts")})
    assert np.array_equal(_scores(clicooper_bus.load_model(old), npz),
                          _scores(clicooper_bus.load_model(run_dir), npz))
    alone = tmp_path / "old.safetensors"
    shutil.copy(old / "model.safetensors", alone)
    with pytest.raises(ClicooperError, match="written before model files carried their spec"):
        clicooper_bus.load_model(alone)


def test_predict_command_prints_the_accuracy_and_writes_predictions(plain, tmp_path, capsys):
    run_dir, npz, summary = plain
    csv = tmp_path / "pred.csv"
    assert main(["predict", str(run_dir), "--data", str(npz), "--out", str(csv)]) == 0
    out = capsys.readouterr().out
    assert f"accuracy {summary['test_accuracy']:.4f}" in out, out
    rows = np.loadtxt(csv, delimiter=",", skiprows=1, dtype=np.int64)
    with np.load(npz) as z:
        labels = z["y_test"]
    assert rows.shape == (len(labels), 3) and np.array_equal(rows[:, 2], labels)
    assert (rows[:, 1] == labels).mean() == summary["test_accuracy"]
    # unlabelled images, npz out: predictions only
    bare, out_npz = tmp_path / "bare.npz", tmp_path / "pred.npz"
    with np.load(npz) as z:
        np.savez(bare, x=z["x_test"][:7])
    assert main(["predict", str(run_dir / "model.safetensors"), "--data", str(bare),
                 "--out", str(out_npz)]) == 0
    assert "no labels" in capsys.readouterr().out
    with np.load(out_npz) as z:
        assert sorted(z.files) == ["prediction", "scores"]
        assert np.array_equal(z["prediction"], rows[:7, 1])


def test_predict_refuses_images_of_another_layout(plain, tmp_path, capsys):
    run_dir, npz, _ = plain
    nchw = tmp_path / "nchw.npz"
    with np.load(npz) as z:
        np.savez(nchw, x=z["x_test"][:, None].repeat(3, axis=1))  # N x 3 x 28 x 28
    assert main(["predict", str(run_dir), "--data", str(nchw), "--out",
                 str(tmp_path / "p.npz")]) == 1
    err = capsys.readouterr().err
    assert "x must be uint8 N x 28 x 28" in err and "(10, 3, 28, 28)" not in err, err


def test_obfuscated_labels_are_decoded_with_the_owners_groups(tmp_path):
    """Label obfuscation (3 pseudo-classes per class) and clipped Gaussian releases, evaluated
    by the owner on the delivered model: load_model applies the clip and the decoding and gives
    the summary's accuracy exactly; the file alone needs the groups."""
    run_dir, npz, summary = _train(
        tmp_path, "obf", trainers=1, run={"max_steps": 80, "epochs": 3},
        privacy={"label_gamma": 3, "mechanism": "gaussian", "noise_multiplier": 0.1,
                 "clip": 5.0, "evaluate": "owner"},
        # after both convolutions (1,568 values a release): at the offloading cut's 3,136 the
        # same clip and noise leave 80 steps at chance, and this test is about the decoding
        model={"cuts": [6]})
    model = clicooper_bus.load_model(run_dir)
    assert model.scores == "probabilities"
    p = predict(model, npz)
    assert p.scores.shape[1] == 10 and np.allclose(p.scores.sum(1), 1.0, atol=1e-5)
    assert p.accuracy == summary["test_accuracy"], (p.accuracy, summary["test_accuracy"])
    assert p.accuracy > 0.2  # well above chance (0.1): the decoding is exercised
    # the owner's release clip is in the model, and it matters: without it the scores differ
    unclipped = torch.nn.Sequential(*(m for m in model if type(m).__name__ != "Clip"))
    unclipped.input_shape, unclipped.batch_size = model.input_shape, model.batch_size
    assert len(unclipped) == len(model) - 1
    assert not np.allclose(_scores(unclipped, npz), p.scores)
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    shutil.copy(run_dir / "model.safetensors", alone)
    with safe_open(str(alone), framework="pt") as f:
        meta = f.metadata()  # the grouping stays with the owner
    groups = json.loads((run_dir / "label_groups.json").read_text())["groups"]
    assert not any("group" in k for k in meta) and json.dumps(groups) not in json.dumps(meta)
    with pytest.raises(ClicooperError, match=str(alone.parent / "label_groups.json")):
        clicooper_bus.load_model(alone)
    got = clicooper_bus.load_model(alone, label_groups=run_dir / "label_groups.json")
    assert np.array_equal(_scores(got, npz), p.scores)


# --- tampered files (no run needed): refused by name, nothing allocated first -------------------

def _model_file(tmp: Path, edit=None, *, fix_digest: bool = True) -> Path:
    """A small-cnn model file written as the owner writes one (`model_metadata`), its spec and
    plan documents passed through `edit(spec_doc, plan_doc)` first; the digest recomputed (as
    anyone can: it is unkeyed) unless `fix_digest` is false."""
    from clicooper_bus.ml.delivered import model_metadata
    from clicooper_bus.ml.models import (
        build_segments,
        default_cuts,
        model_spec,
        resolve_spec,
        state_dict_with_prefix,
    )
    from clicooper_bus.plan import Plan

    spec = model_spec("small-cnn", (1, 28, 28), 10)
    cuts = default_cuts(spec, 2)
    plan = Plan("small-cnn", (1, 28, 28), 10, cuts, 0, 0.01, 64, layers=spec.layers)
    meta = model_metadata(run_id="r", spec=spec, plan=plan, digest=spec.digest(cuts),
                          release=None)
    weights = state_dict_with_prefix(build_segments(spec, cuts, 0))
    sdoc, pdoc = json.loads(meta["spec"]), json.loads(meta["plan"])
    if edit is not None:
        edit(sdoc, pdoc)
    meta["spec"], meta["plan"] = _deepen(json.dumps(sdoc)), json.dumps(pdoc)
    if fix_digest:
        try:
            edited = resolve_spec(sdoc["name"], sdoc["layers"], tuple(sdoc["input_shape"]),
                                  sdoc["classes"], sdoc["head_end"])
            meta["model_spec"] = edited.digest(tuple(pdoc["cuts"]))
        except (ClicooperError, RecursionError):
            pass
    path = tmp / "model.safetensors"
    save_file(weights, str(path), metadata=meta)
    return path


def test_an_untampered_file_loads(tmp_path):
    model = clicooper_bus.load_model(_model_file(tmp_path))
    assert model.batch_size == 64 and model.classes == 10


def _hidden_layer(sdoc, pdoc):
    """The 128-unit hidden layer widened to 2**16 units (0.4 GB of weights if it were built):
    the same tensor names, other shapes."""
    layers = sdoc["layers"]
    hidden = next(i for i, la in enumerate(layers) if la["op"] == "linear")
    layers[hidden]["out"] = layers[-1]["in"] = 2**16
    pdoc["layers"] = layers


def _deep(sdoc, pdoc):
    """The spec's JSON nested 2000 deep (more than Python's json can parse)."""
    sdoc["layers"][1] = "DEEP"


def _deepen(text: str) -> str:
    return text.replace('"DEEP"', '{"op": "residual", "body": [' * 2000 + '{"op": "relu"}'
                        + "]}" * 2000)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s, p: p.update(seed=2**70),
     "malformed clicooper-model/1 metadata (roster plan: seed = 1180591620717411303424 is "
     "outside 0..18446744073709551615)"),
    (lambda s, p: p.update(batch_size=-5), "(roster plan: batch_size = -5 is outside 1..65536)"),
    (lambda s, p: p.update(classes=3), "(its plan has 3 outputs (classes 3, outputs 0) but its "
                                       "spec 10)"),
    (lambda s, p: p.update(classes=5), "(its plan has 5 outputs (classes 5, outputs 0) but its "
                                       "spec 10)"),
    (lambda s, p: p.update(input_shape=[1, 32, 32]),
     "its plan's input_shape [1, 32, 32] is not its spec's [1, 28, 28]"),
    (lambda s, p: p["layers"][-1].update(bias=False), "(its plan's layers are not its spec's)"),
    (_deep, "(its spec nests too deep)"),
    (_hidden_layer, "weight is torch.float32 128x1568, but the spec makes it torch.float32 "
                    "65536x1568"),
])
def test_a_tampered_model_file_is_refused_by_name(tmp_path, edit, message):
    path = _model_file(tmp_path, edit)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    with pytest.raises(ClicooperError) as err:
        clicooper_bus.load_model(path)
    assert message in str(err.value) and str(path) in str(err.value)
    status = Path("/proc/self/status").read_text()
    peak, now = (int(status.split(f"{k}:")[1].split()[0]) << 10 for k in ("VmHWM", "VmRSS"))
    assert peak - now < 200 << 20  # the 0.4 GB layer was never allocated


def test_a_digest_that_does_not_match_says_what_it_proves(tmp_path):
    def edit(sdoc, pdoc):  # spec and plan edited alike, the digest left alone
        sdoc["layers"][-1]["bias"] = pdoc["layers"][-1]["bias"] = False

    with pytest.raises(ClicooperError) as err:
        clicooper_bus.load_model(_model_file(tmp_path, edit, fix_digest=False))
    msg = str(err.value)
    assert "its spec and cuts do not hash to the digest it carries" in msg
    assert "the file's metadata is inconsistent with itself" in msg
    assert "the digest is unkeyed" in msg.lower() and "signed log" in msg
    assert "was edited" not in msg
