"""Noise that keeps its promise under floating point: every release on one fixed lattice, with
exact integer noise.

Adding float noise from a float sampler leaks: the set of floats a sampler can output for one
input is not the set it outputs for its neighbour (Mironov 2012, "On significance of the least
significant bits for differential privacy"). Measured on the first Laplace filter (L1 clip 1,
scale 20, stated epsilon 0.1): every release of 0 fell in the output set of 0, but only 18.3 %
of the releases of 0.5 did, so epsilon was at least 1.70.

The integer k + z below is the mechanism's output; the float32 value sent is that integer
times gamma, rounded once: exactly on the lattice when the clip is a power of two (gamma is
then one too), otherwise a fixed function of the integer, which is post-processing and leaves
epsilon as it is (a review found 20 % of releases exactly on gamma Z at clip 0.3).

Here a release is `gamma * (k + z)`: k = round(x / gamma) is the clipped activation snapped to
the lattice gamma Z (gamma = clip * 2^-LATTICE_BITS), z integer noise drawn exactly: the
discrete Gaussian N_Z(0, s^2) for `gaussian` (`discrete_gaussian`), the discrete Laplace of
scale t for `laplace` (`sampler`), with s or t the configured noise in lattice steps, rounded
up to an integer (`units`: never less noise than asked; the accountant uses this same
integer). So
- the mechanism is the discrete one exactly, on integers: no float touches the noise, every
  integer is a possible noise value for every input (no reach, no gaps in the tails), and the
  probabilities are the discrete distribution's, not a float sampler's approximation of them;
- the set-of-outputs test that showed the leak cannot tell 0 from 0.5: both give every lattice
  point (tests/test_lattice.py);
- the sensitivity is exact in lattice units: the clip is tightened by the snapping's worst
  case (half a step per coordinate, at most half the clip; a Laplace release is refused past
  MAX_LAPLACE_DIM coordinates, `check_dim`) and the snapped integers are then checked, in integer
  arithmetic, to lie within clip / gamma (`within_clip`), so two samples' snapped activations
  differ by at most 2 clip / gamma = 2^(LATTICE_BITS + 1) steps (L2 for Gaussian, L1 for
  Laplace).
What that guarantees (`accountant`): the discrete Gaussian is rho-zero-concentrated DP with
rho = (2 clip)^2 / (2 sigma^2) per release (Canonne, Kamath and Steinke 2020), composed
over releases and converted to (epsilon, delta) with no further delta: nothing is left
unaccounted. The discrete Laplace is pure (2 clip / b)-DP per release. Turning k + z into the
float32 sent is post-processing and costs nothing.
What remains is the generator: numpy's PCG64 seeded from the owner's PRF (so that the owner
can redraw any release, which `once` mode needs) is a pseudorandom generator, not a source of
true randomness; the guarantee is against an adversary who cannot predict it without the
secret, as for every keyed noise here. The cost is speed: about 3 times the float sampler's
time (a 128 x 1568 batch on an idle machine: Gaussian 7.8 ms against 2.5, Laplace 13 against
4.0; the whole filter, forward and backward, 12 ms; `once` 20 ms, its 128 generators' overhead;
`python -m clicooper_bus.ml.privacy.bench_sampler` prints them).
"""

from __future__ import annotations

import math

import numpy as np

from clicooper_bus.ml.privacy import discrete_gaussian, sampler

LATTICE_BITS = 20  # the lattice step is clip * 2^-20


def step(clip: float) -> float:
    """The lattice step gamma for a clipping norm."""
    return clip * 2.0 ** -LATTICE_BITS


MAX_LAPLACE_DIM = 2**LATTICE_BITS  # coordinates a Laplace release can carry (slack <= clip / 2)


def check_dim(mechanism: str, dim: int) -> None:
    """Refuse a Laplace release of more than MAX_LAPLACE_DIM coordinates per sample: its L1
    clip spread over them leaves an average coordinate under a quarter of a lattice step at
    2^21, so snapping rounds a dense activation to nothing (the release would carry only
    noise while the run trained on it). Raises ValueError naming the fix."""
    if mechanism == "laplace" and dim > MAX_LAPLACE_DIM:
        raise ValueError(f"a Laplace release of {dim} values per sample is over the "
                         f"{MAX_LAPLACE_DIM} the lattice carries (L1 clip / gamma = "
                         f"2^{LATTICE_BITS} steps in all): cut where the activations are "
                         f"smaller, or use mechanism = \"gaussian\" (L2)")


def slack(mechanism: str, clip: float, dim: int) -> float:
    """How much the clip is tightened before snapping a `dim`-coordinate vector: what snapping
    can lengthen it by (half a step per coordinate, summed in L1 for Laplace, in L2 for
    Gaussian), but never more than half the clip. In L1 the worst case reaches the clip itself
    at 2^21 coordinates, which would clip everything to nothing; past half the clip,
    `within_clip` alone keeps the snapped vector within (the sensitivity stays exact either
    way: the tightening only makes `within_clip` rarely act)."""
    half = step(clip) / 2
    worst = half * dim if mechanism == "laplace" else half * math.sqrt(dim)
    return min(worst, clip / 2)


def units(noise: float, clip: float) -> int:
    """The noise scale (Gaussian sigma or Laplace scale, in the activations' units) in whole
    lattice steps, as the sampler draws it: rounded up, at least 1 step."""
    if not noise > 0:
        raise ValueError(f"the noise must be positive, got {noise!r}")
    steps = max(1, math.ceil(noise / step(clip)))
    if steps > sampler.MAX_SCALE:
        top = sampler.MAX_SCALE * 2.0**-LATTICE_BITS
        raise ValueError(f"noise {noise:g} is {noise / clip:g} x clip, above the {top:g} x clip the "
                         f"exact sampler takes (its integers would overflow): ask for a larger "
                         f"epsilon or a smaller noise_multiplier")
    return steps


def sensitivity_units() -> int:
    """How far two samples' snapped activations can be apart, in lattice steps: 2 x clip."""
    return 2 ** (LATTICE_BITS + 1)


def within_clip(k: np.ndarray, mechanism: str) -> np.ndarray:
    """The snapped activations `k` (N x ..., integers as int64), each sample's norm checked in
    integer arithmetic against clip / gamma = 2^LATTICE_BITS steps (L1 for Laplace, squared L2
    for Gaussian) and any over it shrunk toward zero until it is not. The tightened clip keeps
    them within but for float32 rounding, so this almost never changes anything; it makes the
    sensitivity exact instead of nearly so."""
    if not k.size:
        return k
    flat = k.reshape(len(k), -1)
    limit = 2**LATTICE_BITS
    for _ in range(64):
        norms = np.abs(flat).sum(1) if mechanism == "laplace" else np.einsum("ij,ij->i", flat, flat)
        over = np.flatnonzero(norms > (limit if mechanism == "laplace" else limit**2))
        if not over.size:
            return k
        ratio = limit / (norms[over] if mechanism == "laplace" else np.sqrt(norms[over]))
        flat[over] = np.trunc(flat[over] * (ratio[:, None] * (1 - 2.0**-30))).astype(np.int64)
    raise AssertionError("snapped activations did not shrink within the clip")


def noise(rng: np.random.Generator, mechanism: str, shape: tuple[int, ...], scale: float,
          clip: float) -> np.ndarray:
    """Exact integer noise of `shape` in lattice steps (int64): discrete Laplace or discrete
    Gaussian of `scale` (the Laplace scale b or the Gaussian sigma, in the activations' units),
    rounded up to whole steps (`units`)."""
    draw = sampler.discrete_laplace if mechanism == "laplace" \
        else discrete_gaussian.discrete_gaussian
    return draw(rng, units(scale, clip), math.prod(shape)).reshape(shape)
