"""Noise that keeps its promise under floating point: every release on one fixed lattice.

Adding float noise from a float sampler leaks: the set of floats a sampler can output for one
input is not the set it outputs for its neighbour (Mironov 2012, "On significance of the least
significant bits for differential privacy"). Measured on the previous Laplace filter (L1 clip
1, scale 20, stated epsilon 0.1): every release of 0 fell in the output set of 0, but only
18.3 % of the releases of 0.5 did, so epsilon was at least 1.70.

Here a release is `gamma * (k + round(N / gamma))`: k = round(x / gamma) is the clipped
activation snapped to the lattice gamma Z (gamma = clip * 2^-LATTICE_BITS), N the mechanism's
continuous noise drawn in float64. Because k is an integer, k + round(N / gamma) =
round((k gamma + N) / gamma): the release is the continuous mechanism's output on the snapped
input, rounded to the lattice, i.e. post-processing of it. So
- the epsilon of the continuous mechanism holds (the accountant's numbers are unchanged), with
  the snapped input's sensitivity; snapping may lengthen a vector by half a step per coordinate,
  so the clip is tightened by exactly that much first and the sensitivity stays 2 x clip;
- whatever the input, every release lies on the same lattice, and within the sampler's reach
  every lattice point is an output of every input: the set-of-outputs test that showed the
  leak cannot tell 0 from 0.5 any more (tests/test_lattice.py).
What floating point still leaves, and it is not small in every regime (a review of this
module, derived from numpy's sampler code; not yet measured):
- numpy's float64 samplers have a finite reach and, far in the tails, gaps: the Gaussian
  ziggurat reaches about 12 standard deviations; the Laplace inversion's 53-bit uniforms leave
  lattice points unreachable beyond about b ln(2^52 / (b / gamma)). Lattice points near the end
  of one input's reach are outputs of its neighbour and not of it. For the Gaussian that costs
  a delta of about P(N > 12 sigma - shift), large when one coordinate can move by a sizeable
  part of 12 sigma (sigma = 0.2 x clip: shift up to 10 sigma, delta near 0.01); for the
  Laplace, about dim (b / clip) 2^-33 per release (3.6e-6 at b = 20 x clip, dim 1568), which
  also breaks the pure-epsilon claim.
- the mass numpy gives each lattice cell is not exactly the continuous one's.
So this closes the measured set-of-outputs leak in the body of the distribution, not in its
tails: the accountant's epsilon is a continuous-mechanism number with an unaccounted delta.
The fix is an exact integer sampler (a discrete Gaussian or Laplace, CKS20 or OpenDP's), whose
reach is about 37 scales and whose accounting differs (zero-concentrated DP for the discrete
Gaussian, pure epsilon for the discrete Laplace); a vectorised CKS20 sampler took 30 to 60 ms
per 128 x 1568 batch here (with a test suite on the other core) against about 10 for this.
"""

from __future__ import annotations

import math

import numpy as np

LATTICE_BITS = 20  # the lattice step is clip * 2^-20


def step(clip: float) -> float:
    """The lattice step gamma for a clipping norm."""
    return clip * 2.0 ** -LATTICE_BITS


def slack(mechanism: str, clip: float, dim: int) -> float:
    """How much snapping can lengthen a `dim`-coordinate vector: half a step per coordinate,
    summed in L1 (Laplace) or in L2 (Gaussian)."""
    half = step(clip) / 2
    return half * dim if mechanism == "laplace" else half * math.sqrt(dim)


def noise(rng: np.random.Generator, mechanism: str, shape: tuple[int, ...], scale: float,
          clip: float) -> np.ndarray:
    """The continuous noise of a release of `shape` in lattice steps, rounded to integers (as
    float64, exact below 2^53): `scale` is the Gaussian standard deviation or the Laplace scale
    b, in the activations' units."""
    units = scale / step(clip)
    draw = rng.laplace(0.0, units, shape) if mechanism == "laplace" \
        else rng.standard_normal(shape) * units
    return np.rint(draw, out=draw)
