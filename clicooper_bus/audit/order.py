"""The training batch order on the auditor's truth side, and what an attacker names a row by.

With the public order (`ml.data.batch_order` from the roster's seed) a trainer knows which
sample each training row it received is: rows are named by sample id (split `train`), and one
sample's releases link across epochs by id. With `[privacy] secret_order` it knows only where a
row came in its epoch: rows are named by a release tag, `epoch * n + position in the epoch`
(split `release`; the position is `batch * batch_size + row`), which names no sample and
differs every epoch. Only the auditor, reading the owner's order key (`order.secret` in the run
directory, mode 0600), turns a tag back into the sample it was, to score an attack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clicooper_bus.errors import ClicooperError, KeyFileError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.attacks.linking import RELEASE, Rows
from clicooper_bus.ml.data import batch_order, keyed_permutation, order_commitment
from clicooper_bus.ml.privacy.secret import load


@dataclass
class Order:
    """The training order of a run of `n` samples in batches of `batch_size`: public (from
    `seed`) or secret (`key`)."""

    n: int
    batch_size: int
    seed: int
    key: bytes | None = None
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _positions: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def secret(self) -> bool:
        return self.key is not None

    def batches(self, epoch: int) -> list[np.ndarray]:
        """The sample ids of each batch of `epoch`, as the owner sent them."""
        perm = self._perm(epoch)
        return [perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def tags(self, epoch: int, ids: np.ndarray) -> np.ndarray:
        """The release tags of samples `ids` in `epoch` (int64, one per id)."""
        if epoch not in self._positions:
            pos = np.empty(self.n, np.int64)
            pos[self._perm(epoch)] = np.arange(self.n)
            self._positions[epoch] = pos
        return epoch * self.n + self._positions[epoch][np.asarray(ids, np.int64)]

    def samples(self, tags: np.ndarray) -> np.ndarray:
        """The sample ids behind release tags (int64): the truth side only."""
        tags = np.asarray(tags, np.int64)
        out = np.empty(len(tags), np.int64)
        for epoch in np.unique(tags // self.n):
            sel = tags // self.n == epoch
            out[sel] = self._perm(int(epoch))[tags[sel] % self.n]
        return out

    def as_attacker_names(self, rows: Rows) -> Rows:
        """Training rows named as an attacker can name them: unchanged under the public
        order; under the secret one by release tag, and put in tag order (epoch, then
        position), the only order a trainer has: rows kept in the auditor's order of sample
        ids would line up one sample's releases, row i of every epoch, and hand a matching
        attack the link (evaluation rows are never renamed)."""
        if not self.secret or rows.split != "train":
            return rows
        named = np.empty(len(rows), np.int64)
        for e in np.unique(rows.epochs):
            sel = rows.epochs == e
            named[sel] = self.tags(int(e), rows.ids[sel])
        by_tag = np.argsort(named, kind="stable")
        return Rows(rows.kind, RELEASE, named[by_tag], rows.epochs[by_tag], rows.x[by_tag])

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = keyed_permutation(self.n, self.key, epoch) if self.key \
                else np.concatenate(batch_order(self.n, self.batch_size, self.seed, epoch))
        return self._perms[epoch]


def run_order(run: RunLayout, secret: bool, n: int, batch_size: int, seed: int,
              commitment: str = "") -> Order:
    """The run's order: with `secret` (its verified `[privacy] secret_order`), keyed by the
    owner's `order.secret`, which must be the key the signed roster's `order_commitment`
    names. Raises ClicooperError when that key is missing, unreadable or another run's: the
    auditor cannot say which sample a row was without it, and another key would score every
    attack against the wrong samples."""
    if not secret:
        return Order(n, batch_size, seed)
    path = run.order_key
    try:
        key = load(path, remedy="it cannot be made again: copy it, mode 0600, from this run's "
                                "owner directory")
    except FileNotFoundError:
        raise ClicooperError(f"the run used a secret batch order and its key {path} is missing: "
                             f"the auditor needs the owner's order key (mode 0600) to know "
                             f"which sample each release was; copy it from the owner's run "
                             f"directory") from None
    except KeyFileError as exc:
        raise ClicooperError(f"the secret batch order's key cannot be used: {exc}") from None
    except OSError as exc:
        raise ClicooperError(f"the secret batch order's key {path} cannot be read ({exc}): the "
                             f"auditor must run as a user that may read it") from None
    if order_commitment(key) != commitment:
        raise ClicooperError(f"{path} is not this run's order key: the signed roster commits to "
                             f"another (sha256 {commitment[:16] or 'none'}...); copy the key "
                             f"from this run's owner directory")
    return Order(n, batch_size, seed, key)
