"""A roster-listed trainer that misbehaves once it has joined: by default it sends the owner
forged metrics and unexpected outputs, and everyone a bogus checkpoint, then trains honestly;
with EVIL_MODE=swallow it silently loses one step's activations but keeps beating; with
EVIL_MODE=old it says hello as a trainer from before pipelining did (no schedule); with
EVIL_MODE=poison:KIND:STEP:HOW it trains honestly but poisons the KIND tensor it sends at STEP
(HOW: nan, inf, float64, shape (one row short), int8, huge: finite 1e38 everywhere); with
EVIL_MODE=equivocate:KIND:STEP it signs two KIND messages of STEP at one seq, zeros to the owner
first (the log's) and the real one to its receiver; with EVIL_MODE=fork:KIND:STEP its KIND of
STEP follows a message it never sent (a `prev` of its own making); with
EVIL_MODE=cheat:HOW:STEP it computes wrongly from STEP on (HOW: flip, noise, eval, skip, metrics;
  `_cheat`).
Started by
tests/test_bus_faults.py, tests/test_poison.py and tests/test_equivocation.py in place of a
real trainer."""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from clicooper_bus.services.common import openmp_policy

openmp_policy("PASSIVE")  # as the real entry point does, before torch is imported

import torch  # noqa: E402 (after the policy)

from clicooper_bus.services.trainer import stage as real  # noqa: E402
from clicooper_bus.services.trainer.__main__ import main  # noqa: E402


def poisoned(array, how: str) -> np.ndarray:
    """`array` (a tensor or an array) made poisonous: NaN or infinity in its first value, or
    of another dtype or shape."""
    a = np.array(array.detach().numpy() if hasattr(array, "detach") else array)
    if how in ("nan", "inf"):
        a.reshape(-1)[0] = np.nan if how == "nan" else np.inf
        return a
    if how == "shape":
        return a[:-1]
    if how == "none":
        return a
    if how == "huge":  # finite, and as large as float32 goes: passes the receive check
        return np.full(a.shape, 1e38, a.dtype)
    return a.astype({"float64": np.float64, "int8": np.int8}[how])


class EvilTrainer(real.Trainer):
    def _equivocate(self, how: str, kind: str, step: int) -> None:
        send_array, sender = self.bus.send_array, self.bus.sender

        def equivocating(k, to, array, **meta):
            if k == kind and meta.get("step") == step:
                if how == "equivocate":  # the same seq twice: the first reaches the log
                    seq, prev = sender.seq, sender.prev
                    send_array(k, self.roster.owner.name, np.zeros_like(poisoned(array, "none")),
                               **meta)
                    sender.seq, sender.prev = seq, prev
                else:  # fork: follow a message never sent
                    sender.prev = hashlib.sha256(b"another message").digest()
                self.log.info("equivocated", how=how, kind=k, step=step)
            return send_array(k, to, array, **meta)

        self.bus.send_array = equivocating

    def _cheat(self, how: str, step: int) -> None:
        """Issue 19: from training step `step` on, `flip` the sign of every gradient sent
        back, add `noise` (standard deviation 1e-3) to every activation sent on, perturb every
        evaluation output the same way (`eval`, whatever `step`), `skip` the optimiser step,
        or report `metrics` of a perfect batch; the messages are signed and logged as any
        other."""
        if how in ("flip", "noise", "eval"):
            send_array = self.bus.send_array
            gen = torch.Generator().manual_seed(step)

            def altering(k, to, array, **meta):
                if how == "flip" and k == "bwd" and meta.get("step", -1) >= step:
                    array = -array
                elif (how == "noise" and k == "fwd" and meta.get("step", -1) >= step) or \
                        (how == "eval" and k in ("eval_fwd", "eval_out")):
                    array = array + 1e-3 * torch.randn(array.shape, generator=gen)
                return send_array(k, to, array, **meta)

            self.bus.send_array = altering
        elif how == "skip":
            update = self.seg.update

            def skipping():
                if self.trained < step:
                    update()
                else:
                    self.seg.optimizer.zero_grad(set_to_none=True)

            self.seg.update = skipping
        else:
            send_doc = self.bus.send_doc

            def boasting(kind, to, doc, **meta):
                if kind == "metrics" and meta.get("step", -1) >= step:
                    doc = {**doc, "loss": 0.0, "correct": self.plan.batch_size}
                return send_doc(kind, to, doc, **meta)

            self.bus.send_doc = boasting
        self.log.info("cheating", how=how, step=step)

    def _join(self) -> None:
        mode = os.environ.get("EVIL_MODE", "")
        if mode.startswith("cheat:"):
            super()._join()
            _, how, step = mode.split(":")
            self._cheat(how, int(step))
            return
        if mode.startswith(("equivocate:", "fork:")):
            how, kind, step = mode.split(":")
            self._equivocate(how, kind, int(step))
            super()._join()
            return
        if mode.startswith("poison:"):
            _, kind, step, how = mode.split(":")
            send_array = self.bus.send_array

            def poisoning(k, to, array, **meta):
                if k == kind and meta.get("step") == int(step):
                    array = poisoned(array, how)
                    self.log.info("poison sent", kind=k, step=meta.get("step"), how=how)
                return send_array(k, to, array, **meta)

            self.bus.send_array = poisoning
            super()._join()
            return
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
