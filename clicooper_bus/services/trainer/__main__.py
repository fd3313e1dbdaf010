"""A trainer process: trains one stage of the split model for the owner.

    python -m clicooper_bus.services.trainer --config FILE --name trainer-1
    python -m clicooper_bus.services.trainer --name edge-7 --keys DIR --owner-key owner.pub \\
        --run-id demo --pub tcp://HOST:5555 --sub tcp://HOST:5556
        (DIR holds edge-7.key and the broker's broker.pub; `clicooper join` does all this
        from a join file, and is how an edge device is meant to start)

The OpenMP policy is set here, before anything imports torch: idle OpenMP threads would spin
and take cores from the run's other processes, so a trainer waits passively.
"""

from __future__ import annotations

import sys

import structlog

from clicooper_bus.config import load_config
from clicooper_bus.net.identity import load_public
from clicooper_bus.services.common import base_parser, openmp_policy, run_main, set_threads


def main(argv: list[str] | None = None) -> int:
    p = base_parser("A trainer process: trains one stage of the split model for the owner.")
    p.add_argument("--name", required=True, help="this trainer's key name")
    p.add_argument("--keys", help="key directory (NAME.key, owner's .pub)")
    p.add_argument("--owner-key", help="the owner's public key file")
    p.add_argument("--run-id")
    p.add_argument("--pub", help="broker address for publishing")
    p.add_argument("--sub", help="broker address for subscribing")
    args = p.parse_args(argv)
    openmp_policy("PASSIVE")

    def body(log) -> int:
        from clicooper_bus.services.trainer import stage  # imports torch

        over: dict = {"run": {}, "bus": {}, "participants": {}}
        if args.run_id:
            over["run"]["id"] = args.run_id
        if args.pub:
            over["bus"]["pub"] = args.pub
        if args.sub:
            over["bus"]["sub"] = args.sub
        if args.keys:
            over["participants"]["keys"] = args.keys
        cfg = load_config(args.config, over)
        structlog.contextvars.bind_contextvars(run_id=cfg.run.id, stage=args.name)
        set_threads(cfg.run.trainer_threads)
        owner_key = load_public(args.owner_key) if args.owner_key else None
        return stage.Trainer(cfg, args.name, log, owner_key).run()

    return run_main("trainer", body, argv)


if __name__ == "__main__":
    sys.exit(main())
