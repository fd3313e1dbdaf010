"""Label inference on every channel one trainer receives, and across epochs.

A trainer sees more than the first stage's activations: its `fwd` from its predecessor, the
`bwd` gradients from its successor or the owner's tail, `labels` if it is last, and evaluation
`eval_fwd`. For each channel this attack predicts a label per sample:
- activations: the clustering variants of `clustering` (plain, standardised, PCA);
- gradients: cosine k-means on the rows (each row of the gradient the owner's tail sends back
  is V^T (p - e_y) / B: its direction names the label; Li et al. 2022, "Label leakage and
  protection in two-party split learning", arXiv 2102.08504), beside the activation variants;
- labels: what it received, as is;
- linking (`+linked`): every release of one sample averaged over the epochs it was released
  in (the batch order is a public function of the roster's seed), then clustered: fresh noise
  per release averages out.
The auditor scores each channel and reports the strongest, naming the channel. One instance
per trainer, non-colluding: its view holds only that trainer's channels; and, with two or more
trainers, one for all of them colluding, which joins what they received of the same sample in
the same epoch (activations and gradients side by side, each block standardised) and clusters
that, single and linked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans
from sklearn.preprocessing import normalize

from clicooper_bus.ml.attacks.base import Attack, ThreatModel, Track, View, no_progress
from clicooper_bus.ml.attacks.clustering import cluster_variants

SINGLE = 2000  # single releases clustered per channel (the latest first, one per sample)


@dataclass
class Rows:
    """One channel of one trainer: row i is sample `ids[i]` (training or test index, by
    `split`) as released in epoch `epochs[i]`; `x` holds the rows, float32 or int64 (labels)."""

    kind: str
    split: str  # "train" or "test"
    ids: np.ndarray
    epochs: np.ndarray
    x: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def received_field(trainer: str) -> str:
    """The Knowledge field holding one trainer's channels (`clicooper_bus.audit.channels`)."""
    return f"received/{trainer}"


def cosine_variants(x: np.ndarray, k: int, *, seed: int = 0, restarts: int = 5
                    ) -> dict[str, np.ndarray]:
    """k-means on the rows' directions (unit L2 norm): cosine clustering."""
    unit = normalize(x.reshape(len(x), -1).astype(np.float64))
    km = KMeans(n_clusters=k, n_init=restarts, random_state=seed)
    return {"cosine": km.fit_predict(unit).astype(np.int64)}


def link(ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each sample's rows averaged: (sample ids, mean rows, releases per sample)."""
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    flat = x.reshape(len(x), -1).astype(np.float64)
    sums = np.zeros((len(uniq), flat.shape[1]))
    np.add.at(sums, inverse, flat)
    return uniq, (sums / counts[:, None]).astype(np.float32), counts


def _latest_once(ids: np.ndarray, epochs: np.ndarray, limit: int) -> np.ndarray:
    """Row positions: each sample's latest release, latest epochs first, at most `limit`."""
    order = np.argsort(-epochs, kind="stable")
    _, first = np.unique(ids[order], return_index=True)
    return order[np.sort(first)][:limit]


def _key(rows) -> np.ndarray:
    return rows.ids.astype(np.int64) * 1_000_003 + rows.epochs.astype(np.int64)


def join(blocks: list, k: int):
    """The training rows several parties hold of the same (sample, epoch), side by side: each
    block standardised and weighted 1/sqrt(width), so every block counts alike. None when fewer
    than two blocks or 2k common rows."""
    if len(blocks) < 2:
        return None
    common = _key(blocks[0])
    for b in blocks[1:]:
        common = np.intersect1d(common, _key(b))
    if len(common) < 2 * k:
        return None
    parts, ids, epochs = [], None, None
    for b in blocks:
        pos = _positions(_key(b), common)
        x = b.x[pos].reshape(len(pos), -1).astype(np.float64)
        x = (x - x.mean(0)) / (x.std(0) + 1e-8) / np.sqrt(x.shape[1])
        parts.append(x)
        ids, epochs = b.ids[pos], b.epochs[pos]
    return Rows("joined", "train", ids, epochs, np.hstack(parts).astype(np.float32))


def _positions(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each wanted key, the position of its first row in `keys`."""
    order = np.argsort(keys, kind="stable")
    return order[np.searchsorted(keys[order], wanted)]


class ChannelInference(Attack):
    """Label inference on each channel one trainer received (and linked across epochs)."""

    name = "channels"
    family = "channels"
    title = "Label inference on every channel a trainer receives, single and linked"
    per_trainer = True

    def __init__(self, trainer: str = "", seed: int = 0, restarts: int = 3):
        self.trainer, self.seed, self.restarts = trainer, seed, restarts
        if trainer:
            self.name = f"channels-{trainer}"
            self.threat = ThreatModel(
                f"{trainer}, alone (non-colluding)",
                frozenset({"plan", received_field(trainer)}),
                "none: k is the number of classes, public in the roster's plan; sample ids from "
                "the public batch order")

    def for_trainer(self, trainer: str) -> ChannelInference:
        return ChannelInference(trainer, self.seed, self.restarts)

    def expand(self, stages: list[str]) -> list[Attack]:
        """One attack per trainer, and one for all of them colluding (two or more)."""
        alone: list[Attack] = [self.for_trainer(s) for s in stages]
        return alone + ([CollusionInference(stages, self.seed, self.restarts)]
                        if len(stages) > 1 else [])

    def run(self, view: View, track: Track = no_progress) -> dict[str, dict]:
        channels = getattr(view, received_field(self.trainer))
        k = view.plan.classes
        out: dict[str, dict] = {}
        for kind, rows in track(sorted(channels.items()), f"channels of {self.trainer}",
                                len(channels)):
            out.update(self._channel(kind, rows, k))
        return out

    def _channel(self, kind: str, rows, k: int) -> dict[str, dict]:
        if kind == "labels":
            return {"labels": {"ids": rows.ids, "split": rows.split,
                               "variants": {"as received": rows.x[:, 0]}}}
        pick = _latest_once(rows.ids, rows.epochs, SINGLE)
        if len(pick) < 2 * k:  # too few retained samples to cluster into k groups
            return {}
        out = {kind: {"ids": rows.ids[pick], "split": rows.split,
                      "variants": self._variants(kind, rows.x[pick], k)}}
        ids, mean, counts = link(rows.ids, rows.x)
        linked = counts >= 2
        if linked.sum() >= 2 * k:  # one sample's releases in several epochs
            sel = np.flatnonzero(linked)[:SINGLE]
            out[f"{kind}+linked"] = {"ids": ids[sel], "split": rows.split,
                                     "releases": float(counts[sel].mean()),
                                     "variants": self._variants(kind, mean[sel], k)}
        return out

    def _variants(self, kind: str, x: np.ndarray, k: int) -> dict[str, np.ndarray]:
        v = cluster_variants(x, k, seed=self.seed, restarts=self.restarts)
        if kind in ("bwd", "joined"):
            v.update(cosine_variants(x, k, seed=self.seed, restarts=self.restarts))
        return v


class CollusionInference(ChannelInference):
    """Every trainer colluding: what they received of the same sample in the same epoch
    (activations and gradients of every stage), joined and clustered, single and linked. The
    channels each holds alone are the non-colluding attacks' rows."""

    def __init__(self, stages: list[str], seed: int = 0, restarts: int = 3):
        super().__init__("", seed, restarts)
        self.trainer, self.stages = "all trainers", list(stages)
        self.name = "channels-colluding"
        self.threat = ThreatModel(
            f"all trainers colluding ({', '.join(stages)})",
            frozenset({"plan", *(received_field(s) for s in stages)}),
            "none beyond what they received; sample ids from the public batch order")

    def run(self, view: View, track: Track = no_progress) -> dict[str, dict]:
        k = view.plan.classes
        blocks = [rows for s in self.stages
                  for kind, rows in sorted(getattr(view, received_field(s)).items())
                  if kind in ("fwd", "bwd")]
        joined = join(blocks, k)
        return {} if joined is None else self._channel("joined", joined, k)
