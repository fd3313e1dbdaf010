"""Label inference on every channel one trainer receives, and across epochs.

A trainer sees more than the first stage's activations: its `fwd` from its predecessor, the
`bwd` gradients from its successor or the owner's tail, `labels` if it is last, and evaluation
`eval_fwd`. For each channel this attack predicts a label per sample:
- activations: the clustering variants of `clustering` (plain, standardised, PCA);
- gradients: cosine k-means on the rows (each row of the gradient the owner's tail sends back
  is V^T (p - e_y) / B: its direction names the label; Li et al. 2022, "Label leakage and
  protection in two-party split learning", arXiv 2102.08504), beside the activation variants;
- labels: what it received, as is; under label obfuscation (the plan's outputs are gamma x
  classes secret pseudo-classes) also merged into classes, as the attacker can merge them: the
  pseudo-classes of one class share their rows' mean activation and softmax profile (the model
  cannot tell them apart), so k-means on the pseudo-classes' mean profiles groups them
  (`merge_pseudo`; as `extraction.group_pseudo_classes` does for softmax profiles);
- its own outputs (the last stage): its stage applied to the rows it received, `fwd` and
  `eval_fwd` (what it computes and sends on, recomputed from its delivered segment), clustered
  with the activation and cosine variants and, when they are the model's logits, argmax'ed
  (merged under obfuscation);
- linking (`+linked`): every release of one sample averaged over the epochs it was released
  in (the batch order is a public function of the roster's seed), then clustered: fresh noise
  per release averages out; on activation channels also the coordinate-wise median of three
  or more releases (`+linked-median`: the location estimate that Laplace noise does not move);
- under a secret batch order (rows named by release tag, split `release`, in tag order: the
  attacker does not know which sample a row is) linking by matching instead (`+matched`,
  `+matched-median`, `+matched-consistent`): each earlier epoch's releases paired one to one
  with the latest epoch's by least total squared distance on the top 50 principal components
  (`link_matched`), within the label the trainer received for each release where it received
  labels, then averaged as above; the auditor scores how many pairs were right beside the
  labels.
The auditor scores each channel and reports the strongest, naming the channel. One instance
per trainer, non-colluding: its view holds only that trainer's channels; and, with two or more
trainers, one for all of them colluding, which joins what they received of the same sample in
the same epoch (activations and gradients side by side, each block standardised) and clusters
that, single and linked.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.preprocessing import StandardScaler, normalize
from torch import nn

from clicooper_bus.ml.attacks.base import STAGE, Attack, ThreatModel, Track, View, no_progress
from clicooper_bus.ml.attacks.clustering import cluster_variants
from clicooper_bus.ml.attacks.linking import (
    RELEASE,
    Rows,
    blocks_from,
    link,
    link_matched,
    link_median,
)
from clicooper_bus.ml.attacks.nets import apply

SINGLE = 2000  # single releases clustered per channel (the latest first, one per sample)
# the confirmed links are scored only from this many rows: on a few dozen, the best of the
# clustering variants reads an ARI of 0.1 out of noise (measured: 27 rows, none linked right)
CONSISTENT_ROWS = 200
# channels whose rows carry the privacy noise (or are computed from noisy rows): linked by
# median as well as by mean
MEDIAN_LINKED = ("fwd", "eval_fwd", "own_out", "own_eval_out", "joined")
SIMULATED = " (simulated)"  # suffix of a channel the auditor simulated (audit.simulated)


def simulated(kind: str) -> str:
    """The name of the white-box simulation of channel `kind`."""
    return kind + SIMULATED


def base_kind(kind: str) -> str:
    """The channel a simulated one stands in for (`fwd (simulated)` -> `fwd`)."""
    return kind.removesuffix(SIMULATED)


def source_of(kind: str) -> str:
    """The received channel a channel's rows count against: own outputs against the rows they
    were computed from, a simulation against the channel it simulates."""
    kind = base_kind(kind)
    return {"own_out": "fwd", "own_eval_out": "eval_fwd"}.get(kind, kind)


def received_field(trainer: str) -> str:
    """The Knowledge field holding one trainer's channels (`clicooper_bus.audit.channels`)."""
    return f"received/{trainer}"


def stage_field(trainer: str) -> str:
    """The Knowledge field holding one trainer's own final stage."""
    return f"{STAGE}{trainer}"


def stage_input_shape(plan, index: int) -> tuple[int, ...]:
    """The per-sample shape stage `index` (1: the first trainer's) takes, from the public plan."""
    from clicooper_bus.ml.models import plan_spec

    return tuple(plan_spec(plan).shapes[plan.cuts[index - 1]])


def run_stages(stages: list[nn.Module], shape: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    """Rows (N x D, flattened as logged) through the stages in order: N x D' float32."""
    model = nn.Sequential(*stages).eval()
    out = apply(model, torch.from_numpy(np.array(x, np.float32).reshape(len(x), *shape)))
    return out.reshape(len(x), -1).numpy()


def merge_pseudo(pseudo: np.ndarray, profile: np.ndarray, classes: int, seed: int = 0
                 ) -> np.ndarray | None:
    """Pseudo-class ids (N) merged into `classes` groups: k-means on each pseudo-class's mean
    profile row (`profile`, N x D, standardised), since the pseudo-classes of one class share
    their rows' distribution; None when fewer than `classes` pseudo-classes occur."""
    present = np.unique(pseudo)
    if len(present) <= classes:
        return None if len(present) < classes else pseudo
    z = StandardScaler().fit_transform(profile.reshape(len(profile), -1).astype(np.float64))
    means = np.stack([z[pseudo == j].mean(0) for j in present])
    groups = KMeans(n_clusters=classes, n_init=10, random_state=seed).fit_predict(means)
    return groups[np.searchsorted(present, pseudo)].astype(np.int64)


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


COSINE_RESTARTS = 10  # k-means starts for cosine clustering (see `cosine_variants`)


def cosine_variants(x: np.ndarray, k: int, *, seed: int = 0, restarts: int = COSINE_RESTARTS
                    ) -> dict[str, np.ndarray]:
    """k-means on the rows' directions (unit L2 norm): cosine clustering. Ten starts: on the
    offloading demo's trainer-1 gradients three starts ended in a local optimum with two
    classes merged (ARI 0.860) where ten found every label (0.999), for about 8 s more."""
    unit = normalize(x.reshape(len(x), -1).astype(np.float64))
    km = KMeans(n_clusters=k, n_init=restarts, random_state=seed)
    return {"cosine": km.fit_predict(unit).astype(np.int64)}


def _most_linked(counts: np.ndarray, least: int) -> np.ndarray:
    """Positions of the samples with at least `least` releases, the most released first, at
    most SINGLE of them (the attack keeps the samples averaging gives most to)."""
    order = np.argsort(-counts, kind="stable")
    return order[counts[order] >= least][:SINGLE]


def _latest_once(ids: np.ndarray, epochs: np.ndarray, limit: int) -> np.ndarray:
    """Row positions: each sample's latest release, latest epochs first, at most `limit`."""
    order = np.argsort(-epochs, kind="stable")
    _, first = np.unique(ids[order], return_index=True)
    return order[np.sort(first)][:limit]


def _key(rows) -> np.ndarray:
    return rows.ids.astype(np.int64) * 1_000_003 + rows.epochs.astype(np.int64)


def matched(a: Rows, b: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in a, in b) of the rows a and b hold of the same (sample, epoch)."""
    common = np.intersect1d(_key(a), _key(b))
    return _positions(_key(a), common), _positions(_key(b), common)


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
    return Rows("joined", blocks[0].split, ids, epochs, np.hstack(parts).astype(np.float32))


def _positions(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each wanted key, the position of its first row in `keys`."""
    order = np.argsort(keys, kind="stable")
    return order[np.searchsorted(keys[order], wanted)]


class ChannelInference(Attack):
    """Label inference on each channel one trainer received (and linked across epochs), and,
    for the last stage, on its own outputs."""

    name = "channels"
    family = "channels"
    title = "Label inference on every channel a trainer receives, single and linked"
    per_trainer = True

    def __init__(self, trainer: str = "", seed: int = 0, restarts: int = 3, index: int = 0,
                 last: bool = False):
        """`index`: the trainer's stage (1 the first), `last`: whether it is the last stage,
        both from the roster's public stage order (0: unknown, own outputs not attacked)."""
        self.trainer, self.seed, self.restarts = trainer, seed, restarts
        self.index, self.last = index, last
        if trainer:
            self.name = f"channels-{trainer}"
            self.threat = ThreatModel(
                f"{trainer}, alone (non-colluding)",
                frozenset({"plan", received_field(trainer), stage_field(trainer)}),
                "none: k is the number of classes, public in the roster's plan; sample ids from "
                "the public batch order (under a secret order only each release's position, "
                "linked by matching); its own stage's weights")

    def for_trainer(self, trainer: str, index: int = 0, last: bool = False) -> ChannelInference:
        return ChannelInference(trainer, self.seed, self.restarts, index, last)

    def expand(self, stages: list[str]) -> list[Attack]:
        """One attack per trainer, and one for all of them colluding (two or more)."""
        alone: list[Attack] = [self.for_trainer(s, i, i == len(stages))
                               for i, s in enumerate(stages, 1)]
        return alone + ([CollusionInference(stages, self.seed, self.restarts)]
                        if len(stages) > 1 else [])

    def run(self, view: View, track: Track = no_progress) -> dict[str, dict]:
        channels = dict(getattr(view, received_field(self.trainer)) or {})
        k = view.plan.classes
        own = self._own_outputs(view, channels)
        out: dict[str, dict] = {}
        every = {**channels, **own}
        for kind, rows in track(sorted(every.items()), f"channels of {self.trainer}",
                                len(every)):
            if kind == "labels":
                out.update(self._labels(rows, own.get("own_out") or channels.get("fwd"),
                                        view.plan))
            else:
                # the model's logits: the last stage's own outputs when the owner keeps no tail
                logits = kind.startswith("own_") and not view.plan.tail and \
                    rows.x.shape[1] == view.plan.n_outputs
                out.update(self._channel(kind, rows, k, logits, channels.get("labels")))
        return out

    def _own_outputs(self, view: View, channels: dict[str, Rows]) -> dict[str, Rows]:
        """The last stage's outputs on the rows it received (`own_out` from fwd, `own_eval_out`
        from eval_fwd): its delivered segment applied to them, as it computed them."""
        if not (self.last and self.index):
            return {}
        stage = getattr(view, stage_field(self.trainer))
        if stage is None:
            return {}
        shape = stage_input_shape(view.plan, self.index)
        out = {}
        for kind, name in (("fwd", "own_out"), ("eval_fwd", "own_eval_out")):
            for suffix in ("", SIMULATED):
                rows = channels.get(kind + suffix)
                if rows is not None and len(rows):
                    out[name + suffix] = Rows(name + suffix, rows.split, rows.ids, rows.epochs,
                                              run_stages([stage], shape, rows.x))
        return out

    def _labels(self, rows: Rows, profile: Rows | None, plan) -> dict[str, dict]:
        """Received labels as they are, and under obfuscation merged by the pseudo-classes'
        mean profiles over the (sample, epoch) rows this trainer also received activations of
        (softmax of its own outputs when they are the pseudo-class logits)."""
        variants = {"as received": rows.x[:, 0]}
        if plan.n_outputs > plan.classes and profile is not None:
            ia, ib = matched(rows, profile)
            x = profile.x[ib]
            if profile.kind == "own_out" and x.shape[1] == plan.n_outputs and not plan.tail:
                x = softmax(x)
            groups = merge_pseudo(rows.x[ia, 0], x, plan.classes, self.seed) \
                if len(ia) >= 2 * plan.n_outputs else None
            if groups is not None:  # each pseudo-class's group, applied to every received row
                lookup = dict(zip(rows.x[ia, 0].tolist(), groups.tolist(), strict=True))
                if all(int(v) in lookup for v in np.unique(rows.x[:, 0])):
                    variants[f"merged by {profile.kind} profiles"] = np.array(
                        [lookup[int(v)] for v in rows.x[:, 0]], np.int64)
        return {"labels": {"ids": rows.ids, "split": rows.split, "variants": variants}}

    def _channel(self, kind: str, rows, k: int, logits: bool = False,
                 labels: Rows | None = None) -> dict[str, dict]:
        """Channel `kind`'s single releases, and linked across epochs (by id, or by matching
        under a secret order, constrained by the `labels` received for the same releases)."""
        pick = _latest_once(rows.ids, rows.epochs, SINGLE)
        if len(pick) < 2 * k:  # too few retained samples to cluster into k groups
            return {}
        source = source_of(kind)
        out = {kind: {"ids": rows.ids[pick], "split": rows.split, "source": source,
                      "variants": self._variants(kind, rows.x[pick], k, logits)}}
        if rows.split == RELEASE:  # a secret order: releases linked by matching, not by id
            out.update(self._matched(kind, rows, k, logits, blocks_from(labels, rows)))
            return out
        ids, mean, counts = link(rows.ids, rows.x)
        sel = _most_linked(counts, 2)
        if len(sel) >= 2 * k:  # one sample's releases in several epochs
            out[f"{kind}+linked"] = {"ids": ids[sel], "split": rows.split, "source": source,
                                     "releases": float(counts[sel].mean()),
                                     "variants": self._variants(kind, mean[sel], k, logits)}
        if base_kind(kind) in MEDIAN_LINKED:  # noisy rows: a median resists Laplace's tails
            ids, median, counts = link_median(rows.ids, rows.x)
            sel = _most_linked(counts, 3)
            if len(sel) >= 2 * k:
                out[f"{kind}+linked-median"] = {
                    "ids": ids[sel], "split": rows.split, "source": source,
                    "releases": float(counts[sel].mean()),
                    "variants": self._variants(kind, median[sel], k, logits)}
        return out

    def _matched(self, kind: str, rows: Rows, k: int, logits: bool,
                 blocks: np.ndarray | None) -> dict[str, dict]:
        """Releases linked across epochs by `link_matched`, the most linked first:
        `kind+matched` (mean), for noisy rows `kind+matched-median` (three or more releases),
        and `kind+matched-consistent` (the links the matching of the earlier epochs confirms:
        fewer rows, more of them right)."""
        m = link_matched(rows, seed=self.seed, blocks=blocks)
        if m is None:
            return {}
        how = {"split": rows.split, "source": source_of(kind),
               **({"blocks": "received labels"} if blocks is not None else {})}
        picks = {"+matched": (_most_linked(m.counts, 2), m.mean),
                 "+matched-consistent": (_most_linked(np.where(m.consistent, m.counts, 0), 2),
                                         m.mean)}
        if base_kind(kind) in MEDIAN_LINKED:
            picks["+matched-median"] = (_most_linked(m.counts, 3), m.median)
        out = {}
        for suffix, (sel, x) in picks.items():
            if len(sel) >= (max(2 * k, CONSISTENT_ROWS) if suffix.endswith("consistent")
                            else 2 * k):
                out[kind + suffix] = {**how, "ids": m.ids[sel], "matches": m.pairs(sel),
                                      "releases": float(m.counts[sel].mean()),
                                      "variants": self._variants(kind, x[sel], k, logits)}
        return out

    def _variants(self, kind: str, x: np.ndarray, k: int, logits: bool = False
                  ) -> dict[str, np.ndarray]:
        v = cluster_variants(x, k, seed=self.seed, restarts=self.restarts)
        if base_kind(kind) in ("bwd", "joined", "own_out", "own_eval_out"):
            v.update(cosine_variants(x, k, seed=self.seed,
                                     restarts=max(self.restarts, COSINE_RESTARTS)))
        if logits:  # the model's own prediction; pseudo-classes merged by softmax profile
            top = x.argmax(1).astype(np.int64)
            merged = top if x.shape[1] == k else merge_pseudo(top, softmax(x), k, self.seed)
            if merged is not None:
                v["argmax" if x.shape[1] == k else "argmax, merged"] = merged
        return v


class CollusionInference(ChannelInference):
    """Every trainer colluding: what they received of the same sample in the same epoch
    (activations and gradients of every stage), joined and clustered, single and linked. The
    channels each holds alone are the non-colluding attacks' rows; the auditor's colluding row
    takes the strongest of them beside the joined channel (colluders hold at least what each
    member holds)."""

    def __init__(self, stages: list[str], seed: int = 0, restarts: int = 3):
        super().__init__("", seed, restarts)
        self.trainer, self.stages = "all trainers", list(stages)
        self.name = "channels-colluding"
        self.threat = ThreatModel(
            f"all trainers colluding ({', '.join(stages)})",
            frozenset({"plan", *(received_field(s) for s in stages)}),
            "none beyond what they received; sample ids from the public batch order (under a "
            "secret order, rows of one step joined by position)")

    def run(self, view: View, track: Track = no_progress) -> dict[str, dict]:
        k = view.plan.classes
        blocks = [rows for s in self.stages
                  for kind, rows in sorted(getattr(view, received_field(s)).items())
                  if kind in ("fwd", "bwd")]
        joined = join(blocks, k)
        labels = next((getattr(view, received_field(s)).get("labels") for s in self.stages
                       if "labels" in getattr(view, received_field(s))), None)
        return {} if joined is None else self._channel("joined", joined, k, labels=labels)
