"""The Uchida-style mark of a chain key on a stage's weights (Uchida et al. 2017): the
regulariser a trainer adds while it trains, and extraction. The key, the bits and the projection
come from the torch-free `clicooper_bus.chain.key`; this is the part that touches weights.

The mark is read from the stage's *first weighted layer* (`carrier`): its whole weight flattened
when it has at most 65,536 entries, otherwise its weight averaged over the output dimension
(d = in_features for a linear layer, in_channels * k * k for a convolution, as Uchida et al.
average a conv kernel over its filters); the bits are sigmoid(X w) > 1/2. Training adds
lambda * BCE(sigmoid(X w), b) to the stage's loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clicooper_bus.chain.key import DEFAULT_BITS, bits, projection


def carrier(module):
    """The stage's first weighted layer (Linear or Conv2d), or None when it has no weights."""
    return next((m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)


FLATTEN_MAX = 65536  # carriers this small are read whole; larger ones averaged over outputs


def carrier_vector(layer):
    """The vector the mark is read from (a torch tensor): the whole weight, flattened, when it
    has at most FLATTEN_MAX entries; otherwise the weight averaged over its output dimension
    (Uchida et al.). A small layer averaged over its few outputs (a 10-class classifier) kept
    an eighth of its bits wrong after an epoch; read whole, it holds them."""
    w = layer.weight
    return w.flatten() if w.numel() <= FLATTEN_MAX else w.mean(0).flatten()


class Watermark:
    """The mark of one key on one stage: the regulariser to add to the loss, and extraction."""

    def __init__(self, key: bytes, module, *, t: int = DEFAULT_BITS, strength: float = 0.1):
        layer = carrier(module)
        if layer is None:
            raise ValueError("this stage has no weighted layer to carry a watermark")
        self.layer, self.key, self.strength = layer, key, strength
        d = carrier_vector(layer).numel()
        self.x = torch.from_numpy(projection(key, d, t))
        self.b = torch.from_numpy(bits(key, t).astype(np.float32))

    def loss(self):
        """lambda * BCE(sigmoid(X w), b): differentiable in the carrier's weights."""
        logits = self.x @ carrier_vector(self.layer)
        return self.strength * torch.nn.functional.binary_cross_entropy_with_logits(logits, self.b)

    def add_grad(self) -> None:
        """Add the gradient of `loss()` to the carrier's `.grad`, in closed form: what a training
        step does every step. Autograd's extra backward pass for this small term cost about
        2 ms a step on a one-thread trainer, on the chain's critical path (+9 % on an epoch
        over the bus); this costs a few hundred microseconds.
        d/dW of lambda * mean BCE(X v, b) = lambda / T * X^T (sigmoid(X v) - b), reshaped to W,
        divided by the outputs when v is W averaged over them."""
        w = self.layer.weight
        with torch.no_grad():
            v = carrier_vector(self.layer)
            g = self.x.T @ (torch.sigmoid(self.x @ v) - self.b)
            g.mul_(self.strength / len(self.b))
            if v.numel() == w.numel():
                g = g.view_as(w)
            else:
                g = (g / w.shape[0]).view(w.shape[1:]).expand_as(w)
            if w.grad is None:
                w.grad = g.clone()
            else:
                w.grad.add_(g)


def extract(key: bytes, module, t: int = DEFAULT_BITS) -> np.ndarray:
    """The bits a stage's weights carry for `key`."""
    layer = carrier(module)
    if layer is None:
        raise ValueError("this stage has no weighted layer to carry a watermark")
    with torch.no_grad():
        w = carrier_vector(layer).double().numpy()
    return (projection(key, w.size, t).astype(np.float64) @ w > 0).astype(np.uint8)


def bit_error_rate(key: bytes, module, t: int = DEFAULT_BITS) -> float:
    return float(np.mean(extract(key, module, t) != bits(key, t)))
