"""The broker process: the run's one well-known address. Holds nothing secret; forwards topics.

    python -m clicooper_bus.services.broker --config FILE        (addresses from [bus])
    python -m clicooper_bus.services.broker --pub tcp://0.0.0.0:5555 --sub tcp://0.0.0.0:5556
"""

from __future__ import annotations

import resource
import sys
import threading

from clicooper_bus.net.admission import Admission
from clicooper_bus.net.forwarder import Forwarder
from clicooper_bus.net.wire import Limits
from clicooper_bus.services.common import (
    EXIT_OK,
    Terminated,
    base_parser,
    identity,
    load,
    members,
    run_main,
)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--pub", help="address publishers connect to (default: config [bus] pub)")
    p.add_argument("--sub", help="address subscribers connect to (default: config [bus] sub)")
    p.add_argument("--witness", help="address the notary subscribes at (default: config [bus] "
                                     "witness)")
    args = p.parse_args(argv)

    def body(log) -> int:
        cfg = load(args)
        curve = cfg.bus.security == "curve"
        admission = Admission.of(cfg.run.id, members(cfg), limits=Limits()) if curve else None
        fwd = Forwarder(args.pub or cfg.bus.pub, args.sub or cfg.bus.sub,
                        witness_addr=args.witness or cfg.bus.witness or None,
                        identity=identity(cfg, cfg.participants.broker) if curve else None,
                        admission=admission, hwm=cfg.bus.hwm, stall_s=cfg.bus.stall_s).start()
        log.info("broker listening", pub=fwd.pub_addr, sub=fwd.sub_addr, witness=fwd.witness_addr,
                 security=cfg.bus.security,
                 members=sorted(admission.members) if admission else None)
        print(f"broker: publishers connect to {fwd.pub_addr}, subscribers to {fwd.sub_addr}",
              flush=True)
        try:
            threading.Event().wait()  # until SIGTERM / SIGINT
        except Terminated:
            log.info("broker stopping")
        finally:
            usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the broker
            log.info("broker stopped", cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
                     **fwd.stats())
            fwd.close()
        return EXIT_OK

    return run_main("broker", body, argv)


if __name__ == "__main__":
    sys.exit(main())
