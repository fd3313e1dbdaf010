"""Bring your own data: every npz pitfall is refused (naming the array and the fix) or warned
about before any process starts, and a refused file leaves no run directory behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clicooper_bus.config import load_config
from clicooper_bus.errors import ConfigError
from clicooper_bus.ml.data import load_dataset, load_npz
from clicooper_bus.ml.npz_check import CheckedNpz, DataError, NpzWarning, check_npz
from clicooper_bus.tools.run import prepare, run
from tests.busrun import write_config


def arrays(n: int = 48, nt: int = 24, side: int = 8, channels: int | None = 3, k: int = 4,
           seed: int = 0) -> dict[str, np.ndarray]:
    """A valid dataset in shuffled order, every class in both sets."""
    rng = np.random.default_rng(seed)
    shape = (side, side) if channels is None else (side, side, channels)

    def labels(m: int) -> np.ndarray:
        return rng.permutation(np.arange(m) % k).astype(np.int64)

    return {"x_train": rng.integers(0, 256, (n, *shape), dtype=np.uint8), "y_train": labels(n),
            "x_test": rng.integers(0, 256, (nt, *shape), dtype=np.uint8), "y_test": labels(nt)}


def save(tmp_path: Path, name: str = "d.npz", **a: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **a)
    return path


def refused(tmp_path: Path, *fragments: str, **a: np.ndarray) -> str:
    """Check that the file of arrays `a` is refused with every fragment in its message."""
    with pytest.raises(DataError) as exc:
        check_npz(save(tmp_path, **a))
    message = str(exc.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def warned(tmp_path: Path, *fragments: str, **a: np.ndarray) -> CheckedNpz:
    """Check that the file is accepted with one warning holding every fragment."""
    d = check_npz(save(tmp_path, **a))
    assert len(d.warnings) == 1, d.warnings
    for fragment in fragments:
        assert fragment in d.warnings[0], d.warnings[0]
    return d


# --- what is accepted ---------------------------------------------------------------------


def test_a_valid_file_loads_without_warnings(tmp_path):
    a = arrays()
    d = check_npz(save(tmp_path, **a))
    assert d.warnings == () and d.classes == 4
    assert d.x_train.shape == (48, 3, 8, 8) and d.x_test.shape == (24, 3, 8, 8)
    assert (d.x_train[5, 2] == a["x_train"][5, :, :, 2]).all()  # channels last -> first
    assert (d.y_test == a["y_test"]).all()  # the user's order is kept
    gray = check_npz(save(tmp_path, "g.npz", **arrays(channels=None)))
    assert gray.x_train.shape == (48, 1, 8, 8) and gray.warnings == ()


def test_the_older_x_y_names_still_hold_out_the_last_fifth(tmp_path):
    a = arrays(n=50)
    d = load_npz(save(tmp_path, x=a["x_train"], y=a["y_train"]))
    assert d.x_train.shape == (40, 3, 8, 8) and d.x_test.shape == (10, 3, 8, 8)
    assert (d.y_test == a["y_train"][40:]).all()
    d = load_npz(save(tmp_path, "t.npz", x=a["x_train"], y=a["y_train"], x_test=a["x_test"],
                      y_test=a["y_test"]))
    assert len(d.x_train) == 50 and len(d.x_test) == 24


# --- the pitfalls -----------------------------------------------------------------


def test_string_labels_are_refused_with_the_mapping(tmp_path):
    a = arrays()
    names = np.array(["cat", "dog", "emu", "fox"])
    refused(tmp_path, "y_train holds strings ('cat', 'dog'", "integers 0..K-1",
            "names, y_train = np.unique(y_train, return_inverse=True)",
            **{**a, "y_train": names[a["y_train"]]})
    refused(tmp_path, "y_test holds strings", "save y_test.astype(np.int64)",
            **{**a, "y_test": a["y_test"].astype(str)})


def test_labels_of_shape_n_by_1_are_squeezed_with_a_warning(tmp_path):
    a = arrays()
    d = warned(tmp_path, "y_train has shape (48, 1)", "read as (48,) labels",
               "y_train.reshape(-1)", **{**a, "y_train": a["y_train"][:, None]})
    assert d.y_train.shape == (48,) and (d.y_train == a["y_train"]).all()
    with pytest.warns(NpzWarning, match=r"y_train has shape \(48, 1\)"):
        assert load_npz(save(tmp_path, "w.npz", **{**a, "y_train": a["y_train"][:, None]}
                             )).classes == 4
    one_hot = np.eye(4, dtype=np.int64)[a["y_train"]]
    refused(tmp_path, "y_train has shape (48, 4)", "y_train.argmax(1)",
            **{**a, "y_train": one_hot})


def test_a_test_set_of_another_image_size_is_refused(tmp_path):
    a, b = arrays(), arrays(side=12)
    refused(tmp_path, "x_test's images are 12 x 12 x 3 (H x W x C) but x_train's are 8 x 8 x 3",
            "resize or crop x_test", **{**a, "x_test": b["x_test"]})
    refused(tmp_path, "x_test's images are 8 x 8 x 1", **{**a, "x_test": a["x_test"][..., 0]})


def test_channel_first_images_are_refused_with_the_transpose(tmp_path):
    a = arrays(side=16)
    refused(tmp_path, "x_train has shape (48, 3, 16, 16)", "channel-first",
            "np.transpose(x_train, (0, 2, 3, 1))",
            **{**a, "x_train": a["x_train"].transpose(0, 3, 1, 2)})
    refused(tmp_path, "x_test has shape (24, 1, 16, 16)",
            **{**a, "x_test": a["x_test"][..., :1].transpose(0, 3, 1, 2)})


def test_float_labels_are_read_when_whole_and_refused_otherwise(tmp_path):
    a = arrays()
    d = warned(tmp_path, "y_train is float64 holding whole numbers",
               "y_train.astype(np.int64)", **{**a, "y_train": a["y_train"].astype(float)})
    assert d.y_train.dtype == np.int64 and (d.y_train == a["y_train"]).all()
    soft = a["y_train"].astype(float)
    soft[7] = 2.5
    refused(tmp_path, "y_train is float64 with non-integer labels (e.g. 2.5)", "truncated",
            **{**a, "y_train": soft})
    nan = a["y_test"].astype(float)
    nan[3] = np.nan
    refused(tmp_path, "y_test has 1 NaN or infinite label(s)", **{**a, "y_test": nan})


def test_non_contiguous_labels_are_refused_naming_them(tmp_path):
    a = arrays(k=3)
    refused(tmp_path, "3 distinct label(s): 0, 100, 200", "201 classes, 198 of them empty",
            "np.unique(np.concatenate([y_train, y_test]), return_inverse=True)",
            **{**a, "y_train": a["y_train"] * 100, "y_test": a["y_test"] * 100})
    refused(tmp_path, "3 distinct label(s): 1, 2, 3", "4 classes, 1 of them empty",
            **{**a, "y_train": a["y_train"] + 1, "y_test": a["y_test"] + 1})


def test_a_test_set_sorted_by_class_is_kept_in_order_with_a_warning(tmp_path):
    a = arrays(nt=40)
    order = np.argsort(a["y_test"], kind="stable")
    d = warned(tmp_path, "y_test is ordered by class", "clicooper keeps your order",
               "np.random.default_rng(0).permutation(len(y_test)); x_test, y_test = "
               "x_test[p], y_test[p]",
               **{**a, "x_test": a["x_test"][order], "y_test": a["y_test"][order]})
    assert (d.y_test == np.sort(a["y_test"])).all()  # not reordered: predictions stay aligned


def test_sorted_x_y_cannot_hold_out_a_one_class_test_set(tmp_path):
    a = arrays(n=80)
    order = np.argsort(a["y_train"], kind="stable")
    refused(tmp_path, "y is ordered by class", "would hold only label(s) 3",
            "x, y = x[p], y[p]", x=a["x_train"][order], y=a["y_train"][order])


# --- what a serious tool also checks ------------------------------------------------------


def test_mismatched_lengths_and_empty_arrays_are_refused(tmp_path):
    a = arrays()
    refused(tmp_path, "x_train has 48 images but y_train has 47 labels",
            **{**a, "y_train": a["y_train"][:-1]})
    refused(tmp_path, "x_test is empty (shape (0, 8, 8, 3))", "y_test is empty",
            **{**a, "x_test": a["x_test"][:0], "y_test": a["y_test"][:0]})


def test_float_images_are_refused_with_the_fix_for_their_range(tmp_path):
    a = arrays()
    unit = a["x_train"] / 255.0
    refused(tmp_path, "x_train is float64 with values 0..1", "np.round(x_train * 255)",
            "uint8", **{**a, "x_train": unit})
    refused(tmp_path, "np.round(x_train).astype(np.uint8)",
            **{**a, "x_train": a["x_train"].astype(np.float32)})
    refused(tmp_path, "undo the normalisation", **{**a, "x_train": unit - 0.5})
    unit[0, 0, 0, 0] = np.inf
    refused(tmp_path, "x_train is float64 with 1 NaN or infinite value(s)",
            **{**a, "x_train": unit})


def test_integer_images_of_another_dtype(tmp_path):
    a = arrays()
    d = warned(tmp_path, "x_train is int64, read as uint8", "x_train.astype(np.uint8)",
               **{**a, "x_train": a["x_train"].astype(np.int64)})
    assert d.x_train.dtype == np.uint8
    refused(tmp_path, "x_train is int16 with values", "must be uint8 0..255",
            **{**a, "x_train": a["x_train"].astype(np.int16) * 4})
    warned(tmp_path, "pixels are all 0 or 1", "(x_test * 255).astype(np.uint8)",
           **{**a, "x_test": a["x_test"] % 2})


def test_missing_or_mixed_keys_are_refused_naming_what_was_found(tmp_path):
    a = arrays()
    refused(tmp_path, "no training arrays (found: images, labels)", "x_train",
            images=a["x_train"], labels=a["y_train"])
    refused(tmp_path, "has x_test but no y_test", **{k: v for k, v in a.items() if k != "y_test"})
    refused(tmp_path, "no x_test/y_test", "name the arrays x and y",
            x_train=a["x_train"], y_train=a["y_train"])
    refused(tmp_path, "both x_train/y_train and x/y", x=a["x_train"], y=a["y_train"], **a)
    warned(tmp_path, "arrays names are not used", names=np.arange(3), **a)


def test_pickles_and_non_npz_files_are_refused(tmp_path):
    a = arrays()
    refused(tmp_path, "plain npz arrays", "y_train is an object array",
            **{**a, "y_train": np.array(list(a["y_train"]) + [None], dtype=object)[:-1]})
    np.save(tmp_path / "one.npy", a["x_train"])
    with pytest.raises(DataError, match="single .npy array"):
        check_npz(tmp_path / "one.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="cannot read .* as plain npz arrays"):
        check_npz(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="does not exist"):
        check_npz(tmp_path / "nowhere.npz")


def test_the_number_of_classes_is_bounded(tmp_path):
    a = arrays(n=1001, nt=8)
    refused(tmp_path, "1001 classes, more than 1000", "identifiers or regression targets",
            **{**a, "y_train": np.arange(1001), "y_test": np.arange(8)})
    b = arrays()
    refused(tmp_path, "a single class (label 0)", "at least 2",
            **{**b, "y_train": b["y_train"] * 0, "y_test": b["y_test"] * 0})


def test_every_problem_is_reported_at_once(tmp_path):
    a = arrays(side=16)
    msg = refused(tmp_path, "3 problems", "np.transpose(x_train", "y_test holds strings",
                  "x_test has 24 images but y_test has 23",
                  **{**a, "x_train": a["x_train"].transpose(0, 3, 1, 2),
                     "y_test": a["y_test"][:-1].astype(str)})
    assert msg.count("\n  - ") == 3


# --- before any process, and in the owner ---------------------------------------------------


def _config(tmp_path: Path, data: Path, **data_keys) -> Path:
    return write_config(tmp_path, run_id="byod", trainers=1,
                        data={"name": "npz", "path": str(data), **data_keys})


def test_prepare_refuses_a_bad_file_and_leaves_nothing_behind(tmp_path):
    a = arrays()
    path = _config(tmp_path, save(tmp_path, **{**a, "y_train": a["y_train"].astype(str)}))
    with pytest.raises(DataError, match="y_train holds strings"):
        prepare(str(path), {}, None, free_ports=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "keys").exists()
    assert issubclass(DataError, ConfigError)


def test_prepare_prints_the_warnings(tmp_path, capsys):
    a = arrays()
    path = _config(tmp_path, save(tmp_path, **{**a, "y_test": a["y_test"][:, None]}),
                   test_limit=1)
    cfg, _ = prepare(str(path), {}, None, free_ports=False)
    err = capsys.readouterr().err
    assert "clicooper run: warning:" in err and "y_test has shape (24, 1)" in err
    assert "data.test_limit = 1 keeps the first 1 samples of y_test" in err
    assert cfg.run_dir.is_dir()


def test_the_owner_started_by_hand_refuses_the_same_way(tmp_path):
    a = arrays()
    data = save(tmp_path, **a)
    _, cfg_path = prepare(str(_config(tmp_path, data)), {}, None, free_ports=False)
    # the file changes after prepare: the owner checks it again
    save(tmp_path, **{**a, "y_train": a["y_train"] * 100, "y_test": a["y_test"] * 100})
    with pytest.raises(DataError, match="0, 100, 200, 300"):
        load_dataset("npz", str(data))
    proc = subprocess.run([sys.executable, "-m", "clicooper_bus.services.owner", "--config",
                           str(cfg_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "owner: error:" in proc.stderr and "0, 100, 200, 300" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_tiny_run_on_a_32x32x3_npz_with_n_by_1_labels(tmp_path, capsys):
    a = arrays(n=256, nt=64, side=32, k=4)
    data = save(tmp_path, **{**a, "y_train": a["y_train"][:, None]})
    path = _config(tmp_path, data)
    assert run(str(path), echo=False, timeout_s=240, free_ports=False) == 0
    assert "y_train has shape (256, 1)" in capsys.readouterr().err
    summary = json.loads((load_config(path).run_dir / "summary.json").read_text())
    assert summary["dataset"] == "npz" and 0.0 <= summary["test_accuracy"] <= 1.0
