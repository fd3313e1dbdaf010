"""What an attack is: a threat model, and a `run` that sees only what that model allows.

The auditor assembles everything it knows about a run (`Knowledge`) and hands each attack a
`View` cut down to the fields its `ThreatModel` declares. Reading any other field raises
`ThreatModelViolation`, so an attack cannot quietly use what its party would not have (the
training labels, the owner's head, the evaluation images). Attacks return predictions; the
auditor, which holds the ground truth, scores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from clicooper_bus.errors import ClicooperError

# Everything a party may be handed, and what it is. The truth (which samples were released,
# their labels and images, the evaluation half of the test split) is never among them.
FIELDS: dict[str, str] = {
    "plan": "the training plan of the signed roster (model, cuts, classes, input shape): "
            "public to every member",
    "released": "training activations the owner released to the first stage (attack targets)",
    "released_labels": "the labels the last stage received for those same steps "
                       "(obfuscated when the owner obfuscates them)",
    "eval_pairs": "evaluation activations of public auxiliary images, matched by position in "
                  "the test split (the owner evaluates through the chain)",
    "stages": "every trainer's final stage weights",
    "release": "the owner's final head weights and release mechanism (head, then any privacy "
               "transform), as a function of images",
    "aux_images": "public auxiliary images (by default the first half of the test split)",
    "aux_labels": "labels of the auxiliary images (all, or the first n where declared)",
    "received/<NAME>": "every tensor channel that the trainer NAME received (fwd, bwd, labels, "
                          "eval_fwd), each row tagged with its sample id from the public batch "
                          "order (`clicooper_bus.audit.channels`)",
    "stage/<NAME>": "the final weights of trainer NAME's own stage (the segment it delivered): "
                    "what that trainer holds alone",
}
PER_TRAINER = "received/"  # the prefix of the per-trainer channel fields
STAGE = "stage/"  # the prefix of the per-trainer stage fields
PREFIXES = (PER_TRAINER, STAGE)  # fields named per trainer: PREFIX + the trainer's name


class ThreatModelViolation(ClicooperError):
    """An attack read a field its threat model does not declare."""


@dataclass(frozen=True)
class ThreatModel:
    party: str  # who attacks, e.g. "trainer-1 (first stage)"
    sees: frozenset[str]  # names from FIELDS
    aux: str  # auxiliary knowledge, in words
    aux_labels: int | None = 0  # labelled aux samples: 0 none, n the first n, None all

    def __post_init__(self) -> None:
        unknown = {f for f in self.sees if f not in FIELDS and not any(
            f.startswith(p) and len(f) > len(p) for p in PREFIXES)}
        if unknown:
            raise ValueError(f"threat model names unknown fields {sorted(unknown)}")
        if (self.aux_labels != 0) != ("aux_labels" in self.sees):
            raise ValueError("aux_labels must be declared in `sees` exactly when labelled "
                             "aux samples are given")

    def to_json(self) -> dict[str, Any]:
        return {"party": self.party, "sees": sorted(self.sees), "aux": self.aux,
                "aux_labels": "all" if self.aux_labels is None else self.aux_labels}


class View:
    """The fields of `Knowledge` a threat model allows; any other field raises."""

    def __init__(self, threat: ThreatModel, values: dict[str, Any]):
        self._threat = threat
        self._values = {k: values.get(k) for k in threat.sees}

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._values:
            return self._values[name]
        raise ThreatModelViolation(f"the attack read {name!r}, which its threat model "
                                   f"({self._threat.party}) does not declare")


@dataclass
class Knowledge:
    """Everything the auditor can hand out, built from the replayed log and the run's files."""

    values: dict[str, Any] = field(default_factory=dict)

    def view(self, threat: ThreatModel) -> View:
        """A view holding private copies of the declared fields only: numpy arrays copied and
        read-only (a slice would keep the whole array, e.g. the evaluation half, reachable
        through `.base`), tensors cloned, modules deep-copied, so that no attack can read past
        its fields or change what the auditor scores against or hands the next attack."""
        vals = {}
        for name in threat.sees:
            value = self.values.get(name)
            if name == "aux_labels" and threat.aux_labels and value is not None:
                value = value[:threat.aux_labels]
            vals[name] = _private(value)
        return View(threat, vals)


def _private(value: Any) -> Any:
    import copy

    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        out = np.array(value, copy=True)
        out.setflags(write=False)
        return out
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_private(v) for v in value)
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        return {k: _private(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and \
            not value.__dataclass_params__.frozen:  # e.g. a channel's rows
        return dataclasses.replace(value, **{f.name: _private(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    return value  # the plan (frozen) and the release function (see Knowledge.release)


T = TypeVar("T")
Track = Callable[[Iterable[T], str, int], Iterator[T]]


def no_progress(it: Iterable[T], desc: str, total: int) -> Iterator[T]:
    return iter(it)


class Attack:
    """A plug-in: `name`, `family`, `threat`, `run`. The family (clustering, inversion or
    extraction) is how the auditor scores and reports the attack: each is registered once, with
    its scorer and headline, in `clicooper_bus.audit.families`."""

    name: str = ""
    family: str = ""
    title: str = ""
    threat: ThreatModel

    def run(self, view: View, track: Track = no_progress) -> Any:
        raise NotImplementedError
