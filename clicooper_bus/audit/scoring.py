"""Scores of attack outputs against the truth only the auditor holds, each with its chance
level or floor, so that no number is read without the line it must beat."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)


def contingency(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    k = max(int(pred.max(initial=0)), int(truth.max(initial=0))) + 1
    m = np.zeros((k, k), np.int64)
    np.add.at(m, (pred, truth), 1)
    return m


def hungarian_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy after the best one-to-one renaming of predicted groups to classes."""
    m = contingency(pred, truth)
    rows, cols = linear_sum_assignment(-m)
    return float(m[rows, cols].sum() / max(1, len(truth)))


def success_rate(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of true classes that some cluster recovers with precision and recall >= 0.5."""
    m = contingency(pred, truth)
    found = 0
    classes = np.unique(truth)
    for c in classes:
        size = m[:, c].sum()
        ok = [(m[g, c] / max(1, m[g].sum()) >= 0.5) and (m[g, c] / size >= 0.5)
              for g in range(m.shape[0]) if m[g].sum()]
        found += any(ok)
    return found / max(1, len(classes))


def matched_chance(pred: np.ndarray, truth: np.ndarray, seed: int = 0) -> float:
    """What Hungarian matching gives predictions that carry no information: the same group
    sizes, assigned at random (shuffled), matched to the classes."""
    rng = np.random.default_rng(seed)
    return float(np.mean([hungarian_accuracy(rng.permutation(pred), truth) for _ in range(5)]))


def clustering_scores(pred: np.ndarray, truth: np.ndarray, seed: int = 0) -> dict[str, float]:
    chance = matched_chance(pred, truth, seed)
    return {"ari": float(adjusted_rand_score(truth, pred)),
            "nmi": float(normalized_mutual_info_score(truth, pred)),
            "ami": float(adjusted_mutual_info_score(truth, pred)),
            "matched_accuracy": hungarian_accuracy(pred, truth),
            "matched_accuracy_chance": chance,
            "success_rate": success_rate(pred, truth)}


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM with an 11x11 Gaussian window (sigma 1.5), images C x H x W in [0, 1]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    kw = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    if a.shape[0] == 1:
        return float(structural_similarity(a[0], b[0], **kw))
    return float(structural_similarity(a, b, channel_axis=0, **kw))


def mean_ssim(recon: np.ndarray, originals: np.ndarray) -> float:
    return float(np.mean([ssim(r, o) for r, o in zip(recon, originals, strict=True)]))


def inversion_floors(originals: np.ndarray, labels: np.ndarray, aux: np.ndarray,
                     aux_labels: np.ndarray) -> dict[str, float]:
    """The lines an inversion must beat: no information (mean aux image, black) and class
    information alone (the true class's mean aux image)."""
    mean = aux.mean(0)
    class_means = {c: aux[aux_labels == c].mean(0) if (aux_labels == c).any() else mean
                   for c in np.unique(labels)}
    return {"mean_image": mean_ssim(np.broadcast_to(mean, originals.shape), originals),
            "black": mean_ssim(np.zeros_like(originals), originals),
            "class_mean": mean_ssim(np.stack([class_means[c] for c in labels]), originals)}


def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean()) if len(truth) else float("nan")


def chance_accuracy(truth: np.ndarray) -> float:
    """Always guessing the most frequent class."""
    return float(np.bincount(truth).max() / max(1, len(truth)))
