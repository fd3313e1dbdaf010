"""The exact integer samplers' building blocks against their exact probabilities, the discrete
Laplace against its pmf (chi-square, small scales where every value with any real mass is seen),
the rare paths (a draw tying with a threshold, a probability known only through bounds) called
directly, and reproducibility from a seed. The discrete Gaussian: tests/test_sampler_gaussian.py."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from clicooper_bus.ml.privacy import sampler


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _binomial_ok(hits: int, n: int, p: float, z: float = 5.0) -> bool:
    """hits within z standard deviations of n p."""
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("num,den", [(0, 7), (1, 3), (2, 3), (5, 5), (123456, 314573)])
def test_bernoulli_exp_frac_has_probability_exp_minus_num_over_den(num, den):
    n = 200_000
    hits = int(sampler.bernoulli_exp_frac(_rng(num), np.full(n, num, dtype=np.int64), den).sum())
    assert _binomial_ok(hits, n, math.exp(-num / den))


def test_bernoulli_exp_frac_past_int64_splits_the_draw():
    """A denominator near 2^62 makes den x k overflow int64 from k = 2: the split draw still
    gives exp(-1/2)."""
    den = 2**62 + 12345
    n = 100_000
    hits = int(sampler.bernoulli_exp_frac(_rng(3), np.full(n, den // 2, dtype=np.int64), den).sum())
    assert _binomial_ok(hits, n, math.exp(-0.5))


def test_geometric_has_p_v_at_least_v_equal_to_exp_minus_v():
    n = 1_000_000
    v = sampler.geometric_exp(_rng(1), n)
    for k in range(0, 11):  # e^-10 x 1e6 = 45 expected at the last
        assert _binomial_ok(int((v >= k).sum()), n, math.exp(-k))
    q = np.array([0, 1, 3] * 50_000)
    got = sampler.bernoulli_exp_int(_rng(2), q)
    for k in (0, 1, 3):
        assert _binomial_ok(int(got[q == k].sum()), 50_000, math.exp(-k))


def test_the_thresholds_are_the_exact_floors():
    with localcontext() as ctx:
        ctx.prec = 60
        for v in (1, 2, 17, 43, 44):
            assert int(sampler._EXP_FLOORS[v]) == int(Decimal(-v).exp() * 2**63)
    assert int(sampler._EXP_FLOORS[44]) == 0 and int(sampler._EXP_FLOORS[0]) == 2**63


def test_a_draw_on_a_threshold_is_decided_by_more_bits():
    """u = floor(2^63 e^-v) leaves X on either side of e^-v: V is v with probability
    frac(2^63 e^-v), else v - 1. u = 0 (X < 2^-63) gives V >= 44 with probability
    2^63 e^-44 = 0.718. Both happen once in about 2^57 draws, so they are called directly."""
    with localcontext() as ctx:
        ctx.prec = 60
        exact = Decimal(-2).exp() * 2**63
    frac = float(exact - int(exact))  # 0.857
    rng = _rng(4)
    got = [sampler._floor_neg_log(rng, int(sampler._EXP_FLOORS[2]), 63) for _ in range(1000)]
    assert set(got) == {1, 2}
    assert _binomial_ok(got.count(2), 1000, frac)
    deep = [sampler._floor_neg_log(rng, 0, 63) for _ in range(1000)]
    assert min(deep) >= 43
    assert _binomial_ok(sum(d >= 44 for d in deep), 1000, float(Decimal(-44).exp() * 2**63))
    assert _binomial_ok(sum(d >= 45 for d in deep), 1000, float(Decimal(-45).exp() * 2**63))


def test_lazy_bernoulli_is_exact_for_known_probabilities():
    """p = e^-1/2 through decimal bounds, p = 1/2 exactly (a dyadic boundary), and a draw whose
    first bits already decide."""
    rng = _rng(12)
    half_e = [sampler.lazy_bernoulli(rng, lambda d: sampler.exp_bounds(Fraction(1, 2), d))
              for _ in range(4000)]
    assert _binomial_ok(sum(half_e), 4000, math.exp(-0.5))
    half = [sampler.lazy_bernoulli(rng, lambda d: (Fraction(1, 2), Fraction(1, 2)))
            for _ in range(4000)]
    assert _binomial_ok(sum(half), 4000, 0.5)
    assert sampler.lazy_bernoulli(rng, lambda d: (Fraction(1, 2),) * 2, prefix=0, bits=1)
    assert not sampler.lazy_bernoulli(rng, lambda d: (Fraction(1, 2),) * 2, prefix=1, bits=1)


def test_exp_bounds_bracket_e_to_the_minus_x():
    for x in (Fraction(0), Fraction(1, 3), Fraction(7, 2), Fraction(10**6, 7)):
        lo, hi = sampler.exp_bounds(x, 30)
        assert lo <= hi and (x != 0 or lo == hi == 1)
        with localcontext() as ctx:
            ctx.prec = 80
            exact = Fraction((-Decimal(x.numerator) / Decimal(x.denominator)).exp())
        assert lo <= exact <= hi  # and 30 digits of x give about 30 - log10(x) of e^-x:
        assert hi - lo <= exact * (x + 1) * Fraction(1, 10**27)


def _chi_square_p(draws: np.ndarray, log_weight, span: int) -> float:
    """p-value of draws against the pmf proportional to exp(log_weight(y)) on [-span, span]
    (its mass outside is below e^-40); bins with under 5 expected are pooled into the tails."""
    ys = np.arange(-span, span + 1)
    pmf = np.exp(log_weight(ys))
    pmf /= pmf.sum()
    assert np.abs(draws).max() <= span
    counts = np.bincount(draws + span, minlength=ys.size).astype(float)
    expected = pmf * draws.size
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    return float(stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue)


@pytest.mark.parametrize("scale", [1, 3])
def test_discrete_laplace_matches_its_pmf(scale):
    draws = sampler.discrete_laplace(_rng(10 + scale), scale, 200_000)
    assert _chi_square_p(draws, lambda y: -np.abs(y) / scale, 45 * scale) > 1e-3


def test_a_large_scale_has_the_continuous_moments():
    """At the filter's scales (2^13 steps and up) the discrete Laplace's moments are the
    continuous one's: mean |y| = b and variance 2 b^2."""
    b = 20 * 2**20
    lap = sampler.discrete_laplace(_rng(6), b, 200_000).astype(np.float64) / b
    assert np.abs(lap).mean() == pytest.approx(1.0, rel=0.01)
    assert lap.var() == pytest.approx(2.0, rel=0.03)


def _samplers():
    from clicooper_bus.ml.privacy.discrete_gaussian import discrete_gaussian

    return [sampler.discrete_laplace, discrete_gaussian]


@pytest.mark.parametrize("draw", _samplers(), ids=["laplace", "gaussian"])
def test_the_same_seed_draws_the_same_noise(draw):
    a = draw(_rng(7), 1000, 5000)
    assert np.array_equal(a, draw(_rng(7), 1000, 5000))
    assert not np.array_equal(a, draw(_rng(8), 1000, 5000))
    assert a.dtype == np.int64 and draw(_rng(9), 5, 0).size == 0


@pytest.mark.parametrize("draw", _samplers(), ids=["laplace", "gaussian"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, sampler.MAX_SCALE + 1])
def test_a_scale_out_of_range_is_named(draw, bad):
    with pytest.raises(ValueError, match="lattice steps"):
        draw(_rng(), bad, 10)
