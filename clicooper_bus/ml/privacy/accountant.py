"""Exact privacy accounting for the owner's activation releases, for the samplers the filter
uses: the discrete Gaussian and the discrete Laplace on the lattice (`lattice`,
`discrete_gaussian`, `sampler`).

Sensitivity in lattice units: two samples' snapped activations differ by at most
D = 2 clip / gamma steps (L2 for Gaussian, L1 for Laplace; replace-one adjacency), and the noise
is the configured one in whole steps, rounded up (`lattice.units`): the accountant computes
with the very integer the sampler draws with.

Discrete Gaussian N_Z(0, s^2) per coordinate: each release is rho-zero-concentrated DP with
rho = D^2 / (2 s^2) (Canonne, Kamath and Steinke 2020, "The Discrete Gaussian for Differential
Privacy", CKS20: the same rho as the continuous Gaussian's), k releases of one sample compose
to k rho (Bun and Steinke 2016), and rho-zCDP is (eps, delta)-DP for

    eps = inf over alpha > 1 of  alpha rho + (ln(1 / delta) + (alpha - 1) ln(1 - 1 / alpha)
                                               - ln(alpha)) / (alpha - 1)

(CKS20; Balle et al. 2020, arXiv 1905.09982, Theorem 21, the conversion opacus applies to RDP
curves; here optimised over a continuous alpha). Every noise > 0 gives a finite epsilon.
opacus's RDP bound for the continuous Gaussian with the same s, on its grid of orders, is
reported beside it as a cross-check: the RDP curve alpha rho is the same, so it is never
smaller.

Discrete Laplace of scale t: each release is pure (D / t)-DP (the ratio of probabilities at
any output is at most e^(|shift|_1 / t)); k releases compose to k D / t, or, through zCDP
(pure eps-DP is eps^2 / 2-zCDP, Bun and Steinke 2016) converted as above, to less for large
k; the smaller is reported.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from clicooper_bus.ml.privacy import lattice

ORDERS = [1.0 + x / 20.0 for x in range(1, 100)] + [float(a) for a in range(6, 257)]


def zcdp_epsilon_at(rho: float, delta: float, alpha: float) -> float:
    """The epsilon that rho-zCDP gives at delta through Renyi order alpha > 1 (CKS20):
    a valid bound for every alpha; `zcdp_epsilon` takes the best."""
    h = alpha - 1.0
    return alpha * rho + (math.log(1 / delta) + h * math.log1p(-1 / alpha) - math.log(alpha)) / h


def zcdp_epsilon(rho: float, delta: float) -> float:
    """The smallest epsilon that rho-zCDP gives at delta (0 without privacy loss, inf for
    rho = inf). The order is searched over alpha - 1 from 1e-12 to 1e12 on a log grid, then
    refined; any order gives a valid bound, so the search can only cost tightness."""
    _check_delta(delta)
    if rho <= 0:
        return 0.0
    if not math.isfinite(rho):
        return math.inf
    f = lambda x: zcdp_epsilon_at(rho, delta, 1.0 + math.exp(x))  # noqa: E731
    grid = np.linspace(-27.6, 27.6, 241)  # ln(1e-12) .. ln(1e12)
    i = int(np.argmin([f(x) for x in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    from scipy.optimize import minimize_scalar  # here: 0.45 s of every owner's start-up

    best = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    return max(0.0, min(float(best.fun), f(grid[i])))


def zcdp_rho(epsilon: float, delta: float) -> float:
    """The largest rho whose zCDP converts to at most `epsilon` at delta."""
    _check_delta(delta)
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    hi = epsilon
    while zcdp_epsilon(hi, delta) < epsilon:
        hi *= 2.0
    lo = hi / 2.0
    while zcdp_epsilon(lo, delta) > epsilon:
        lo /= 2.0
    from scipy.optimize import brentq

    return float(brentq(lambda r: zcdp_epsilon(r, delta) - epsilon, lo, hi, xtol=1e-15,
                        rtol=1e-12))


def discrete_gaussian_rho(noise: float, clip: float, releases: int) -> float:
    """rho of `releases` discrete Gaussian releases of one sample (lattice units)."""
    return releases * lattice.sensitivity_units() ** 2 / (2.0 * lattice.units(noise, clip) ** 2)


def discrete_laplace_epsilon(noise: float, clip: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` discrete Laplace releases of one sample: the smaller of pure
    composition and zCDP (pure eps0-DP is eps0^2 / 2-zCDP) converted at delta (pure only for
    delta <= 0)."""
    eps0 = lattice.sensitivity_units() / lattice.units(noise, clip)
    pure = releases * eps0
    return pure if delta <= 0 else min(pure, zcdp_epsilon(releases * eps0 * eps0 / 2, delta))


def rdp_gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """opacus's RDP bound for `releases` full-batch (q = 1) Gaussian releases with noise
    multiplier s / D."""
    from opacus.accountants.analysis import rdp

    r = rdp.compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=releases, orders=ORDERS)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a bound still
        warnings.simplefilter("ignore")
        eps, _ = rdp.get_privacy_spent(orders=ORDERS, rdp=r, delta=delta)
    return float(eps)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@dataclass(frozen=True)
class Spent:
    """The privacy a run spent, with everything it holds for: what goes in summary.json and
    the audit report."""

    mechanism: str  # gaussian or laplace (their discrete versions on the lattice)
    epsilon: float  # the zCDP conversion (Gaussian) or best bound (Laplace), per training sample
    delta: float
    releases: int  # releases of each training sample's activation
    noise: float  # the sigma (Gaussian) or scale b (Laplace) drawn, per coordinate: whole steps
    clip: float  # per-sample L2 (Gaussian) or L1 (Laplace) clipping norm
    sensitivity: float  # of one release under the stated adjacency
    method: str
    rdp_epsilon: float | None = None  # opacus's RDP bound, a looser cross-check
    adjacency: str = ("replace-one: two datasets differing in one training sample's image; "
                      "each release is that one sample's activation, so the sensitivity is the "
                      "clipped norm's diameter, 2 x clip. Labels are treated as public: they "
                      "travel as (pseudo-)labels or shape the owner tail's gradients, unnoised")
    rho: float | None = None  # zCDP of all the releases (Gaussian)
    lattice_noise: int | None = None  # `noise` in lattice steps (clip x 2^-20), as drawn

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in d.items()}


_GAUSSIAN = ("discrete Gaussian on the lattice clip x 2^-20 (exact integer sampler, Canonne, "
             "Kamath and Steinke 2020): rho-zCDP with rho = releases x (2 clip)^2 / "
             "(2 sigma^2), converted to (epsilon, delta) as they do (the best Renyi order)")
_LAPLACE = ("discrete Laplace on the lattice clip x 2^-20 (exact integer sampler, Canonne, "
            "Kamath and Steinke 2020): pure 2 clip / b per release; the smaller of pure "
            "composition and zCDP (eps^2 / 2 per release) converted at delta")


def spent(mechanism: str, noise: float, clip: float, releases: int, delta: float) -> Spent:
    """What `releases` releases of each sample with this noise spend; noise 0 (none) spends
    an infinite epsilon, every noise > 0 a finite one."""
    sens = 2.0 * clip
    if mechanism not in ("gaussian", "laplace"):
        raise ValueError(f"unknown mechanism {mechanism!r}")
    if not noise > 0:
        return Spent(mechanism, math.inf, delta, releases, 0.0, clip, sens,
                     "no noise: not differentially private", math.inf if mechanism == "gaussian"
                     else None, rho=math.inf if mechanism == "gaussian" else None)
    steps = lattice.units(noise, clip)
    drawn = steps * lattice.step(clip)
    if mechanism == "gaussian":
        rho = discrete_gaussian_rho(noise, clip, releases)
        return Spent("gaussian", zcdp_epsilon(rho, delta), delta, releases, drawn, clip, sens,
                     _GAUSSIAN, rdp_gaussian_epsilon(drawn / sens, releases, delta), rho=rho,
                     lattice_noise=steps)
    return Spent("laplace", discrete_laplace_epsilon(noise, clip, releases, delta), delta,
                 releases, drawn, clip, sens, _LAPLACE, lattice_noise=steps)


def calibrate(mechanism: str, epsilon: float, delta: float, clip: float, releases: int) -> float:
    """The noise (Gaussian sigma or Laplace scale) that spends `epsilon` over `releases`
    releases of each sample. The sampler rounds it up to whole lattice steps, so what a run
    spends is at most `epsilon` (below it by about one part in a million)."""
    sens = 2.0 * clip
    if mechanism == "gaussian":
        return sens / math.sqrt(2.0 * zcdp_rho(epsilon, delta) / releases)
    if mechanism == "laplace":
        pure = releases * sens / epsilon
        if delta <= 0:
            return pure
        return min(pure, sens / math.sqrt(2.0 * zcdp_rho(epsilon, delta) / releases))
    raise ValueError(f"unknown mechanism {mechanism!r}")
