"""Randomised response on the training labels: label differential privacy of the transcript.

Every training sample's label is replaced, once, by a randomised one (Warner 1965; the label-DP
baseline of Ghazi et al., "Deep Learning with Label Differential Privacy", NeurIPS 2021): the
true class with probability e^eps / (e^eps + K - 1), else one of the other K - 1 classes, each
equally likely. The owner trains on the randomised labels only: they are what the last stage
receives, what the owner's tail computes its loss and its gradient from, and what the label
decorrelation penalty sees. Everything a trainer receives then depends on a sample's true label
only through its randomised one, so the whole transcript is eps-label-DP (adjacency: one
sample's label changed; post-processing covers every channel, every stage and every epoch).

The draw is HMAC-SHA256 of the owner's long-term secret (not the run key) over fixed-width
fields: the number of classes, the epsilon, and the SHA-256 of the sample's image. A sample gets
the same randomised label in every epoch and in every run the owner makes with the same secret,
classes and epsilon, whatever the dataset's order or subset, so linking releases across epochs
or runs averages nothing out and the epsilon does not compose. A run at another epsilon draws
afresh (keying by the image alone made the kept labels of epsilon 0.4 a subset of those of
epsilon 1, which told a trainer in both runs the true label wherever the two differed): the
epsilons of runs at different levels add, as they do after the secret is made anew.

The sampler is exact (float-safe in the sense of Mironov 2012): the keep decision compares a
uniform 64-bit integer with an integer threshold T, so the probability realised is T / 2^64
exactly; T is chosen so that the privacy loss ln(T (K - 1) / (2^64 - T)) is at most the target,
and `epsilon` reports that realised value. The other class is drawn by rejection from 64-bit
integers, so it is exactly uniform.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

import numpy as np

SPACE = 1 << 64  # the PRF's integers are uniform on [0, 2^64)
MAX_EPSILON = 50.0  # beyond it randomised response keeps every label but for 2^-72 of them


def keep_threshold(epsilon: float, classes: int) -> int:
    """The largest integer T with |ln(T (K - 1) / (2^64 - T))| <= epsilon, K = `classes`, and
    T >= 2^64 / K: keep the true label when a uniform 64-bit integer is below T. Raises
    ValueError for epsilon outside (0, MAX_EPSILON], one too small to resolve, or fewer than 2
    classes."""
    if not 0 < epsilon <= MAX_EPSILON or classes < 2:
        raise ValueError(f"randomised response needs 0 < epsilon <= {MAX_EPSILON:g} and 2 or "
                         f"more classes, got {epsilon}, {classes}")
    lo, hi = -(-SPACE // classes), SPACE - 1  # keeping less often than 1/K is no privacy
    if not _within(lo, classes, epsilon):
        raise ValueError(f"randomised response at epsilon {epsilon:g} is finer than a 64-bit "
                         f"threshold resolves: use 1e-9 or more")
    while lo < hi:  # the loss grows with T: the largest T within epsilon
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _within(mid, classes, epsilon) else (lo, mid - 1)
    return lo


def _within(threshold: int, classes: int, epsilon: float) -> bool:
    # a relative margin of 1e-12 covers the float error of the logarithm (about 1e-16)
    return realised_epsilon(threshold, classes) * (1 + 1e-12) <= epsilon


def realised_epsilon(threshold: int, classes: int) -> float:
    """The privacy loss of keeping with probability threshold / 2^64: the absolute log of the
    keep probability over that of any one other class, ln(T (K - 1) / (2^64 - T)), computed
    as log1p of an exact integer difference over 2^64 - T (so that it is accurate near 0)."""
    num, den = threshold * (classes - 1), SPACE - threshold
    return abs(math.log1p((num - den) / den)) if num >= den else abs(math.log1p((den - num) / num))


def image_digests(images: np.ndarray) -> list[bytes]:
    """SHA-256 of each image's bytes (N x ...): what keys a sample's draw."""
    return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest() for x in images]


class RandomisedResponse:
    """Keyed randomised response over `classes` labels at `epsilon` for the training images
    `images` (N x ...; `labels` takes indices into them). See the module."""

    def __init__(self, secret: bytes, classes: int, epsilon: float, images: np.ndarray):
        self.secret, self.classes = secret, classes
        self.threshold = keep_threshold(epsilon, classes)
        self._digests = image_digests(images)
        # fixed-width fields after a versioned domain: no two inputs share an encoding
        self._prefix = b"clicooper/labels/rr/v2\0" + struct.pack(">Id", classes, epsilon)
        # (index, label) -> its randomised label: the draw is fixed, so after an image's first
        # epoch its label costs a lookup, not two HMACs (the steps' hot path)
        self._memo: dict[tuple[int, int], int] = {}

    def _draw(self, what: bytes, index: int, attempt: int = 0) -> int:
        msg = self._prefix + what + struct.pack(">I", attempt) + self._digests[index]
        return int.from_bytes(hmac.new(self.secret, msg, hashlib.sha256).digest()[:8], "big")

    @property
    def epsilon(self) -> float:
        """The realised epsilon (at most the configured one)."""
        return realised_epsilon(self.threshold, self.classes)

    @property
    def keep_probability(self) -> float:
        return self.threshold / SPACE

    def _other(self, index: int, label: int) -> int:
        """One of the `classes - 1` labels other than `label`, exactly uniform (rejection)."""
        k = self.classes - 1
        limit = SPACE - SPACE % k
        for attempt in range(1 << 16):
            r = self._draw(b"other", index, attempt)
            if r < limit:
                other = r % k
                return other if other < label else other + 1
        raise RuntimeError("randomised response: 65,536 rejections in a row")  # p < 2^-65536

    def labels(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The randomised labels (int64, shape like `labels`) of the samples with indices `ids`
        into the images: the same for an image on every call. Raises IndexError for an index
        beyond them."""
        out = np.asarray(labels, np.int64).copy()
        for j, (i, y) in enumerate(zip(np.asarray(ids).tolist(), out.tolist(), strict=True)):
            if (i, y) not in self._memo:
                self._memo[i, y] = self._other(i, y) \
                    if self._draw(b"keep\0", i) >= self.threshold else y
            out[j] = self._memo[i, y]
        return out
