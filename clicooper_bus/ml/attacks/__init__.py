"""Attacks as plug-ins, each with its threat model (see `base`). `default_attacks` is the
suite the auditor runs; a new attack is a class with `name`, `family`, `threat` and `run`.
An attack with `per_trainer = True` is a template: the auditor runs `expand(stages)`, one
attack for every trainer of the roster (each seeing only that trainer's channels and stage) and
one for them colluding."""

from __future__ import annotations

from clicooper_bus.ml.attacks.base import Attack
from clicooper_bus.ml.attacks.channels import ChannelInference
from clicooper_bus.ml.attacks.clustering import ClusteringAttack
from clicooper_bus.ml.attacks.completion import ModelCompletion
from clicooper_bus.ml.attacks.extraction import ExtractionAttack
from clicooper_bus.ml.attacks.inversion import (
    ClassMeanAttack,
    SDARInversion,
    UnSplitInversion,
    WhiteBoxDecoder,
)


def default_attacks() -> list[Attack]:
    return [ClusteringAttack(), ChannelInference(), ModelCompletion(), WhiteBoxDecoder(),
            ClassMeanAttack(), UnSplitInversion(), SDARInversion(), ExtractionAttack(0),
            ExtractionAttack(10), ExtractionAttack(50)]


def expand_per_trainer(attacks: list[Attack], stages: list[str]) -> list[Attack]:
    """The suite with every per-trainer template expanded for the roster's trainers `stages`
    (one attack per trainer, and the trainers colluding)."""
    return [one for a in attacks
            for one in (a.expand(stages) if getattr(a, "per_trainer", False) else [a])]


def select(names: str | None) -> list[Attack]:
    """The default suite, or the attacks named (comma-separated), in suite order."""
    suite = default_attacks()
    if not names:
        return suite
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [a.name for a in suite]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        from clicooper_bus.errors import ConfigError

        raise ConfigError(f"unknown attack(s) {', '.join(unknown)}; attacks are {', '.join(known)}")
    return [a for a in suite if a.name in wanted]
