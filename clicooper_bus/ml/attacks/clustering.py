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
    x = x.reshape(len(x), -1).astype(np.float64)
    if variant.startswith("standardised"):
        x = StandardScaler().fit_transform(x)
    if "pca" in variant:
        n = int(variant.rsplit("pca", 1)[1])
        x = PCA(n_components=min(n, *x.shape), random_state=seed).fit_transform(x)
    return x


def cluster_variants(x: np.ndarray, k: int, *, seed: int = 0, restarts: int = 5,
                     track: Track = no_progress, desc: str = "clustering") -> dict[str, np.ndarray]:
    """Cluster assignments of every variant (k clusters, `restarts` k-means initialisations)."""
    out = {}
    for v in track(VARIANTS, desc, len(VARIANTS)):
        km = KMeans(n_clusters=k, n_init=restarts, random_state=seed)
        out[v] = km.fit_predict(features(x, v, seed)).astype(np.int64)
    return out


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
