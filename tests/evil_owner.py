"""An owner that equivocates: with EVIL_MODE=equivocate:STEP it signs two `fwd` messages of
STEP at one seq, zeros addressed to the last trainer first (which the notary logs and that
trainer drops: the owner is not its predecessor) and the real one to the first trainer; with
EVIL_MODE=deaf:STEP it does the same and then ignores the notary's proof, as an owner that
means it would, and trains on. Started by tests/test_equivocation.py in place of the owner."""

from __future__ import annotations

import os
import sys

import numpy as np

from clicooper_bus.services.common import openmp_policy

openmp_policy("PASSIVE")  # as the real entry point does (a synchronous owner), before torch

from clicooper_bus.services.owner import process as real  # noqa: E402 (after the policy)
from clicooper_bus.services.owner.__main__ import main  # noqa: E402


class EvilOwner(real.Owner):
    def _join(self) -> None:
        how, step = os.environ["EVIL_MODE"].split(":")
        send_array, sender = self.bus.send_array, self.bus.sender

        def equivocating(k, to, array, **meta):
            if k == "fwd" and meta.get("step") == int(step) and to == self.stages[0]:
                seq, prev = sender.seq, sender.prev
                send_array(k, self.stages[-1], np.zeros_like(np.asarray(array)), **meta)
                sender.seq, sender.prev = seq, prev
                self.log.info("equivocated", kind=k, step=int(step))
            return send_array(k, to, array, **meta)

        self.bus.send_array = equivocating
        super()._join()

    def _on_equivocation(self, env) -> None:
        if os.environ["EVIL_MODE"].startswith("deaf:"):
            self.log.info("proof ignored")
            return
        super()._on_equivocation(env)


if __name__ == "__main__":
    real.Owner = EvilOwner
    sys.exit(main())
