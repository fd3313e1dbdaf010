"""Exact integer noise: the building blocks and the discrete Laplace on the integers, drawn with
integer arithmetic only from a seeded `np.random.Generator` (the discrete Gaussian, built on
them, is `discrete_gaussian`).

The algorithms are Canonne, Kamath and Steinke 2020, "The Discrete Gaussian for Differential
Privacy" (CKS20), vectorised: arrays are worked on in rounds, each round drawing only for the
elements still undecided, and rejection sampling keeps the accepted candidates in order.
- Algorithm 1, Bernoulli(exp(-n/d)) for 0 <= n <= d: K = the first k >= 1 at which a
  Bernoulli(n / (d k)) fails; the answer is `K is odd`.
- V = floor(E) for E exponential (P[V >= v] = e^-v: CKS20's count of Bernoulli(exp(-1))
  successes before a failure): one uniform 63-bit integer against the exact integer
  thresholds floor(2^63 e^-v) (`geometric_exp`), more bits only on a tie. Bernoulli(exp(-q))
  for an integer q is V >= q.
- Algorithm 2, the discrete Laplace with scale t (P[y] proportional to exp(-|y| / t)):
  U uniform on {0..t-1} kept with probability exp(-U / t), X = U + t V, a fair sign, -0
  rejected.
- `lazy_bernoulli`: Bernoulli(p) for a p known through ever tighter rational bounds, the
  uniform drawn 64 bits at a time until it falls on one side (ties with thresholds, tails).

Exact means: if the generator's bits are uniform, each output has exactly its target
probability. No float takes part in a decision: each compares a uniform integer (from
`Generator.integers`, uniform by rejection, not by rounding a float, or raw 64-bit words) with
an integer; a tie with a threshold is settled with more random bits against exp computed by
`decimal` (correctly rounded) with its error bound. So every integer is a possible output, with
no reach and no gaps in the tails, and the privacy is the discrete mechanism's exactly. The one
limit is int64 itself: a draw past 2^63 / scale (about 2^35 scales out, probability below
e^(-2^35)) does not fit.

The randomness is the generator's: with a PRF-keyed seed (the filter's `_rng`), the owner can
redraw any release from its secret, which `once` mode needs (a sample's noise is a function of
its id). OpenDP 0.16's samplers are exact too, but they draw from the operating system and
cannot be seeded, and took 5.4 s for a 128 x 1568 batch from Python lists (measured here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import MIN_EMIN, ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, localcontext
from fractions import Fraction

import numpy as np

MAX_SCALE = 2**28  # the largest scale or sigma, in lattice steps: products stay within int64
_INT64 = 2**63


def _exp_floors(count: int) -> np.ndarray:
    """floor(2^63 e^-v) for v = 0 .. count (v = 0 gives 2^63), as uint64. Python's decimal exp
    is correctly rounded, and at 40 digits no value is within 1e-15 of an integer (checked),
    so every floor is exact."""
    with localcontext() as ctx:
        ctx.prec = 40
        exact = [Decimal(-v).exp() * 2**63 for v in range(count + 1)]
    floors = [int(x) for x in exact]
    if not all(Decimal(f) + Decimal("1e-15") < x < Decimal(f + 1) - Decimal("1e-15")
               for f, x in zip(floors[1:], exact[1:], strict=True)):
        raise RuntimeError("a threshold of the exact geometric sampler is too close to call")
    return np.array(floors, dtype=np.uint64)


_EXP_FLOORS = _exp_floors(44)  # floor(2^63 e^-44) = 0: the last threshold a 63-bit draw meets


def _compare_exp(x: Fraction, v: int, digits: int) -> int:
    """The sign of x - e^-v, or 0 when `digits` significant digits cannot tell."""
    with localcontext() as ctx:
        ctx.prec = digits
        d = Decimal(-v).exp()  # correctly rounded: within one unit of its last digit
        ulp = Fraction(Decimal(1).scaleb(d.adjusted() - digits + 1))
    if x <= Fraction(d) - ulp:
        return -1
    return 1 if x >= Fraction(d) + ulp else 0


def exp_bounds(x: Fraction, digits: int) -> tuple[Fraction, Fraction]:
    """Rationals lo <= e^-x <= hi, about `digits` significant digits apart: x rounded down and
    up, then decimal's exp (correctly rounded, so within half a unit of its last digit) widened
    by a unit. e^-0 is 1 exactly."""
    if x == 0:
        return Fraction(1), Fraction(1)
    with localcontext() as ctx:
        ctx.prec, ctx.Emin = digits, MIN_EMIN  # no underflow: e^-x keeps its digits, however small
        ctx.rounding = ROUND_FLOOR
        x_lo = Decimal(x.numerator) / Decimal(x.denominator)
        ctx.rounding = ROUND_CEILING
        x_hi = Decimal(x.numerator) / Decimal(x.denominator)
        ctx.rounding = ROUND_HALF_EVEN
        e_lo, e_hi = (-x_hi).exp(), (-x_lo).exp()
    ulp = Fraction(10) ** (e_hi.adjusted() - digits + 1)
    return Fraction(e_lo) - ulp, Fraction(e_hi) + ulp


def lazy_bernoulli(rng: np.random.Generator, bounds: Callable[[int], tuple[Fraction, Fraction]],
                   prefix: int = 0, bits: int = 0) -> bool:
    """Bernoulli(p) exactly, for p known only through `bounds(digits)` -> (lo, hi), lo <= p <= hi,
    tightening as digits grow: X uniform on [prefix, prefix + 1) / 2^bits (its first `bits`
    bits already drawn) is compared with p, drawing 64 more bits of X and asking for more digits
    until X's interval lies on one side. For the rare draws that tie with a precomputed
    threshold, and for the tail of the discrete Gaussian."""
    while True:
        lo, hi = bounds(max(40, bits // 3 + 20))
        if Fraction(prefix + 1, 1 << bits) <= lo:
            return True
        if Fraction(prefix, 1 << bits) >= hi:
            return False
        prefix = (prefix << 64) | int(rng.bit_generator.random_raw())
        bits += 64


def _floor_neg_log(rng: np.random.Generator, prefix: int, bits: int) -> int:
    """floor(-ln X) for X uniform on [prefix, prefix + 1) / 2^bits, exactly: 64 more random
    bits at a time until X's interval lies within one [e^-(v+1), e^-v). Only for the draws that
    tie with a threshold of `_EXP_FLOORS` (probability about 2^-57 each)."""
    while True:
        prefix = (prefix << 64) | int(rng.bit_generator.random_raw())
        bits += 64
        lo, hi = Fraction(prefix, 1 << bits), Fraction(prefix + 1, 1 << bits)
        digits = bits // 3 + 20
        guess = int(bits * math.log(2) - math.log(prefix + 1))  # a guess, checked exactly
        for v in range(max(0, guess - 1), guess + 2):
            below_top = v == 0 or _compare_exp(hi, v, digits) < 0  # hi <= e^-v
            if below_top and _compare_exp(lo, v + 1, digits) > 0:  # lo > e^-(v+1)
                return v


def _bernoulli_ratio(rng: np.random.Generator, num: np.ndarray, den: int, k: int) -> np.ndarray:
    """Bernoulli(num / (den k)) for each element of `num` (0 <= num <= den): a uniform integer
    below den k compared with num; split in two independent draws when den k exceeds int64."""
    if den * k < _INT64:
        return rng.integers(0, den * k, num.size) < num
    return (rng.integers(0, den, num.size) < num) & (rng.integers(0, k, num.size) == 0)


def bernoulli_exp_frac(rng: np.random.Generator, num: np.ndarray, den: int) -> np.ndarray:
    """Bernoulli(exp(-num / den)) for each element (CKS20 Algorithm 1); 0 <= num <= den,
    den < 2^63. Returns a boolean array of num's length."""
    go_on = _bernoulli_ratio(rng, num, den, 1)
    out = ~go_on  # stopped at K = 1, odd: success
    idx = np.flatnonzero(go_on)
    k = 2
    while idx.size:  # the survivors of round k - 1, a fraction (num / den)^(k-1) / (k-1)!
        go_on = _bernoulli_ratio(rng, num[idx], den, k)
        if k % 2:
            out[idx[~go_on]] = True
        idx = idx[go_on]
        k += 1
    return out


def geometric_exp(rng: np.random.Generator, n: int) -> np.ndarray:
    """n draws of V = floor(E), E exponential of mean 1: P[V >= v] = e^-v (the number of
    Bernoulli(exp(-1)) successes before the first failure, CKS20's V). int64.

    V >= v exactly when a uniform X < e^-v. X's first 63 bits u decide it against the exact
    thresholds floor(2^63 e^-v): u < floor(.) means X < e^-v, u > floor(.) means X > e^-v;
    only u equal to a threshold needs more of X's bits (`_floor_neg_log`). One draw per
    element instead of about 4.3 of Algorithm 1's."""
    u = rng.bit_generator.random_raw(n) >> np.uint64(1)
    v = (u < _EXP_FLOORS[1]).astype(np.int64)
    idx = np.flatnonzero(v)
    w = u[idx]
    for floor in _EXP_FLOORS[2:]:
        keep = w < floor
        idx, w = idx[keep], w[keep]
        if not idx.size:
            break
        v[idx] += 1
    for i in np.flatnonzero(u == _EXP_FLOORS[v + 1]):  # a tie: X's next bits decide
        v[i] = _floor_neg_log(rng, int(u[i]), 63)
    return v


def bernoulli_exp_int(rng: np.random.Generator, q: np.ndarray) -> np.ndarray:
    """Bernoulli(exp(-q)) for each non-negative integer of `q`: V >= q, P = e^-q."""
    out = q == 0
    idx = np.flatnonzero(~out)
    out[idx] = geometric_exp(rng, idx.size) >= q[idx]
    return out


def check_scale(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_SCALE:
        raise ValueError(f"the {name} must be an integer number of lattice steps in "
                         f"[1, {MAX_SCALE}], got {value!r}: raise the clip or lower the noise")


CHUNK = 2**15  # candidates per round: a round's arrays stay in cache (twice as fast as 2^18)


def rejection(n: int, rate: float, draw: Callable[[int], np.ndarray]) -> np.ndarray:
    """The first n accepted draws: `draw(m)` returns the accepted among m candidates, in
    order; `rate` (about the acceptance rate) only sizes the rounds, of at most CHUNK."""
    parts, need = [], n
    while need > 0:
        got = draw(min(int(need / rate) + 16, CHUNK))[:need]
        parts.append(got)
        need -= got.size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def discrete_laplace(rng: np.random.Generator, scale: int, n: int) -> np.ndarray:
    """n draws of the discrete Laplace with integer `scale` t: P[y] = (1 - e^(-1/t)) /
    (1 + e^(-1/t)) exp(-|y| / t) for every integer y (CKS20 Algorithm 2). int64."""
    check_scale("discrete Laplace scale", scale)
    t = int(scale)

    def draw(m: int) -> np.ndarray:
        u = rng.integers(0, t, m)
        u = u[bernoulli_exp_frac(rng, u, t)]  # U with P proportional to e^(-U/t)
        x = u + t * geometric_exp(rng, u.size)
        negative = rng.integers(0, 2, u.size, dtype=np.uint8) == 1
        y = np.where(negative, -x, x)
        return y[~(negative & (x == 0))]  # -0 would count 0 twice

    return rejection(n, 0.62, draw)  # 1 - 1/e of the candidates are kept
