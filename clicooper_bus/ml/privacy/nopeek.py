"""NoPeek (Vepakomma et al. 2020): a distance-correlation penalty between the head's inputs
and its released activations, added to the head's loss, so that the release keeps less of the
image than it needs for the task.

dCor is computed per batch on double-centred pairwise distance matrices (Szekely et al. 2007);
the owner adds alpha * dCor(x, head(x)) to the gradient the first stage sends back.
"""

from __future__ import annotations

import torch


def _centred(z: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(z, z)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of two batches (rows paired), in [0, 1]."""
    a, b = _centred(x.flatten(1)), _centred(y.flatten(1))
    dcov = (a * b).mean().clamp_min(0)
    vx, vy = (a * a).mean(), (b * b).mean()
    return (dcov / (vx * vy).sqrt().clamp_min(1e-12)).sqrt()
