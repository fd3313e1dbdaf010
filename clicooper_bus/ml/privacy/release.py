"""Activation protection: the filter on the owner's release path.

Every activation the owner sends (training `fwd` and evaluation `eval_fwd`) goes through it:
per-sample clipping (L2 for Gaussian noise, L1 for Laplace) to `clip`, then noise. Clipping is
differentiable, so in `per-step` mode the head trains end to end through it; the noise is
additive and so passes gradients unchanged.

- `per-step`: fresh noise on every release (keyed by the owner's secret and the step, so that a
  run is reproducible by its owner and by nobody else).
- `once`: each sample is released once: its noise is a function of the secret and its id, and
  the head is fixed, so every later release of it is the same value and costs no more privacy.

The filter is also what the auditor's white-box attacker calls to release public images "as the
owner does": then it is built without the secret and draws fresh noise.
"""

from __future__ import annotations

import secrets as _secrets
from dataclasses import dataclass

import numpy as np
import torch

from clicooper_bus.ml.privacy.secret import prf_int

MECHANISMS = ("none", "gaussian", "laplace")
MODES = ("per-step", "once")


@dataclass(frozen=True)
class FilterSpec:
    mechanism: str  # gaussian or laplace
    clip: float  # L2 (gaussian) or L1 (laplace) bound on each sample's activation
    noise: float  # Gaussian standard deviation or Laplace scale, per coordinate
    mode: str = "per-step"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS[1:] or self.mode not in MODES:
            raise ValueError(f"bad filter {self}")


class ActivationFilter:
    """clip, then noise; `secret=None` draws unkeyed fresh noise (the auditor's simulation)."""

    def __init__(self, spec: FilterSpec, secret: bytes | None = None):
        self.spec, self.secret = spec, secret

    def clip(self, a: torch.Tensor) -> torch.Tensor:
        flat = a.flatten(1)
        norm = flat.norm(p=2 if self.spec.mechanism == "gaussian" else 1, dim=1)
        scale = (self.spec.clip / norm.clamp_min(1e-12)).clamp(max=1.0)
        return a * scale.view(-1, *([1] * (a.dim() - 1)))

    def _draw(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        if self.spec.mechanism == "gaussian":
            return torch.randn(shape, generator=gen) * self.spec.noise
        u = torch.rand(shape, generator=gen).clamp(1e-7, 1 - 1e-7) - 0.5
        return -self.spec.noise * u.sign() * torch.log1p(-2 * u.abs())

    def _gen(self, label: bytes, *parts: int) -> torch.Generator:
        g = torch.Generator()
        seed = prf_int(self.secret, label, *parts) if self.secret is not None \
            else _secrets.randbits(63)
        return g.manual_seed(seed & ((1 << 63) - 1))

    def noise(self, shape: tuple[int, ...], *, ids: np.ndarray | None, split: str,
              step: int) -> torch.Tensor:
        """Noise for one batch: per sample id in `once` mode, per (split, step) otherwise."""
        if self.spec.mode == "once" and ids is not None:
            one = shape[1:]
            tag = b"noise/once/" + split.encode()
            return torch.stack([self._draw(one, self._gen(tag, int(i))) for i in ids])
        return self._draw(shape, self._gen(b"noise/step/" + split.encode(), step))

    def __call__(self, a: torch.Tensor, *, ids: np.ndarray | None = None, split: str = "train",
                 step: int = 0) -> torch.Tensor:
        clipped = self.clip(a)
        return clipped + self.noise(tuple(a.shape), ids=ids, split=split, step=step)


class Clip(torch.nn.Module):
    """The filter's deterministic part as a layer: how the owner runs the delivered model
    (head, clip, stages), since the stages were trained on clipped activations."""

    def __init__(self, spec: FilterSpec):
        super().__init__()
        self.filter = ActivationFilter(spec)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.filter.clip(a)


def inference_model(segments: list[torch.nn.Module], spec: FilterSpec | None) -> torch.nn.Module:
    """The owner's model for inference: its segments in order, with the release clipping
    after the head when activations were protected (noise is for releases only)."""
    parts = [segments[0], *([Clip(spec)] if spec is not None else []), *segments[1:]]
    return torch.nn.Sequential(*parts).eval()
