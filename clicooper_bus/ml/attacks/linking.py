"""Linking one sample's releases across epochs, as a trainer can.

A trainer that received a sample's activations (or gradients) in several epochs can average
them: fresh noise per release averages out. How it finds the releases of one sample depends on
the batch order:
- public (a function of the roster's seed): by sample id (`link`, `link_median`);
- secret (`[privacy] secret_order`): it knows only each release's position, its release tag
  (split `release`), and pairs releases of different epochs by matching them (`link_matched`).
`link_releases` does whichever the rows allow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA

RELEASE = "release"  # split of training rows named by release tag: the batch order is secret
MATCH_COMPONENTS = 50  # principal components two epochs' releases are matched on


@dataclass
class Rows:
    """One channel of one trainer: row i is sample `ids[i]` (training or test index, by
    `split`) as released in epoch `epochs[i]`; `x` holds the rows, float32 or int64 (labels)."""

    kind: str
    split: str  # "train", "test", or "release" (training rows named by release tag)
    ids: np.ndarray
    epochs: np.ndarray
    x: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def link(ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's rows averaged: (sample ids, mean rows, releases per sample)."""
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    flat = x.reshape(len(x), -1).astype(np.float64)
    sums = np.zeros((len(uniq), flat.shape[1]))
    np.add.at(sums, inverse, flat)
    return uniq, (sums / counts[:, None]).astype(np.float32), counts


def link_median(ids: np.ndarray, x: np.ndarray, least: int = 3
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample with at least `least` releases: its rows' coordinate-wise median, the
    maximum-likelihood location under Laplace noise, where the mean is not (a heavy-tailed
    draw moves a mean, not a median). (sample ids, median rows N x D float32, releases)."""
    flat = x.reshape(len(x), -1)
    order = np.argsort(ids, kind="stable")
    uniq, start, counts = np.unique(ids[order], return_index=True, return_counts=True)
    out_ids, out, out_counts = [], [], []
    for c in np.unique(counts[counts >= least]):  # samples of equal release count at once
        sel = np.flatnonzero(counts == c)
        rows = order[(start[sel][:, None] + np.arange(c)).ravel()]
        out.append(np.median(flat[rows].reshape(len(sel), c, -1), axis=1))
        out_ids.append(uniq[sel])
        out_counts.append(counts[sel])
    if not out:
        return (np.zeros(0, ids.dtype), np.zeros((0, flat.shape[1]), np.float32),
                np.zeros(0, np.int64))
    return (np.concatenate(out_ids), np.concatenate(out).astype(np.float32),
            np.concatenate(out_counts))


@dataclass
class Matched:
    """Releases linked across epochs by matching (`link_matched`): row i is the latest
    epoch's release `ids[i]` with the releases matched to it; `matches` (M x 2 tags: the
    latest release, one matched to it) lets the truth side score the linking itself."""

    ids: np.ndarray
    mean: np.ndarray  # N x D float32
    median: np.ndarray  # N x D float32 (the mean where a row has fewer than 3 releases)
    counts: np.ndarray
    matches: np.ndarray
    consistent: np.ndarray  # N bools: every earlier epoch's match agrees with the direct one

    def pairs(self, rows: np.ndarray) -> np.ndarray:
        """The matches of latest rows `rows` (positions), M x 2 tags."""
        wanted = np.isin(self.matches[:, 0], self.ids[rows])
        return self.matches[wanted]


def link_matched(rows: Rows, values: np.ndarray | None = None, seed: int = 0,
                 blocks: np.ndarray | None = None) -> Matched | None:
    """Linking without sample ids, as a trainer must when the batch order is secret: each
    earlier epoch's rows matched one to one to the latest epoch's, minimising the total squared
    distance between their top MATCH_COMPONENTS principal components (the Hungarian method,
    scipy's `linear_sum_assignment`; PCA first, since fresh noise spreads over every coordinate
    while samples differ in few), then each latest row's `values` (N x D, default the rows)
    averaged, and their median taken, with its matches'. `blocks` (one int per row, -1 where
    unknown): what the attacker knows stays the same for a sample in every epoch, such as the
    label it received, drawn once per image; rows of two different known blocks are matched
    only where the blocks' sizes differ between the two epochs and force it (every row of the
    smaller side is assigned).
    A latest row is `consistent` when, with three or more epochs, the direct matching of each
    pair of consecutive earlier epochs agrees with the two matches through it: the links an
    attacker can trust. None with fewer than 2 epochs."""
    epochs = np.unique(rows.epochs)
    if len(epochs) < 2:
        return None
    flat = rows.x.reshape(len(rows), -1).astype(np.float64)
    vals = flat if values is None else values.reshape(len(rows), -1).astype(np.float64)
    n_comp = int(min(MATCH_COMPONENTS, flat.shape[1], len(flat) - 1))
    z = PCA(n_comp, random_state=seed).fit_transform(flat) if n_comp < flat.shape[1] else flat
    at = {e: np.flatnonzero(rows.epochs == e) for e in epochs}
    latest = at[epochs[-1]]
    links = {e: _assign(z, latest, at[e], blocks) for e in epochs[:-1]}
    consistent = np.full(len(latest), len(epochs) >= 3)
    for a, b in zip(epochs[:-2], epochs[1:-1], strict=True):
        direct = dict(zip(at[a].tolist(), _assign(z, at[a], at[b], blocks).tolist(), strict=True))
        consistent &= np.array([links[a][i] >= 0 and direct[links[a][i]] == links[b][i]
                                for i in range(len(latest))], bool)
    groups = [[int(i)] + [int(links[e][j]) for e in epochs[:-1] if links[e][j] >= 0]
              for j, i in enumerate(latest)]
    counts = np.array([len(g) for g in groups])
    mean = np.stack([vals[g].mean(0) for g in groups]).astype(np.float32)
    median = np.stack([np.median(vals[g], 0) for g in groups]).astype(np.float32)
    matches = np.array([(rows.ids[g[0]], rows.ids[j]) for g in groups for j in g[1:]],
                       np.int64).reshape(-1, 2)
    return Matched(rows.ids[latest], mean, median, counts, matches, consistent)


def _assign(z: np.ndarray, a: np.ndarray, b: np.ndarray, blocks: np.ndarray | None
            ) -> np.ndarray:
    """For each row in `a` (positions), the row of `b` matched to it (-1: none) by least total
    squared distance; rows of two different known blocks cost more than any other pair."""
    cost = cdist(z[a], z[b], "sqeuclidean")
    if blocks is not None:
        ba, bb = blocks[a][:, None], blocks[b][None, :]
        clash = (ba != bb) & (ba >= 0) & (bb >= 0)
        cost[clash] += cost.max() * len(a) + 1.0
    r, c = linear_sum_assignment(cost)
    out = np.full(len(a), -1, np.int64)
    out[r] = b[c]
    return out


def blocks_from(labels: Rows | None, rows: Rows) -> np.ndarray | None:
    """Each of `rows`' received label, from a labels channel of the same release tags (the
    label of an image is the same every epoch, so it constrains linking), -1 where none was
    received; None without such a channel."""
    if labels is None or labels.split != RELEASE or rows.split != RELEASE or not len(labels):
        return None
    order = np.argsort(labels.ids, kind="stable")
    tags, y = labels.ids[order], labels.x.reshape(len(labels), -1)[order, 0]
    pos = np.clip(np.searchsorted(tags, rows.ids), 0, len(tags) - 1)
    return np.where(tags[pos] == rows.ids, y[pos], -1).astype(np.int64)


def link_releases(rows: Rows, values: np.ndarray, seed: int = 0
                  ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """`values` (one row per row of `rows`) averaged over each sample's releases, as the
    attacker can link them: (`linked` by sample id under the public order, `matched` by
    `link_matched` under a secret one; the ids, N x D means, releases per row)."""
    if rows.split != RELEASE:
        return ("linked", *link(rows.ids, values))
    m = link_matched(rows, values, seed)
    if m is None:
        return "matched", rows.ids[:0], values[:0].astype(np.float32), np.zeros(0, np.int64)
    return "matched", m.ids, m.mean, m.counts
