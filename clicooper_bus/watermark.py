"""Chained watermarks: the key of each stage and round, and the Uchida-style mark it defines.

The key of stage k in round t is SHA-256, with domain separation and every field length-
prefixed, over: the run id, k, t, the trainer's public key, the previous link's digest (stage
k-1's commitment in round t, or the signed roster's digest for k = 1), the same stage's claim
digest from round t-1 (zeros in round 0) and the log root of the latest checkpoint when the
trainer commits. Everything in it is public and in the log, so anyone can recompute the chain;
what it proves is order and binding (a stage's mark depends on the run, its place in the chain
and the log's state when it began), not secrecy.

From the key, SHAKE-256 (a fixed, portable XOF: numpy's generators are not promised stable
across versions) yields the T watermark bits and a T x d projection matrix X with entries
uniform in [-1, 1). The mark is read from the stage's *first weighted layer* (`carrier`): its
whole weight flattened when it has at most 65,536 entries, otherwise its weight averaged over
the output dimension (d = in_features for a linear layer, in_channels * k * k for a
convolution, as Uchida et al. 2017 average a conv kernel over its filters); the bits are
sigmoid(X w) > 1/2. Training adds lambda * BCE(sigmoid(X w), b) to the stage's loss.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

DOMAIN_KEY = b"clicooper-watermark-key/1"
DOMAIN_COMMIT = b"clicooper-watermark-commit/1"
DOMAIN_BITS = b"clicooper-watermark-bits/1"
DOMAIN_MATRIX = b"clicooper-watermark-matrix/1"
ZERO = bytes(32)
DEFAULT_BITS = 64
DEFAULT_THRESHOLD = 0.2  # a stage verifies with at most this fraction of wrong bits


def _hash(domain: bytes, *fields: bytes) -> bytes:
    h = hashlib.sha256()
    h.update(len(domain).to_bytes(4, "big") + domain)
    for f in fields:
        h.update(len(f).to_bytes(4, "big") + f)
    return h.digest()


@dataclass(frozen=True)
class Link:
    """Everything a stage-round key is derived from (all of it public, all of it logged)."""

    run_id: str
    stage: int  # 1..K
    round: int  # 0..
    trainer_key: bytes  # the trainer's Ed25519 public key, 32 bytes
    prev_link: bytes  # stage k-1's commitment in this round, or the roster digest for k = 1
    prev_round: bytes  # this stage's claim digest in round t-1; ZERO in round 0
    log_root: bytes  # root of the latest checkpoint the trainer saw when committing

    def __post_init__(self) -> None:
        for name in ("prev_link", "prev_round", "log_root"):
            if len(getattr(self, name)) != 32:
                raise ValueError(f"watermark link field {name} must be 32 bytes")
        if len(self.trainer_key) != 32:
            raise ValueError("watermark link: trainer_key must be a 32-byte Ed25519 key")
        if self.stage < 1 or self.round < 0:
            raise ValueError("watermark link: stage counts from 1, round from 0")

    def key(self) -> bytes:
        return _hash(DOMAIN_KEY, self.run_id.encode(), self.stage.to_bytes(4, "big"),
                     self.round.to_bytes(4, "big"), self.trainer_key, self.prev_link,
                     self.prev_round, self.log_root)


def commitment(key: bytes) -> bytes:
    """What a trainer publishes before a round: binds it to its key, hence to the chain."""
    return _hash(DOMAIN_COMMIT, key)


def bits(key: bytes, t: int = DEFAULT_BITS) -> np.ndarray:
    """The T watermark bits (0/1 uint8) of a key."""
    raw = hashlib.shake_256(DOMAIN_BITS + key).digest((t + 7) // 8)
    return np.unpackbits(np.frombuffer(raw, np.uint8))[:t]


def projection(key: bytes, d: int, t: int = DEFAULT_BITS) -> np.ndarray:
    """The T x d secret projection matrix, float32 entries uniform in [-1, 1)."""
    raw = hashlib.shake_256(DOMAIN_MATRIX + key).digest(4 * t * d)
    u = np.frombuffer(raw, "<u4").astype(np.float64) / 2.0 ** 32
    return (2.0 * u - 1.0).reshape(t, d).astype(np.float32)


def carrier(module):
    """The stage's first weighted layer (Linear or Conv2d), or None when it has no weights."""
    from torch import nn

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
        import torch

        layer = carrier(module)
        if layer is None:
            raise ValueError("this stage has no weighted layer to carry a watermark")
        self.layer, self.key, self.strength = layer, key, strength
        d = carrier_vector(layer).numel()
        self.x = torch.from_numpy(projection(key, d, t))
        self.b = torch.from_numpy(bits(key, t).astype(np.float32))

    def loss(self):
        """lambda * BCE(sigmoid(X w), b): differentiable in the carrier's weights."""
        import torch

        logits = self.x @ carrier_vector(self.layer)
        return self.strength * torch.nn.functional.binary_cross_entropy_with_logits(logits, self.b)

    def add_grad(self) -> None:
        """Add the gradient of `loss()` to the carrier's `.grad`, in closed form: what a training
        step does every step. Autograd's extra backward pass for this small term cost about
        2 ms a step on a one-thread trainer, on the chain's critical path (+9 % on an epoch
        over the bus); this costs a few hundred microseconds.
        d/dW of lambda * mean BCE(X v, b) = lambda / T * X^T (sigmoid(X v) - b), reshaped to W,
        divided by the outputs when v is W averaged over them."""
        import torch

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
    import torch

    layer = carrier(module)
    if layer is None:
        raise ValueError("this stage has no weighted layer to carry a watermark")
    with torch.no_grad():
        w = carrier_vector(layer).double().numpy()
    return (projection(key, w.size, t).astype(np.float64) @ w > 0).astype(np.uint8)


def bit_error_rate(key: bytes, module, t: int = DEFAULT_BITS) -> float:
    return float(np.mean(extract(key, module, t) != bits(key, t)))


def false_positive_probability(t: int = DEFAULT_BITS, threshold: float = DEFAULT_THRESHOLD) -> float:
    """P(a model with no mark verifies): at most floor(threshold * T) of T fair coin flips
    wrong, the binomial tail."""
    k = math.floor(threshold * t)
    return sum(math.comb(t, i) for i in range(k + 1)) / 2.0 ** t
