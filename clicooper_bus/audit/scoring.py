"""Scores of attack outputs against the truth only the auditor holds, each with its chance
level or floor, so that no number is read without the line it must beat."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
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


# `ssim`'s window (skimage: truncate 3.5 at sigma 1.5, an 11 x 11 window) and constants
_SIGMA, _TRUNCATE, _PAD, _C1, _C2 = 1.5, 3.5, 5, (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2
_CHUNK = 256  # images per batch of `ssims`: a dozen float64 arrays of that many at a time


def ssims(recon: np.ndarray, originals: np.ndarray) -> list[float]:
    """`ssim` of each pair (N x C x H x W), bit for bit: skimage's arithmetic (its
    `structural_similarity` with `ssim`'s settings), done on a batch of images at once instead
    of 2,000 calls of 0.7 ms each (an audit's inversion floors: 1.0 s of CPU, now 0.1 s). The
    Gaussian filters each image's planes alone, in the same order; each mean is taken of that
    one image's cropped map, as skimage takes it."""
    a_all, b_all = np.asarray(recon, np.float64), np.asarray(originals, np.float64)
    if a_all.shape != b_all.shape or a_all.ndim != 4:
        raise ValueError(f"ssims takes two N x C x H x W stacks of one shape, not "
                         f"{a_all.shape} and {b_all.shape}")
    out: list[float] = []
    sigma = (0, 0, _SIGMA, _SIGMA)
    for i in range(0, len(a_all), _CHUNK):
        a, b = a_all[i:i + _CHUNK], b_all[i:i + _CHUNK]

        def f(x):
            return gaussian_filter(x, sigma, mode="reflect", truncate=_TRUNCATE)

        ux, uy = f(a), f(b)
        uxx, uyy, uxy = f(a * a), f(b * b), f(a * b)
        vx = 1.0 * (uxx - ux * ux)
        vy = 1.0 * (uyy - uy * uy)
        vxy = 1.0 * (uxy - ux * uy)
        a1, a2, b1, b2 = (2 * ux * uy + _C1, 2 * vxy + _C2, ux**2 + uy**2 + _C1, vx + vy + _C2)
        s = (a1 * a2) / (b1 * b2)
        crop = s[:, :, _PAD:-_PAD, _PAD:-_PAD]
        for one in crop:
            if len(one) == 1:
                out.append(float(one[0].mean(dtype=np.float64)))
            else:  # skimage's channel_axis: each channel's mean, then their mean
                out.append(float(np.array([c.mean(dtype=np.float64) for c in one]).mean()))
    return out


def mean_ssim(recon: np.ndarray, originals: np.ndarray) -> float:
    if np.ndim(recon) == np.ndim(originals) == 4 and np.shape(recon) == np.shape(originals):
        return float(np.mean(ssims(recon, originals)))
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
