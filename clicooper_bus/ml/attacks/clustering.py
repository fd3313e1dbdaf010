"""Label inference by clustering: the first trainer clusters the activations it received.

Plain k-means alone overstates protection: a defence that scatters raw activations (noise,
NoPeek) often leaves the class structure in a few standardised principal directions. So every
variant is tried (plain; standardised; PCA to 10 and 50 components, each with and without
standardising) and the auditor reports the strongest, as an attacker trying them all would.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from clicooper_bus.ml.attacks.base import Attack, ThreatModel, Track, View, no_progress

VARIANTS = ("plain", "standardised", "pca10", "pca50", "standardised+pca10",
            "standardised+pca50")


def features(x: np.ndarray, variant: str, seed: int = 0) -> np.ndarray:
    """One variant's features of rows `x` (N x ...): N x D float64."""
    return all_features(x, seed, (variant,))[variant]


def all_features(x: np.ndarray, seed: int = 0, variants: tuple[str, ...] = VARIANTS
                 ) -> dict[str, np.ndarray]:
    """Every variant's features (N x D float64), each base (raw or standardised) fitted once:
    PCA to 10 components is the first 10 of PCA to 50 (principal components are nested; the
    randomized solver finds the leading 10 at least as well with 50 asked of it, and one fit
    instead of two halves the time)."""
    x = x.reshape(len(x), -1).astype(np.float64)
    bases = {"plain": x}
    if any(v.startswith("standardised") for v in variants):
        bases["standardised"] = StandardScaler().fit_transform(x)
    out: dict[str, np.ndarray] = {}
    for name, base in bases.items():
        prefix = "" if name == "plain" else name + "+"
        wanted = [v for v in variants if v.startswith(prefix + "pca")]
        if name in variants:
            out[name] = base
        if wanted:
            most = max(int(v.rsplit("pca", 1)[1]) for v in wanted)
            z = PCA(n_components=min(most, *base.shape), random_state=seed).fit_transform(base)
            for v in wanted:
                out[v] = z[:, :int(v.rsplit("pca", 1)[1])]
    return {v: out[v] for v in variants}


def cluster_variants(x: np.ndarray, k: int, *, seed: int = 0, restarts: int = 5,
                     track: Track = no_progress, desc: str = "clustering") -> dict[str, np.ndarray]:
    """Cluster assignments of every variant (k clusters, `restarts` k-means initialisations)."""
    feats = all_features(x, seed)
    return {v: KMeans(n_clusters=k, n_init=restarts, random_state=seed).fit_predict(
        feats[v]).astype(np.int64) for v in track(VARIANTS, desc, len(VARIANTS))}


class ClusteringAttack(Attack):
    name = "clustering"
    family = "clustering"
    title = "Label inference by clustering the received activations"
    threat = ThreatModel("trainer-1 (first stage), alone", frozenset({"plan", "released"}),
                         "none: k is the number of classes, public in the roster's plan")

    def __init__(self, seed: int = 0, restarts: int = 5):
        self.seed, self.restarts = seed, restarts

    def run(self, view: View, track: Track = no_progress) -> dict[str, np.ndarray]:
        return cluster_variants(view.released, view.plan.classes, seed=self.seed,
                                restarts=self.restarts, track=track,
                                desc="clustering released activations")
