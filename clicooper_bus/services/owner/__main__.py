"""The owner process: `python -m clicooper_bus.services.owner --config FILE`.

The OpenMP policy is set here, at start, before anything imports torch: a synchronous owner
waits for every step's gradients, and passive waiting leaves the cores to the chain; pipelined
(`[run] in_flight` > 1), the head computes almost without pause, and OpenMP's own short spin
between operations beat passive waiting by about 4 % an epoch (tools/bench_bus.py).
"""

from __future__ import annotations

import sys

from clicooper_bus.services.common import (
    base_parser,
    configured_in_flight,
    load,
    openmp_policy,
    run_main,
    set_threads,
)


def main(argv: list[str] | None = None) -> int:
    p = base_parser("The owner process: holds the data, the labels and the head; drives the "
                    "run.")
    p.add_argument("--resume", action="store_true",
                   help="take up the run in the config's run directory again from its newest "
                        "round snapshot (`clicooper run --resume`, or an owner started again "
                        "after a crash), instead of starting a new one")
    args = p.parse_args(argv)
    openmp_policy(None if configured_in_flight(args.config) > 1 else "PASSIVE")

    def body(log) -> int:
        from clicooper_bus.services.owner.process import Owner  # imports torch

        cfg = load(args)
        set_threads(cfg.run.threads)
        return Owner(cfg, log, args.resume).run()

    return run_main("owner", body, argv)


if __name__ == "__main__":
    sys.exit(main())
