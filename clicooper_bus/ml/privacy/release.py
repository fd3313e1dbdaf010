"""Activation protection: the filter on the owner's release path.

Every activation the owner sends (training `fwd` and evaluation `eval_fwd`) goes through it:
per-sample clipping (L2 for Gaussian noise, L1 for Laplace) to `clip`, then exact integer noise
on a fixed lattice (`lattice`: a discrete Gaussian or discrete Laplace). Clipping is
differentiable, so in `per-step` mode the head trains end to end through it; snapping and noise
are additive and so pass gradients unchanged (straight through).

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

from clicooper_bus.ml.privacy import lattice
from clicooper_bus.ml.privacy.secret import prf

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
        lattice.units(self.noise, self.clip)  # refused here, before a run, not at its first release


class ActivationFilter:
    """clip, then noise; `secret=None` draws unkeyed fresh noise (the auditor's simulation)."""

    def __init__(self, spec: FilterSpec, secret: bytes | None = None):
        self.spec, self.secret = spec, secret

    def clip(self, a: torch.Tensor, bound: float | None = None) -> torch.Tensor:
        """Each sample scaled into the norm ball of radius `bound` (default: the clip)."""
        flat = a.flatten(1)
        norm = flat.norm(p=2 if self.spec.mechanism == "gaussian" else 1, dim=1)
        bound = self.spec.clip if bound is None else bound
        scale = (bound / norm.clamp_min(1e-12)).clamp(max=1.0)
        return a * scale.view(-1, *([1] * (a.dim() - 1)))

    def _draw(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        s = self.spec
        return lattice.noise(rng, s.mechanism, shape, s.noise, s.clip)

    def _rng(self, label: bytes, *parts: int) -> np.random.Generator:
        # the whole 256-bit PRF output seeds the generator: a 64-bit seed let a trainer
        # confirm a guessed seed from one release (only the right one leaves the clip ball)
        # in 2^64 work
        seed = int.from_bytes(prf(self.secret, label, *parts), "big") \
            if self.secret is not None else _secrets.randbits(256)
        return np.random.default_rng(seed)

    def noise(self, shape: tuple[int, ...], *, ids: np.ndarray | None, split: str,
              step: int) -> np.ndarray:
        """Integer noise in lattice steps (int64) for one batch: per sample id in `once`
        mode, per (split, step) otherwise."""
        if self.spec.mode == "once" and ids is not None and len(ids):
            one = shape[1:]
            tag = b"noise/once/" + split.encode()
            return np.stack([self._draw(one, self._rng(tag, int(i))) for i in ids])
        return self._draw(shape, self._rng(b"noise/step/" + split.encode(), step))

    def __call__(self, a: torch.Tensor, *, ids: np.ndarray | None = None, split: str = "train",
                 step: int = 0) -> torch.Tensor:
        """The release of activations `a` (N x ...): clipped within the lattice's slack,
        snapped to the lattice, plus integer lattice noise; float32, gradients as the clip's."""
        s = self.spec
        if len(a):
            lattice.check_dim(s.mechanism, a[0].numel())
        gamma = lattice.step(s.clip)
        margin = lattice.slack(s.mechanism, s.clip, a[0].numel()) if len(a) else 0.0
        clipped = self.clip(a, s.clip - margin)
        k = np.rint(clipped.detach().numpy().astype(np.float64) / gamma).astype(np.int64)
        k = lattice.within_clip(k, s.mechanism)  # the snapped input, within clip / gamma
        k += self.noise(tuple(a.shape), ids=ids, split=split, step=step)
        released = torch.from_numpy((k * gamma).astype(np.float32))
        # the value sent is `released` bit for bit (x - x is exactly 0), and the gradient is
        # the clip's; `clipped + (released - clipped).detach()` rounded in float32 and sent
        # values off the lattice that depended on the private activation
        return released + (clipped - clipped.detach())


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
