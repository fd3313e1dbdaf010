"""The training plan the owner publishes inside its signed roster, so that a trainer needs no
config file of its own: the model (its name and its fully resolved layer list: every layer's
op and parameters, input channels included), input shape, classes, cuts, seed, learning rate,
how many training batches may be in flight, and with the privacy defences the number of
(pseudo-)outputs and where the owner's tail starts. Being signed, it is also the evidence of how
the run was trained.

Trainers build their stage from the plan's layers alone (`clicooper_bus.ml.models.plan_spec`;
nothing is looked up by name, no owner code runs) and check the spec's digest against the
roster's, so the owner cannot be misunderstood and a trainer cannot silently train something
else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from clicooper_bus.errors import RosterError


@dataclass(frozen=True)
class Plan:
    model: str
    input_shape: tuple[int, int, int]
    classes: int
    cuts: tuple[int, ...]
    seed: int
    lr: float
    batch_size: int
    outputs: int = 0  # the model's output units: classes x label_gamma (0: classes)
    tail: int = 0  # first layer of the owner's tail (owner_tail), 0: the last stage has the loss
    in_flight: int = 1  # training batches the owner keeps in flight ([run] in_flight)
    # the resolved layers (`ml.models.resolve_spec`: JSON tables, every parameter explicit);
    # empty only in plans from before specs were data, which name a built-in model
    layers: tuple[dict[str, Any], ...] = ()

    @property
    def n_outputs(self) -> int:
        return self.outputs or self.classes

    @property
    def segment_cuts(self) -> tuple[int, ...]:
        """Cuts of every segment after the head: the trainers' stages, then the owner's tail."""
        return (*self.cuts, self.tail) if self.tail else self.cuts

    def to_meta(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_meta(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
            plan = cls(str(d["model"]), tuple(int(v) for v in d["input_shape"]),
                       int(d["classes"]), tuple(int(c) for c in d["cuts"]), int(d["seed"]),
                       float(d["lr"]), int(d["batch_size"]), int(d.get("outputs", 0)),
                       int(d.get("tail", 0)), int(d.get("in_flight", 1)),
                       tuple(d.get("layers", ())))
            if not all(isinstance(layer, dict) for layer in plan.layers):
                raise ValueError("its layers must be tables")
            return plan
        except (ValueError, KeyError, TypeError) as exc:
            raise RosterError(f"roster plan is malformed: {exc}") from None


def schedule(in_flight: int, head_fixed: bool = False) -> str:
    """How a run was trained, in words (the owner's summary and the audit report)."""
    if in_flight <= 1:
        return "synchronous (one batch in flight)"
    if head_fixed:
        return (f"pipelined ({in_flight} batches in flight; the head is fixed, so the weights "
                f"are those of a synchronous run)")
    return (f"pipelined ({in_flight} batches in flight: the head's gradients arrive up to "
            f"{in_flight - 1} step(s) late)")
