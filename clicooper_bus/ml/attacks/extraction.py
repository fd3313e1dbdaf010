"""Model extraction: all trainers collude to rebuild the owner's model and its label names.

They hold every stage, the activations they received and the (possibly obfuscated) labels the
last stage was given. A head simulator stands in for the owner's head: fitted to evaluation
activations of public images when the run released any (a known-plaintext leak of evaluating
through the chain), otherwise matched to the released activations' distribution. Obfuscated
pseudo-classes are grouped by clustering each pseudo-class's mean softmax profile; the groups
are then named by the best consistent mapping (no labels; scored with the auditor's Hungarian
match) or by a soft vote of a few labelled aux samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from torch import nn

from clicooper_bus.ml.attacks import memo
from clicooper_bus.ml.attacks.base import Attack, ThreatModel, Track, View, no_progress
from clicooper_bus.ml.attacks.inversion import train_simulator
from clicooper_bus.ml.attacks.nets import apply, batches, head_clone, seeded
from clicooper_bus.ml.privacy.labels import group_sum


@dataclass
class Surrogate:
    """The extracted model. `predict` gives class ids when `named`, else unnamed group ids."""

    model: nn.Module
    groups: np.ndarray  # group of each output (pseudo-)class
    names: np.ndarray | None  # class of each group, when labelled samples named them
    how: str

    @property
    def named(self) -> bool:
        return self.names is not None

    @torch.no_grad()
    def group_probs(self, x: torch.Tensor) -> torch.Tensor:
        return group_sum(apply(self.model, x).softmax(1), self.groups)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        g = self.group_probs(x).argmax(1).numpy()
        return self.names[g] if self.names is not None else g


def group_pseudo_classes(tail: nn.Module, released: np.ndarray, received: np.ndarray,
                         classes: int, seed: int = 0) -> np.ndarray:
    """Group the tail's outputs into `classes` groups: pseudo-classes of one true class share a
    softmax profile (the model cannot tell them apart), so cluster the profiles."""
    with torch.no_grad():
        p = apply(tail, torch.tensor(np.asarray(released, np.float32))).softmax(1).numpy()
    outputs = p.shape[1]
    if outputs <= classes:
        return np.arange(outputs)
    profiles = np.stack([p[received == j].mean(0) if (received == j).any() else np.zeros(outputs)
                         for j in range(outputs)])
    return KMeans(n_clusters=classes, n_init=10, random_state=seed).fit_predict(profiles)


def fit_head(view: View, seed: int, track: Track) -> tuple[nn.Module, str]:
    """The colluders' stand-in for the owner's head, and how it was made; the same for every
    extraction attack of an audit (they differ only in the labels that name its outputs), so
    fitted once (`memo`)."""
    pairs = view.eval_pairs
    key = memo.digest("fit_head", seed, repr(view.plan), *(pairs if pairs is not None else ()),
                      np.asarray(view.released), view.aux_images,
                      *[p for s in view.stages for p in s.state_dict().values()])
    return memo.once(key, lambda: _fit_head(view, seed, track))


def _fit_head(view: View, seed: int, track: Track) -> tuple[nn.Module, str]:
    pairs = view.eval_pairs
    if pairs is not None and len(pairs[0]) >= 64:
        x, a = pairs
        a = torch.tensor(np.asarray(a, np.float32))
        torch.manual_seed(seed)
        sim = head_clone(view.plan, seed=seed + 3).train()
        opt = torch.optim.Adam(sim.parameters(), lr=2e-3)
        gen, epochs = seeded(seed), 100
        for _ in track(range(epochs), "extraction: head simulator regression epochs", epochs):
            for idx in batches(len(x), 64, gen):
                loss = nn.functional.mse_loss(sim(x[idx]), a[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return sim.eval(), f"head simulator regressed on {len(x)} evaluation releases of public images"
    sim, _ = train_simulator(view, epochs=8, adv=0.1, seed=seed, track=track, labels=None,
                             decoder=False, desc="extraction: distribution-matched head epochs")
    return sim, "head simulator matched to the released activations' distribution (no pairs)"


def name_groups(votes: np.ndarray) -> np.ndarray:
    """The class of each group: the one-to-one naming that the votes support most (so a class
    no labelled sample showed still gets the group left over), or plain majority when there
    are more groups than classes."""
    if votes.shape[0] != votes.shape[1]:
        return votes.argmax(1)
    rows, cols = linear_sum_assignment(-votes)
    names = np.empty(votes.shape[0], np.int64)
    names[rows] = cols
    return names


class ExtractionAttack(Attack):
    name = "extraction"
    family = "extraction"

    def __init__(self, labelled: int = 0, seed: int = 0):
        self.labelled, self.seed = labelled, seed
        self.name = f"extraction-{labelled}" if labelled else "extraction-unlabelled"
        self.title = (f"Model extraction, {labelled} labelled aux samples" if labelled
                      else "Model extraction, no labelled data")
        sees = {"plan", "stages", "released", "released_labels", "eval_pairs", "aux_images"}
        self.threat = ThreatModel(
            "all trainers, colluding", frozenset(sees | ({"aux_labels"} if labelled else set())),
            f"public aux images{f', the first {labelled} with labels' if labelled else ''}",
            aux_labels=labelled)

    def run(self, view: View, track: Track = no_progress) -> Surrogate:
        head, how = fit_head(view, self.seed, track)
        tail = nn.Sequential(*[layer for s in view.stages for layer in s]).eval()
        if view.plan.tail:  # the owner kept the last layer: the trainers must grow their own
            return self._own_tail(view, head, tail, how)
        groups = group_pseudo_classes(tail, view.released, np.asarray(view.released_labels),
                                      view.plan.classes, self.seed)
        model = nn.Sequential(head, tail).eval()
        s = Surrogate(model, groups, None, how)
        if self.labelled:
            x, y = view.aux_images[:self.labelled], np.asarray(view.aux_labels)
            q = s.group_probs(x).numpy()  # soft vote of each labelled sample for each group
            votes = np.zeros((q.shape[1], view.plan.classes))
            for c in range(view.plan.classes):
                votes[:, c] = q[y == c].sum(0)
            s.names = name_groups(votes)
        return s

    def _own_tail(self, view: View, head: nn.Module, stages: nn.Module, how: str) -> Surrogate:
        """Owner tail (U-shaped split): the colluders hold features, not logits. With labelled
        aux samples they fit a linear classifier on their features; without, they cluster the
        features of the released activations and use the clusters as unnamed groups."""
        classes, features = view.plan.classes, nn.Sequential(head, stages).eval()
        if self.labelled:
            x, y = view.aux_images[:self.labelled], torch.as_tensor(np.asarray(view.aux_labels))
            f = apply(features, x)
            torch.manual_seed(self.seed)
            lin = nn.Linear(f.shape[1], classes)
            opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
            for _ in range(300):
                loss = nn.functional.cross_entropy(lin(f), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            return Surrogate(nn.Sequential(features, lin).eval(), np.arange(classes),
                             np.arange(classes), how + f"; linear tail fitted on {self.labelled} "
                             f"labelled aux samples (the owner kept the last layer)")
        f = apply(stages, torch.tensor(np.asarray(view.released, np.float32))).numpy()
        km = KMeans(n_clusters=classes, n_init=5, random_state=self.seed).fit(f)
        centroids = torch.tensor(km.cluster_centers_, dtype=torch.float32)
        return Surrogate(nn.Sequential(features, _Nearest(centroids)).eval(), np.arange(classes),
                         None, how + "; k-means groups of the stages' features of the released "
                         "activations (the owner kept the last layer)")


class _Nearest(nn.Module):
    """Logits that prefer the nearest centroid."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("centroids", centroids)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(f, self.centroids)
