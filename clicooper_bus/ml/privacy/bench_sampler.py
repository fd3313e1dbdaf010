"""Benchmark: what the exact integer noise costs per release batch, at the release shapes of the
small CNN's two cuts (128 x 1568 after conv2 and its pool, 128 x 16 x 14 x 14 after conv1 and
its pool), against the float sampler it replaced (numpy's float64 Gaussian or Laplace, rounded
to the lattice), interleaved. Prints the median and the range over repeats, wall clock and the
process's CPU time (on a shared machine the CPU time is the steadier of the two).

    python -m clicooper_bus.ml.privacy.bench_sampler [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from clicooper_bus.ml.privacy import lattice
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec

SHAPES = {"128 x 1568": (128, 1568), "128 x 16 x 14 x 14": (128, 16, 14, 14)}
NOISE = {"gaussian": 0.3, "laplace": 0.01}  # x clip 1: bench_privacy's levels


def _float_noise(mechanism: str, shape: tuple[int, ...], noise: float) -> Callable[[], object]:
    """The replaced float sampler: continuous noise in lattice steps, rounded."""
    rng = np.random.default_rng(0)
    units = noise / lattice.step(1.0)

    def draw() -> object:
        z = rng.laplace(0.0, units, shape) if mechanism == "laplace" \
            else rng.standard_normal(shape) * units
        return np.rint(z, out=z)

    return draw


def _exact_noise(mechanism: str, shape: tuple[int, ...], noise: float,
                 mode: str) -> Callable[[], object]:
    f = ActivationFilter(FilterSpec(mechanism, 1.0, noise, mode), bytes(32))
    ids = np.arange(shape[0])
    step = iter(range(10**9))
    return lambda: f.noise(shape, ids=ids if mode == "once" else None, split="train",
                           step=next(step))


def timed(draws: dict[str, Callable[[], object]],
          repeats: int) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and CPU seconds of `repeats` calls of each draw, after one warm-up call each,
    interleaved and the order rotated every repeat so that all see the same machine."""
    for draw in draws.values():
        draw()
    names = list(draws)
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            w, c = time.perf_counter(), time.process_time()
            draws[name]()
            out[name][0].append(time.perf_counter() - w)
            out[name][1].append(time.process_time() - c)
    return out


def _ms(ts: list[float]) -> str:
    return f"{statistics.median(ts) * 1e3:7.1f} ms ({min(ts) * 1e3:.1f} to {max(ts) * 1e3:.1f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"noise per release batch, median of {args.repeats} (min to max); clip 1, gaussian "
          f"sigma {NOISE['gaussian']}, laplace b {NOISE['laplace']}")
    print(f"  {'shape':20s} {'mechanism':9s} {'sampler':18s} {'wall':32s} cpu")
    for label, shape in SHAPES.items():
        for mech, noise in NOISE.items():
            runs = {"float (replaced)": _float_noise(mech, shape, noise),
                    "exact per-step": _exact_noise(mech, shape, noise, "per-step"),
                    "exact once": _exact_noise(mech, shape, noise, "once")}
            for name, (wall, cpu) in timed(runs, args.repeats).items():
                print(f"  {label:20s} {mech:9s} {name:18s} {_ms(wall):32s} {_ms(cpu)}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
