"""Reading and checking a user's own dataset (`data.name = "npz"`) before anything runs.

The file holds plain numeric arrays (no pickles: `np.load(..., allow_pickle=False)`):

- `x_train`, `y_train`, `x_test`, `y_test`; or `x`, `y` (the older names) with optional
  `x_test`, `y_test`. Without a test set the last 20 % of the training arrays is held out.
- images `x_*`: uint8, N x H x W (one channel) or N x H x W x C (channels last);
- labels `y_*`: integers 0..K-1, one per image, shape (N,), every class 0..K-1 present in
  the training or the test labels, 2 <= K <= 1000.

`check_npz` refuses what is wrong (`DataError`, every problem of the file at once, each naming
the array, what is wrong and the fix) and returns warnings for what is suspicious but usable.
What it accepts with a warning, converted losslessly: labels of shape (N, 1) (squeezed),
float or bool labels that are whole numbers, integer images of another dtype within 0..255.
It never reorders the user's samples (predictions stay aligned with the file); a test set
ordered by class is a warning, not a silent shuffle.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from clicooper_bus.errors import ConfigError

MIN_CLASSES, MAX_CLASSES = 2, 1000
HOLDOUT = 0.2  # the share of x/y held out as the test set when the file has none
CHANNELS = (1, 3, 4)  # channel counts that make an N x C x H x W layout detectable
TRAIN_KEYS = (("x_train", "y_train"), ("x", "y"))
TEST_KEYS = ("x_test", "y_test")
SHUFFLE_FIX = ("shuffle both with one permutation: p = np.random.default_rng(0).permutation("
               "len({y})); {x}, {y} = {x}[p], {y}[p]")


class DataError(ConfigError):
    """A user's dataset file that cannot be used; the message names each array at fault and
    the fix."""


class NpzWarning(UserWarning):
    """A user's dataset that is usable but suspicious."""


@dataclass(frozen=True)
class CheckedNpz:
    """A checked dataset: images uint8 N x C x H x W, labels int64 in 0..classes-1."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    warnings: tuple[str, ...]


@dataclass
class _Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_npz(path: str | os.PathLike[str] | None, *, train_limit: int = 0,
              test_limit: int = 0) -> CheckedNpz:
    """Read and check the npz at `path`; `train_limit` / `test_limit` (0: none) are the
    config's `data.*_limit`, to warn when the first samples miss classes. Raises DataError
    (a ConfigError) listing every problem found."""
    if not path:
        raise DataError("dataset npz needs data.path: an .npz file with x_train, y_train, "
                        "x_test, y_test (see the README, 'Bring your own data')")
    f = _Findings()
    arrays = _read(path)
    names = _names(arrays, f)
    if names is None:
        _raise(path, f)
    xn, yn, xtn, ytn = names
    x, y = _images(xn, arrays[xn], f), _labels(yn, arrays[yn], f)
    xt = _images(xtn, arrays[xtn], f) if xtn else None
    yt = _labels(ytn, arrays[ytn], f) if ytn else None
    _same_length(xn, arrays[xn], yn, arrays[yn], f)
    if xtn:
        _same_length(xtn, arrays[xtn], ytn, arrays[ytn], f)
    elif x is not None and y is not None and len(x) == len(y):
        x, xt, y, yt = _hold_out(xn, x, yn, y, f)
        xtn, ytn = f"{xn} (held out)", f"{yn} (held out)"
    if xt is not None and x is not None:
        _same_image_shape(xn, x, xtn, xt, f)
    classes = _classes(yn, y, ytn, yt, f) if y is not None and yt is not None else 0
    if f.errors:
        _raise(path, f)
    _order(ytn, yt, classes, f)
    _limits(yn, y, train_limit, "train", f)
    _limits(ytn, yt, test_limit, "test", f)
    return CheckedNpz(x, y, xt, yt, classes, tuple(f.warnings))


def _raise(path: str | os.PathLike[str], f: _Findings) -> NoReturn:
    """Raises DataError with every error in `f`."""
    if len(f.errors) == 1:
        raise DataError(f"{path}: {f.errors[0]}")
    raise DataError(f"{path}: {len(f.errors)} problems:\n" + "\n".join(f"  - {e}" for e in f.errors))


def _read(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array of the file. Raises DataError for a missing, non-npz or pickled file."""
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"dataset file {path} does not exist (data.path)") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as plain npz arrays: {exc}; save it with "
                        f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
                        ) from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an npz archive: save it with "
                        f"np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    arrays, pickled = {}, []
    with z:
        for k in z.files:
            try:
                arrays[k] = z[k]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile):
                pickled.append(k)
    if pickled:
        raise DataError(f"cannot read {path} as plain npz arrays: {', '.join(pickled)} "
                        f"{'is an object array' if len(pickled) == 1 else 'are object arrays'} "
                        f"(pickled Python objects, which clicooper never loads): save numeric "
                        f"arrays, e.g. np.stack(list_of_images).astype(np.uint8) and "
                        f"np.asarray(labels, dtype=np.int64)")
    return arrays


def _names(arrays: dict[str, np.ndarray], f: _Findings
           ) -> tuple[str, str, str | None, str | None] | None:
    """(x, y, x_test, y_test) names; the test names None when the file has no test set."""
    have = set(arrays)
    forms = [(xk, yk) for xk, yk in TRAIN_KEYS if xk in have or yk in have]
    found = ", ".join(sorted(have)) or "no arrays"
    if len(forms) > 1:
        f.errors.append(f"it has both x_train/y_train and x/y ({found}): keep one pair")
        return None
    if not forms:
        f.errors.append(f"it has no training arrays (found: {found}): name them x_train and "
                        f"y_train, e.g. np.savez(path, x_train=..., y_train=..., x_test=..., "
                        f"y_test=...)")
        return None
    pairs = [forms[0], TEST_KEYS]
    for pair in pairs:
        missing = [k for k in pair if k not in have]
        if len(missing) == 1:
            f.errors.append(f"it has {pair[1 - pair.index(missing[0])]} but no {missing[0]} "
                            f"(found: {found}): add {missing[0]}")
    if forms[0] == TRAIN_KEYS[0] and not set(TEST_KEYS) & have:
        f.errors.append(f"it has x_train/y_train but no x_test/y_test (found: {found}): add "
                        f"x_test and y_test (or name the arrays x and y to hold out their last "
                        f"{HOLDOUT:.0%} as the test set)")
    if f.errors:
        return None
    extra = have - {*forms[0], *TEST_KEYS}
    if extra:
        f.warnings.append(f"arrays {', '.join(sorted(extra))} are not used (only x_train, "
                          f"y_train, x_test, y_test are)")
    test = TEST_KEYS if set(TEST_KEYS) <= have else (None, None)
    return (*forms[0], *test)


def _images(name: str, x: np.ndarray, f: _Findings) -> np.ndarray | None:
    """`x` as uint8 N x C x H x W, or None after recording why it cannot be."""
    if x.ndim not in (3, 4):
        f.errors.append(_rank_error(name, x))
        return None
    if 0 in x.shape:
        f.errors.append(f"{name} is empty (shape {x.shape}): it needs at least one image of "
                        f"at least 1 x 1 pixels")
        return None
    if x.ndim == 4 and x.shape[1] in CHANNELS and x.shape[3] not in CHANNELS:
        f.errors.append(f"{name} has shape {x.shape}, which looks channel-first (N x C x H x W)"
                        f"; images must be channels-last N x H x W x C: save "
                        f"np.transpose({name}, (0, 2, 3, 1))")
        return None
    x = _pixels(name, x, f)
    if x is None:
        return None
    if x.ndim == 4 and x.shape[3] > max(CHANNELS) and x.shape[3] >= min(x.shape[1:3]):
        f.warnings.append(f"{name} has shape {x.shape}: read as {x.shape[3]} channels of "
                          f"{x.shape[1]} x {x.shape[2]} pixels; if that is not what it is, "
                          f"save it as N x H x W x C")
    if int(x.max()) <= 1:
        f.warnings.append(f"{name}'s pixels are all 0 or 1 (uint8): clicooper scales images by "
                          f"1/255, so these are nearly black; if they are binary images, save "
                          f"({name} * 255).astype(np.uint8)")
    return x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _rank_error(name: str, x: np.ndarray) -> str:
    """The error for images of the wrong number of dimensions."""
    if x.ndim == 2 and x.shape[1] > 0 and int(np.sqrt(x.shape[1])) ** 2 == x.shape[1]:
        s = int(np.sqrt(x.shape[1]))
        return (f"{name} has shape {x.shape}: flattened images? images must be N x H x W or "
                f"N x H x W x C: save {name}.reshape(-1, {s}, {s})")
    return f"{name} has shape {x.shape}: images must be N x H x W or N x H x W x C"


def _pixels(name: str, x: np.ndarray, f: _Findings) -> np.ndarray | None:
    """`x` as uint8: uint8 as is, other integers within 0..255 with a warning; floats and
    anything else refused (the scale of a float image is a guess, the fix is one line)."""
    if x.dtype == np.uint8:
        return x
    kind = x.dtype.kind
    if kind == "f":
        f.errors.append(_float_images(name, x))
        return None
    if kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if 0 <= lo and hi <= 255:
            f.warnings.append(f"{name} is {x.dtype}, read as uint8 (its values are within "
                              f"0..255); save {name}.astype(np.uint8) to silence this")
            return x.astype(np.uint8)
        f.errors.append(f"{name} is {x.dtype} with values {lo}..{hi}: images must be uint8 "
                        f"0..255; rescale them, e.g. ((x - x.min()) * 255 // (x.max() - "
                        f"x.min())).astype(np.uint8)")
        return None
    if kind == "b":
        f.errors.append(f"{name} is bool: images must be uint8 0..255: save "
                        f"{name}.astype(np.uint8) * 255")
        return None
    f.errors.append(f"{name} is {x.dtype}: images must be uint8 0..255")
    return None


def _float_images(name: str, x: np.ndarray) -> str:
    """The error for float images, with the fix that fits their range."""
    bad = int((~np.isfinite(x)).sum())
    if bad:
        return (f"{name} is {x.dtype} with {bad} NaN or infinite value(s): images must be "
                f"uint8 0..255; fix or drop those images, then convert")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        fix = f"save np.round({name} * 255).astype(np.uint8)"
    elif lo >= 0 and hi <= 255:
        fix = f"save np.round({name}).astype(np.uint8)"
    else:
        fix = "undo the normalisation (clicooper scales uint8 by 1/255 itself)"
    return f"{name} is {x.dtype} with values {lo:g}..{hi:g}: images must be uint8 0..255; {fix}"


def _labels(name: str, y: np.ndarray, f: _Findings) -> np.ndarray | None:
    """`y` as int64 (N,), or None after recording why it cannot be."""
    if y.ndim == 2 and y.shape[1] == 1:
        f.warnings.append(f"{name} has shape {y.shape}: read as ({y.shape[0]},) labels; save "
                          f"{name}.reshape(-1) to silence this")
        y = y.reshape(-1)
    elif y.ndim == 2 and y.shape[1] > 1:
        f.errors.append(f"{name} has shape {y.shape}: one-hot or multi-label? labels must be "
                        f"one integer per image, shape (N,): for one-hot rows save "
                        f"{name}.argmax(1)")
        return None
    elif y.ndim != 1:
        f.errors.append(f"{name} has shape {y.shape}: labels must be one integer per image, "
                        f"shape (N,)")
        return None
    if len(y) == 0:
        f.errors.append(f"{name} is empty: it needs one label per image")
        return None
    return _integers(name, y, f)


def _integers(name: str, y: np.ndarray, f: _Findings) -> np.ndarray | None:
    """1-D `y` as int64: integers as they are, bool and whole floats with a warning."""
    kind = y.dtype.kind
    if kind in "iu":
        return y.astype(np.int64)
    if kind in "US":
        f.errors.append(_string_labels(name, y))
        return None
    if kind == "b":
        return y.astype(np.int64)
    if kind == "f":
        finite = np.isfinite(y)
        if not finite.all():
            f.errors.append(f"{name} has {int((~finite).sum())} NaN or infinite label(s): "
                            f"every image needs an integer label 0..K-1")
            return None
        frac = y[y != np.round(y)]
        if len(frac):
            f.errors.append(f"{name} is {y.dtype} with non-integer labels (e.g. {frac[0]:g}): "
                            f"labels must be integers 0..K-1 (they would be truncated); soft "
                            f"or regression targets are not supported")
            return None
        f.warnings.append(f"{name} is {y.dtype} holding whole numbers: read as integers; save "
                          f"{name}.astype(np.int64) to silence this")
        return y.astype(np.int64)
    f.errors.append(f"{name} is {y.dtype}: labels must be integers 0..K-1")
    return None


def _string_labels(name: str, y: np.ndarray) -> str:
    """The error for string labels, with the fix that fits them."""
    shown = ", ".join(repr(v) for v in np.unique(y)[:4].tolist())
    head = f"{name} holds strings ({shown}, ...): labels must be integers 0..K-1"
    text = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in np.unique(y).tolist()]
    if all(v.strip().isdigit() for v in text):
        return f"{head}; these are digits: save {name}.astype(np.int64)"
    return (f"{head}; map them: names, {name} = np.unique({name}, return_inverse=True) (and "
            f"the same mapping for the test labels: np.searchsorted(names, y_test))")


def _same_length(xn: str, x: np.ndarray, yn: str, y: np.ndarray, f: _Findings) -> None:
    """Images and labels must pair up (checked on the arrays as stored)."""
    if x.ndim and y.ndim and len(x) != len(y):
        f.errors.append(f"{xn} has {len(x)} images but {yn} has {len(y)} labels: they must "
                        f"match one to one")


def _hold_out(xn: str, x: np.ndarray, yn: str, y: np.ndarray, f: _Findings
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off the last HOLDOUT of x/y as the test set, refusing an ordered or tiny one."""
    cut = int(len(x) * (1 - HOLDOUT))
    if cut == 0 or cut == len(x):
        f.errors.append(f"{xn} has {len(x)} images: too few to hold out {HOLDOUT:.0%} as a "
                        f"test set; add more, or x_test and y_test")
    elif _ordered(y):
        f.errors.append(f"{yn} is ordered by class, so its last {HOLDOUT:.0%}, held out as the "
                        f"test set, would hold only label(s) {_list(np.unique(y[cut:]))}: "
                        + SHUFFLE_FIX.format(x=xn, y=yn) + "; or add x_test and y_test")
    return x[:cut], x[cut:], y[:cut], y[cut:]


def _same_image_shape(xn: str, x: np.ndarray, xtn: str, xt: np.ndarray, f: _Findings) -> None:
    if x.shape[1:] != xt.shape[1:]:
        def hwc(a: np.ndarray) -> str:
            return f"{a.shape[2]} x {a.shape[3]} x {a.shape[1]}"

        f.errors.append(f"{xtn}'s images are {hwc(xt)} (H x W x C) but {xn}'s are {hwc(x)}: "
                        f"every image must have the training images' shape; resize or crop "
                        f"{xtn} to it")


def _classes(yn: str, y: np.ndarray, ytn: str, yt: np.ndarray, f: _Findings) -> int:
    """K, after checking that the labels found are exactly 0..K-1 with MIN..MAX classes."""
    found = np.unique(np.concatenate([y, yt]))
    k = len(found)
    if found[0] != 0 or found[-1] != k - 1:
        f.errors.append(f"labels must be 0..K-1 with every class present, but {yn} and {ytn} "
                        f"hold {k} distinct label(s): {_list(found)} (read as is: "
                        f"{int(found[-1]) + 1} classes, {int(found[-1]) + 1 - k} of them "
                        f"empty): renumber them with "
                        f"_, y = np.unique(np.concatenate([y_train, y_test]), "
                        f"return_inverse=True); y_train, y_test = y[:len(y_train)], "
                        f"y[len(y_train):]")
    elif k < MIN_CLASSES:
        f.errors.append(f"{yn} and {ytn} hold a single class (label {int(found[0])}): a "
                        f"classifier needs at least {MIN_CLASSES}")
    elif k > MAX_CLASSES:
        f.errors.append(f"{yn} and {ytn} hold {k} classes, more than {MAX_CLASSES}: are these "
                        f"identifiers or regression targets? labels must be class indices")
    else:
        unseen = np.setdiff1d(found, y)
        if len(unseen):
            f.warnings.append(f"label(s) {_list(unseen)} of {ytn} never occur in {yn}: the "
                              f"model cannot learn them")
    return k


def _ordered(y: np.ndarray) -> bool:
    """Whether `y` comes in a few long runs of one class (sorted or grouped): at most two
    runs per class, with enough samples (>= 8 per class) that chance would not do it."""
    k = len(np.unique(y))
    runs = 1 + int(np.count_nonzero(np.diff(y)))
    return k >= 2 and len(y) >= 8 * k and runs <= 2 * k


def _order(ytn: str, yt: np.ndarray, classes: int, f: _Findings) -> None:
    """Warn about a test set ordered by class (kept in order: predictions stay aligned)."""
    if _ordered(yt):
        name = ytn.removesuffix(" (held out)")
        f.warnings.append(f"{ytn} is ordered by class: each evaluation batch, data.test_limit "
                          f"and the auditor's halves of the test set see only a few of the "
                          f"{classes} classes (clicooper keeps your order); "
                          + SHUFFLE_FIX.format(x=name.replace("y", "x", 1), y=name))


def _limits(yn: str, y: np.ndarray, limit: int, which: str, f: _Findings) -> None:
    """Warn when data.<which>_limit keeps only some of the classes."""
    if 0 < limit < len(y):
        missing = np.setdiff1d(np.unique(y), y[:limit])
        if len(missing):
            f.warnings.append(f"data.{which}_limit = {limit} keeps the first {limit} samples of "
                              f"{yn}, which miss label(s) {_list(missing)}: shuffle {yn} and "
                              f"its images with one permutation")


def _list(values: np.ndarray, most: int = 10) -> str:
    """`0, 100, 200`, or the first and last few of a long list."""
    v = [str(int(a)) for a in values]
    return ", ".join(v) if len(v) <= most else ", ".join(v[:6]) + ", ..., " + ", ".join(v[-3:])
