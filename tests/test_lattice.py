"""Float-safe releases: every release lies on one lattice whatever the input, so the set of
outputs cannot separate neighbouring inputs (the float sampler's did: 18.3 % of the releases of
0.5 were outputs 0 could not give, epsilon >= 1.70 where 0.1 was stated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clicooper_bus.ml.privacy import lattice
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec


def _releases(x: float, n: int, spec: FilterSpec) -> np.ndarray:
    f = ActivationFilter(spec)  # unkeyed: fresh noise on every call
    a = torch.full((n, 1), x)
    return f(a).numpy()[:, 0].astype(np.float64)


def test_the_output_set_cannot_separate_neighbouring_inputs():
    """L1 clip 1, Laplace scale 20 (epsilon 0.1 per release): releases of 0 and of 0.5 lie on
    the same lattice, every lattice point is an output of both, and their distributions differ
    by no more than epsilon allows."""
    spec = FilterSpec("laplace", clip=1.0, noise=20.0)
    gamma = lattice.step(1.0)
    zero, half = _releases(0.0, 200_000, spec), _releases(0.5, 200_000, spec)
    # the float sampler's check: the share of releases of 0.5 that 0 could also give. 0 gives
    # exactly the lattice points (its discrete Laplace noise reaches every integer), so the
    # share is that of releases on the lattice: 100 % here, 18.3 % with the float sampler
    for r in (zero, half):
        k = r / gamma
        assert np.array_equal(k, np.rint(k))
    bins = np.linspace(-60, 60, 13)
    p0, _ = np.histogram(zero, bins)
    p1, _ = np.histogram(half, bins)
    ratio = np.abs(np.log(p0 / p1))
    assert ratio.max() < 0.1 + 0.06  # epsilon 0.1, with sampling noise


def test_the_noise_has_the_continuous_spread():
    """Rounding to a lattice 2^-20 of the clip leaves the mechanism's noise as it was."""
    a = torch.zeros(256, 1568)
    g = ActivationFilter(FilterSpec("gaussian", clip=1.0, noise=0.3))(a).numpy()
    assert g.std() == pytest.approx(0.3, rel=0.01) and abs(g.mean()) < 0.003
    lap = ActivationFilter(FilterSpec("laplace", clip=1.0, noise=0.2))(a).numpy()
    assert np.abs(lap).mean() == pytest.approx(0.2, rel=0.01)


@pytest.mark.parametrize("mech,norm", [("gaussian", 2), ("laplace", 1)])
def test_a_snapped_release_stays_within_the_clip(mech, norm):
    """The clip is tightened by the snapping's slack, so the sensitivity stays 2 x clip."""
    clip, dim = 1.0, 1568
    f = ActivationFilter(FilterSpec(mech, clip=clip, noise=1e-9))
    a = torch.randn(32, dim) * 50
    gamma = lattice.step(clip)
    tight = f.clip(a, clip - lattice.slack(mech, clip, dim))
    snapped = np.rint(tight.double().numpy() / gamma) * gamma
    assert np.linalg.norm(snapped, ord=norm, axis=1).max() <= clip


@pytest.mark.parametrize("mech", ["gaussian", "laplace"])
def test_what_is_sent_is_the_lattice_release_bit_for_bit(mech):
    """The straight-through trick must not touch the value: every coordinate of every release
    of arbitrary activations is exactly gamma times an integer, and gradients still flow."""
    f = ActivationFilter(FilterSpec(mech, clip=1.0, noise=0.2))
    x = (torch.randn(64, 1568) * 3).requires_grad_(True)
    out = f(x)
    k = out.detach().numpy().astype(np.float64) / lattice.step(1.0)
    assert np.array_equal(k, np.rint(k))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
