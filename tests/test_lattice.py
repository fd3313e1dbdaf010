"""Float-safe releases: every release lies on one lattice whatever the input and its noise is an
exact integer draw, so the set of outputs cannot separate neighbouring inputs (the float
sampler's did: 18.3 % of the releases of 0.5 were outputs 0 could not give, epsilon >= 1.70
where 0.1 was stated). The samplers themselves are tested in tests/test_sampler.py."""

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


def _outputs_of_zero_share(releases: np.ndarray, gamma: float) -> float:
    """The issue's check: the share of `releases` that a release of 0 could also give. The
    noise is an exact discrete Laplace or Gaussian draw, which gives every integer a positive
    probability (tests/test_sampler.py: their pmfs, thresholds and tails), so 0's outputs are
    exactly the lattice points gamma Z: the share is that of releases on the lattice."""
    k = releases / gamma
    return float(np.mean(k == np.rint(k)))


@pytest.mark.parametrize("mech,noise,bins", [
    ("laplace", 20.0, np.linspace(-60, 60, 13)),  # L1 clip 1, epsilon 0.1 per release
    ("gaussian", 0.2, np.linspace(-0.6, 0.6, 13)),  # where the float ziggurat's reach cost 0.01
])
def test_the_output_set_cannot_separate_neighbouring_inputs(mech, noise, bins):
    """Releases of 0 and of 0.5 lie on the same lattice, every lattice point is an output of
    both (100 % where the float sampler gave 18.3 %), and their distributions differ by no
    more than the mechanism allows: for Laplace, epsilon 0.1 bounds every bin's log ratio."""
    spec = FilterSpec(mech, clip=1.0, noise=noise)
    gamma = lattice.step(1.0)
    zero, half = _releases(0.0, 200_000, spec), _releases(0.5, 200_000, spec)
    assert _outputs_of_zero_share(half, gamma) == 1.0
    assert _outputs_of_zero_share(zero, gamma) == 1.0
    p0, _ = np.histogram(zero, bins)
    p1, _ = np.histogram(half, bins)
    if mech == "laplace":
        assert np.abs(np.log(p0 / p1)).max() < 0.1 + 0.06  # epsilon 0.1, with sampling noise
    else:  # the shift is visible: the mean moves by 0.5 and the spread is sigma
        assert half.mean() - zero.mean() == pytest.approx(0.5, abs=0.005)
        assert zero.std() == pytest.approx(0.2, rel=0.01)


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


@pytest.mark.parametrize("mech", ["gaussian", "laplace"])
def test_snapped_activations_are_checked_in_integers(mech):
    """A sample a step over clip / gamma (what float32 rounding could leave) is shrunk within
    it, exactly; the others are left alone."""
    limit = 2**lattice.LATTICE_BITS
    k = np.zeros((3, 4), dtype=np.int64)
    k[0, 0] = limit + 1  # over in both norms
    k[1, :2] = [limit // 2, limit // 2]  # L1 exactly at the limit, L2 well within
    k[2] = [7, -3, 0, 2]
    before = k.copy()
    out = lattice.within_clip(k, mech)
    norm = np.abs(out).sum(1) if mech == "laplace" else np.sqrt((out.astype(float) ** 2).sum(1))
    assert (norm <= limit).all() and out[0, 0] < limit + 1 and out[0, 0] > limit - 10
    assert np.array_equal(out[1:], before[1:])


def test_the_filter_draws_integer_noise_of_the_scale_rounded_up():
    f = ActivationFilter(FilterSpec("gaussian", clip=1.0, noise=0.3), bytes(32))
    z = f.noise((64, 1568), ids=None, split="train", step=3)
    assert z.dtype == np.int64 and np.array_equal(z, f.noise((64, 1568), ids=None,
                                                             split="train", step=3))
    assert z.std() == pytest.approx(lattice.units(0.3, 1.0), rel=0.01)
    for mode in ("per-step", "once"):  # an empty batch releases nothing, without error
        empty = ActivationFilter(FilterSpec("gaussian", 1.0, 0.3, mode), bytes(32))
        assert empty(torch.zeros(0, 1568), ids=np.zeros(0, dtype=np.int64)).shape == (0, 1568)
    with pytest.raises(ValueError, match="noise must be positive"):
        lattice.units(0.0, 1.0)
    with pytest.raises(ValueError, match="300 x clip, above the 256 x clip"):
        FilterSpec("gaussian", clip=1.0, noise=300.0)  # when the run is set up


def test_a_laplace_release_too_wide_for_the_lattice_is_refused():
    """Past 2^20 coordinates an L1 clip spread over a dense activation rounds to nothing on
    the lattice: the filter refuses it, naming the fix, and the slack never exceeds half the
    clip (it once went past the clip and flipped the release)."""
    ok = lattice.MAX_LAPLACE_DIM
    lattice.check_dim("laplace", ok)
    lattice.check_dim("gaussian", 4 * ok)
    with pytest.raises(ValueError, match="gaussian"):
        ActivationFilter(FilterSpec("laplace", clip=1.0, noise=1.0))(torch.zeros(1, ok + 1))
    assert lattice.slack("laplace", 1.0, 2**21 + 64) == 0.5
    assert lattice.slack("gaussian", 1.0, 1568) < 1e-4  # far below the cap: unchanged
    # at the limit a concentrated activation keeps its signal within the clip
    a = torch.zeros(1, ok)
    a[0, :1000] = torch.from_numpy(np.random.default_rng(0).random(1000)).float()
    out = ActivationFilter(FilterSpec("laplace", clip=1.0, noise=1e-9))(a).numpy()
    kept = np.abs(out[0, :1000]).sum()
    assert 0.4 < kept <= 1.0  # (the noise, one step a coordinate, is spread over all of them)
