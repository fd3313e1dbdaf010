"""The block sampler of the discrete Gaussian: against the pmf (chi-square) where every value
with real mass is seen, against CKS20's Algorithm 3 (a reference implementation here), at the
filter's scales against the continuous moments, its tables' exactness, and its rare paths (a
tie with a threshold, the tail beyond 510 blocks) called directly."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
from scipy import stats

from clicooper_bus.ml.privacy import discrete_gaussian as dg
from clicooper_bus.ml.privacy import sampler
from tests.test_sampler import _binomial_ok, _chi_square_p, _rng


def _cks20(rng: np.random.Generator, sigma: int, n: int) -> np.ndarray:
    """CKS20 Algorithm 3 with t = sigma, the reference: a discrete Laplace candidate y kept with
    probability exp(-(|y| - sigma)^2 / (2 sigma^2)). Small sigma only (int64 squares)."""
    d = 2 * sigma * sigma

    def draw(m: int) -> np.ndarray:
        y = sampler.discrete_laplace(rng, sigma, m)
        q, r = np.divmod((np.abs(y) - sigma) ** 2, d)
        kept = sampler.bernoulli_exp_int(rng, q)
        kept[kept] = sampler.bernoulli_exp_frac(rng, r[kept], d)
        return y[kept]

    return sampler.rejection(n, 0.75, draw)


@pytest.mark.parametrize("sigma", [1, 2, 5, 40])
def test_the_discrete_gaussian_matches_its_pmf(sigma):
    """sigma <= 8 makes blocks of one integer; sigma 40 blocks of 5, where the offset's
    acceptance does part of the work."""
    draws = dg.discrete_gaussian(_rng(sigma), sigma, 200_000)
    assert _chi_square_p(draws, lambda y: -(y**2) / (2.0 * sigma**2), 10 * sigma + 4) > 1e-3


def test_it_draws_what_cks20_draws():
    """Two-sample chi-square against the reference algorithm at sigma 40, per integer."""
    sigma, n = 40, 200_000
    a = dg.discrete_gaussian(_rng(20), sigma, n)
    b = _cks20(_rng(21), sigma, n)
    span = 6 * sigma
    ca = np.bincount(np.clip(a, -span, span) + span, minlength=2 * span + 1)
    cb = np.bincount(np.clip(b, -span, span) + span, minlength=2 * span + 1)
    keep = (ca + cb) >= 10
    _, p, _, _ = stats.chi2_contingency(np.vstack([ca[keep], cb[keep]]))
    assert p > 1e-3


def test_the_filters_scales_have_the_continuous_moments():
    """sigma 0.3 x clip in lattice steps (314573): variance sigma^2, kurtosis 3, and the mass of
    each quarter-sigma bin out to 5 sigma as the normal's (the discrete and continuous differ
    by far less than sampling noise at this sigma)."""
    sigma = 314_573
    g = dg.discrete_gaussian(_rng(5), sigma, 200_000).astype(np.float64) / sigma
    assert g.std() == pytest.approx(1.0, rel=0.01) and abs(g.mean()) < 0.01
    assert stats.kurtosis(g, fisher=False) == pytest.approx(3.0, abs=0.05)
    edges = np.concatenate([[-np.inf], np.arange(-5, 5.01, 0.25), [np.inf]])
    counts, _ = np.histogram(g, edges)
    expected = np.diff(stats.norm.cdf(edges)) * g.size
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3


@pytest.mark.parametrize("sigma", [1, 9, 944, 314_573, 2**28])
def test_the_tables_are_exact(sigma):
    """The alias table gives each bucket exactly its weight of 2^63, every block has weight
    (every integer can be drawn), every c_b is below 1, and nearly every candidate passes the
    block test (the offset's factor then rejects about 5 %)."""
    t = dg._table(sigma)
    one = 1 << dg._WEIGHT_BITS
    got = np.zeros(dg._COLUMNS, dtype=object)
    for j in range(dg._COLUMNS):
        got[j] += int(t.keep[j])
        got[int(t.alias[j])] += one - int(t.keep[j])
    assert sum(got) == 2**63 and min(got[: dg._TAIL + 1]) >= 1
    assert int(t.accept.max()) < 2**63 and t.accept[dg._TAIL] == t.accept[dg._REJECT] == 0
    kept = sum(int(g) * int(c) for g, c in zip(got, t.accept, strict=True)) / 2**126
    assert kept == pytest.approx(1.0, abs=1e-6)


def test_a_tie_with_a_block_threshold_is_decided_by_more_bits():
    """u = floor(2^63 c_b) keeps the candidate with probability frac(2^63 c_b), exactly what a
    uniform X in [u, u + 1) / 2^63 below c_b means. Happens once in about 2^57 candidates, so it
    is called directly."""
    t = dg._table(944)
    b = 7
    with localcontext() as ctx:
        ctx.prec = 60
        x = t.x(b * t.width)
        exact = (-Decimal(x.numerator) / Decimal(x.denominator)).exp() * Decimal(
            t.factor[b].numerator) / Decimal(t.factor[b].denominator) * 2**63
    assert int(t.accept[b]) == int(exact)
    rng = _rng(30)
    hits = sum(dg._tie(rng, t, b, int(t.accept[b])) for _ in range(2000))
    assert _binomial_ok(hits, 2000, float(exact - int(exact)))


def test_the_tail_bucket_is_exact_and_never_kept_where_f_is_negligible():
    """Block 510 + G starts past 63 sigma: e^-x there is below e^-2000, so every tail candidate
    is rejected, after an exact decision."""
    t = dg._table(9)
    rng = _rng(31)
    assert all(dg._tail(rng, t) is None for _ in range(200))


# seeding and the scale's range: tests/test_sampler.py, for both samplers


def test_sigma_one_has_the_discrete_variance():
    """For small sigma the discrete Gaussian's variance is below sigma^2: at sigma 1 it is
    sum y^2 e^(-y^2/2) / sum e^(-y^2/2) = 0.99999..."""
    ys = np.arange(-40, 41)
    w = np.exp(-(ys**2) / 2.0)
    var = float((ys**2 * w).sum() / w.sum())
    draws = dg.discrete_gaussian(_rng(40), 1, 400_000).astype(np.float64)
    assert draws.var() == pytest.approx(var, rel=0.01) and var < 1
    assert math.isclose(var, 1.0, rel_tol=1e-6)
