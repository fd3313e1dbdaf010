"""Randomised response on the training labels: label differential privacy of the transcript.

Every training sample's label is replaced, once, by a randomised one (Warner 1965; the label-DP
baseline of Ghazi et al., "Deep Learning with Label Differential Privacy", NeurIPS 2021): the
true class with probability e^eps / (e^eps + K - 1), else one of the other K - 1 classes, each
equally likely. The owner trains on the randomised labels only: they are what the last stage
receives, what the owner's tail computes its loss and its gradient from, and what the label
decorrelation penalty sees. Everything a trainer receives then depends on a sample's true label
only through its randomised one, so the whole transcript is eps-label-DP (adjacency: one
sample's label changed; post-processing covers every channel, every stage and every epoch).

The draw is a PRF of the owner's long-term secret and the sample's index (`secret.prf`), not of
the run key: a sample gets the same randomised label in every epoch and every run the owner
makes with the same secret, so linking releases across epochs or runs averages nothing out and
the epsilon does not compose.

The sampler is exact (float-safe in the sense of Mironov 2012): the keep decision compares a
uniform 64-bit integer with an integer threshold T, so the probability realised is T / 2^64
exactly; T is chosen so that the privacy loss ln(T (K - 1) / (2^64 - T)) is at most the target,
and `epsilon` reports that realised value. The other class is drawn by rejection from 64-bit
integers, so it is exactly uniform.
"""

from __future__ import annotations

import math

import numpy as np

from clicooper_bus.ml.privacy.secret import prf_int

SPACE = 1 << 64  # the PRF's integers are uniform on [0, 2^64)


def keep_threshold(epsilon: float, classes: int) -> int:
    """The largest integer T with ln(T (K - 1) / (2^64 - T)) <= epsilon, K = `classes`: keep
    the true label when a uniform 64-bit integer is below T. Raises ValueError for epsilon <= 0
    or fewer than 2 classes."""
    if not epsilon > 0 or classes < 2:
        raise ValueError(f"randomised response needs epsilon > 0 and 2 or more classes, got "
                         f"{epsilon}, {classes}")
    q = math.exp(epsilon) / (math.exp(epsilon) + classes - 1)
    t = min(SPACE - 1, int(q * SPACE))
    while t > 0 and realised_epsilon(t, classes) > epsilon:
        t -= max(1, t >> 40)  # rounding put it a hair above: step down until it holds
    return t


def realised_epsilon(threshold: int, classes: int) -> float:
    """The privacy loss of keeping with probability threshold / 2^64: the log of the keep
    probability over that of any one other class."""
    return math.log(threshold * (classes - 1)) - math.log(SPACE - threshold)


class RandomisedResponse:
    """Keyed randomised response over `classes` labels at `epsilon` (see the module)."""

    def __init__(self, secret: bytes, classes: int, epsilon: float):
        self.secret, self.classes = secret, classes
        self.threshold = keep_threshold(epsilon, classes)

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
            r = prf_int(self.secret, b"labels/rr/other", index, attempt)
            if r < limit:
                other = r % k
                return other if other < label else other + 1
        raise RuntimeError("randomised response: 65,536 rejections in a row")  # p < 2^-65536

    def labels(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The randomised labels (int64, shape like `labels`) of the samples with training-set
        indices `ids`: the same for a sample on every call."""
        out = np.asarray(labels, np.int64).copy()
        for j, (i, y) in enumerate(zip(np.asarray(ids).tolist(), out.tolist(), strict=True)):
            if prf_int(self.secret, b"labels/rr/keep", i) >= self.threshold:
                out[j] = self._other(i, y)
        return out
