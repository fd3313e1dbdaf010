"""Exact privacy accounting for the owner's activation releases.

One Gaussian release: the analytic Gaussian mechanism (Balle and Wang, ICML 2018). A release
with L2 sensitivity D and noise N(0, s^2 I) is (eps, delta)-DP exactly when

    delta >= Phi(D / (2 s) - eps s / D) - e^eps Phi(-D / (2 s) - eps s / D),

which holds for every eps (the classical s = D sqrt(2 ln(1.25 / delta)) / eps is valid only
for eps < 1 and is loose below it). k Gaussian releases of one sample with the same s compose
exactly into one with sensitivity D sqrt(k) (their privacy-loss distributions are Gaussian, so
the composition is itself a Gaussian mechanism: mu-GDP, Dong, Roth and Su 2022), so the same
formula is exact for the whole run. An RDP bound from opacus's accountant is reported beside
it as a cross-check (it is never smaller).

Laplace releases (L1 clipping): each is (D / b)-DP for scale b; k of them compose to
k D / b (pure), or better for large k through RDP (Mironov 2017, the Laplace mechanism's RDP
in closed form) converted with opacus's `get_privacy_spent`; the smaller is reported.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import log_ndtr

ORDERS = [1.0 + x / 20.0 for x in range(1, 100)] + [float(a) for a in range(6, 257)]


def gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of a Gaussian mechanism with sensitivity/noise ratio mu = D / s."""
    if mu <= 0:
        return 0.0
    a, b = mu / 2 - eps / mu, -mu / 2 - eps / mu
    # Phi(a) - e^eps Phi(b), in logs so that tiny deltas do not vanish
    la, lb = log_ndtr(a), eps + log_ndtr(b)
    return float(math.exp(la) * -math.expm1(lb - la)) if la > lb else 0.0


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest eps with gaussian_delta(eps, mu) <= delta (inf without noise): finite for
    every noise > 0, however tiny. The bracket's top is where the privacy loss, distributed
    N(mu^2 / 2, mu^2), exceeds eps with probability at most delta by the Gaussian tail bound:
    eps = mu^2 / 2 + mu sqrt(2 ln(1 / delta))."""
    _check_delta(delta)
    if mu == math.inf:
        return math.inf
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    hi = mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / delta)) + 1.0
    if gaussian_delta(hi, mu) > delta:  # not for any finite mu; a guard, not a case
        return math.inf
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def gaussian_mu(eps: float, delta: float) -> float:
    """The largest mu = D / s for which one Gaussian release is (eps, delta)-DP."""
    _check_delta(delta)
    if eps <= 0:
        raise ValueError(f"epsilon must be positive, got {eps}")
    lo, hi = 1e-9, 1.0
    while gaussian_delta(eps, hi) < delta:
        hi *= 2.0
    return float(brentq(lambda m: gaussian_delta(eps, m) - delta, lo, hi, xtol=1e-14, rtol=1e-12))


def classical_sigma(eps: float, delta: float, sensitivity: float) -> float:
    """Dwork and Roth's calibration: shown for comparison only (valid for eps < 1)."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / eps


def rdp_gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """opacus's RDP bound for `releases` full-batch (q = 1) Gaussian releases with noise
    multiplier s / D."""
    from opacus.accountants.analysis import rdp

    r = rdp.compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=releases, orders=ORDERS)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a bound still
        warnings.simplefilter("ignore")
        eps, _ = rdp.get_privacy_spent(orders=ORDERS, rdp=r, delta=delta)
    return float(eps)


def laplace_rdp(alpha: float, b: float) -> float:
    """RDP of order alpha of the Laplace mechanism with scale b (per unit L1 sensitivity),
    Mironov 2017, Proposition 6."""
    if alpha == 1.0:
        return 1.0 / b + math.exp(-1.0 / b) - 1.0
    t1 = math.log(alpha / (2 * alpha - 1)) + (alpha - 1) / b
    t2 = math.log((alpha - 1) / (2 * alpha - 1)) - alpha / b
    return float(np.logaddexp(t1, t2)) / (alpha - 1)


def laplace_epsilon(scale_over_sensitivity: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` Laplace releases: the smaller of pure composition and RDP."""
    from opacus.accountants.analysis import rdp

    b = scale_over_sensitivity
    pure = releases / b
    if delta <= 0:
        return pure
    r = [releases * laplace_rdp(a, b) for a in ORDERS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = rdp.get_privacy_spent(orders=ORDERS, rdp=r, delta=delta)
    return float(min(pure, eps))


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@dataclass(frozen=True)
class Spent:
    """The privacy a run spent, with everything it holds for: what goes in summary.json and
    the audit report."""

    mechanism: str  # gaussian or laplace
    epsilon: float  # exact (Gaussian) or best bound (Laplace), for every training sample
    delta: float
    releases: int  # releases of each training sample's activation
    noise: float  # noise standard deviation (Gaussian) or scale b (Laplace), per coordinate
    clip: float  # per-sample L2 (Gaussian) or L1 (Laplace) clipping norm
    sensitivity: float  # of one release under the stated adjacency
    method: str
    rdp_epsilon: float | None = None  # opacus's RDP bound, a looser cross-check
    adjacency: str = ("replace-one: two datasets differing in one training sample's image; "
                      "each release is that one sample's activation, so the sensitivity is the "
                      "clipped norm's diameter, 2 x clip. Labels are treated as public: they "
                      "travel as (pseudo-)labels or shape the owner tail's gradients, unnoised")

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in d.items()}


def spent(mechanism: str, noise: float, clip: float, releases: int, delta: float) -> Spent:
    sens = 2.0 * clip
    if mechanism == "gaussian":
        mu = sens * math.sqrt(releases) / noise if noise > 0 else math.inf
        eps = gaussian_epsilon(mu, delta)
        rdp_eps = rdp_gaussian_epsilon(noise / sens, releases, delta) if noise > 0 else math.inf
        return Spent("gaussian", eps, delta, releases, noise, clip, sens,
                     "analytic Gaussian mechanism (Balle and Wang 2018); the releases compose "
                     "exactly as one Gaussian of sensitivity 2 clip sqrt(releases)", rdp_eps)
    if mechanism == "laplace":
        eps = laplace_epsilon(noise / sens, releases, delta) if noise > 0 else math.inf
        return Spent("laplace", eps, delta, releases, noise, clip, sens,
                     "Laplace mechanism: the smaller of pure composition and RDP (Mironov 2017) "
                     "converted by opacus")
    raise ValueError(f"unknown mechanism {mechanism!r}")


def calibrate(mechanism: str, epsilon: float, delta: float, clip: float, releases: int) -> float:
    """The noise (Gaussian standard deviation or Laplace scale) that spends exactly `epsilon`
    over `releases` releases of each sample."""
    sens = 2.0 * clip
    if mechanism == "gaussian":
        return sens * math.sqrt(releases) / gaussian_mu(epsilon, delta)
    if mechanism == "laplace":
        f = lambda b: laplace_epsilon(b, releases, delta) - epsilon  # noqa: E731
        hi = releases / epsilon  # pure composition meets it; RDP may allow less noise
        return sens * float(brentq(f, hi * 1e-3, hi, xtol=1e-12)) if f(hi * 1e-3) > 0 else sens * hi
    raise ValueError(f"unknown mechanism {mechanism!r}")
