"""Distance-correlation penalties on the head's release, added to the head's loss.

- NoPeek (Vepakomma et al. 2020): alpha * dCor(images, release), so that the release keeps
  less of the image than the task needs.
- Label decorrelation (Sun et al., "Label Leakage and Protection from Forward Embedding in
  Vertical Federated Learning", arXiv 2203.01451): beta * dCor(one-hot labels, release), so
  that the release carries less of the label for a trainer to cluster.

dCor is computed per batch on double-centred pairwise distance matrices (Szekely et al. 2007);
the owner adds the penalties' gradient to the one the first stage sends back.
"""

from __future__ import annotations

import numpy as np
import torch


def _centred(z: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(z, z)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of two batches (rows paired), in [0, 1]."""
    a, b = _centred(x.flatten(1)), _centred(y.flatten(1))
    dcov = (a * b).mean().clamp_min(0)
    vx, vy = (a * a).mean(), (b * b).mean()
    # clamped before each square root, whose gradient at 0 is infinite: a batch whose labels
    # are all one class has vx = 0 and dcov = 0, and must add nothing (not NaN) to the head
    return (dcov / (vx * vy).clamp_min(1e-24).sqrt()).clamp_min(1e-12).sqrt()


class HeadPenalty:
    """The head's penalty for `SegmentTrainer.penalty`: `nopeek` x dCor(images, release) plus
    `label_dcor` x dCor(one-hot labels, release). The labels of each step are handed over by
    `labels(step, y)` before its forward; they must be the labels the owner trains with (the
    randomised ones under randomised response), so that the head's updates depend on a
    sample's true label only through them. Raises KeyError for a step whose labels were not
    handed over while `label_dcor` is on."""

    def __init__(self, nopeek: float, label_dcor: float, classes: int):
        self.nopeek, self.label_dcor, self.classes = nopeek, label_dcor, classes
        self._labels: dict[int, torch.Tensor] = {}

    def labels(self, step: int, y: np.ndarray) -> None:
        if self.label_dcor:
            self._labels[step] = torch.nn.functional.one_hot(
                torch.as_tensor(np.asarray(y, np.int64)), self.classes).float()

    def __call__(self, x: torch.Tensor, release: torch.Tensor, step: int) -> torch.Tensor:
        total = torch.zeros((), dtype=release.dtype)
        if self.nopeek:
            total = total + self.nopeek * distance_correlation(x, release)
        if self.label_dcor:
            total = total + self.label_dcor * distance_correlation(self._labels.pop(step),
                                                                   release)
        return total
