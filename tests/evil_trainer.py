"""A roster-listed trainer that misbehaves once it has joined: by default it sends the owner
forged metrics and unexpected outputs, and everyone a bogus checkpoint, then trains honestly;
with EVIL_MODE=swallow it silently loses one step's activations but keeps beating; with
EVIL_MODE=old it says hello as a trainer from before pipelining did (no schedule). Started by
tests/test_bus_faults.py in place of a real trainer."""

from __future__ import annotations

import os
import sys

import numpy as np

from clicooper_bus.services.common import openmp_policy

openmp_policy("PASSIVE")  # as the real entry point does, before torch is imported

from clicooper_bus.services.trainer import stage as real  # noqa: E402 (after the policy)
from clicooper_bus.services.trainer.__main__ import main  # noqa: E402


class EvilTrainer(real.Trainer):
    def _join(self) -> None:
        if os.environ.get("EVIL_MODE") == "old":
            send_doc = self.bus.send_doc

            def old_hello(kind, to, doc, **meta):
                if kind == "hello":
                    doc = {k: v for k, v in doc.items() if k != "in_flight"}
                return send_doc(kind, to, doc, **meta)

            self.bus.send_doc = old_hello
        super()._join()
        if os.environ.get("EVIL_MODE") == "swallow":  # lose step 5's activations, keep beating
            recv = self.bus.recv

            def lossy_recv(timeout_s):
                env = recv(timeout_s)
                if env is not None and env.header.kind == "fwd" and env.header.step == 5:
                    return None
                return env

            self.bus.recv = lossy_recv
            return
        bus, owner = self.bus, self.roster.owner.name
        bus.send_doc("metrics", owner, {"loss": "x", "correct": -1}, step=10**9)
        bus.send_doc("metrics", owner, {"loss": 0.0, "correct": 10**6}, step=0)
        bus.send_doc("checkpoint", "all", ["not", "a", "checkpoint"])
        bus.send_doc("checkpoint", "all", {"note": "forged\n", "final": True})
        for i in range(100):
            bus.send_array("eval_out", owner, np.zeros((4, 10), np.float32), step=i)
        self.log.info("evil messages sent")


if __name__ == "__main__":
    real.Trainer = EvilTrainer
    sys.exit(main())
