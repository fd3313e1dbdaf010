"""The settings an audit report opens with, recomputed from what the auditor verified: the
signed roster's plan, the run's verified config and the verified log (never the owner's summary,
except its own accuracy and epochs), with the run's protections in words."""

from __future__ import annotations

import dataclasses
from typing import Any

from clicooper_bus.audit.replay import Replay
from clicooper_bus.config import RunConfig
from clicooper_bus.ml.compute import compute_plan
from clicooper_bus.ml.models import plan_spec
from clicooper_bus.ml.privacy import defences
from clicooper_bus.ml.privacy.release import FilterSpec
from clicooper_bus.plan import schedule


def run_settings(summary: dict[str, Any], replayed: Replay, cfg: RunConfig,
                 spec: FilterSpec | None, owner_acc: float, info: dict[str, Any]
                 ) -> dict[str, Any]:
    """The report's settings: from the signed roster's plan, the verified config and the
    verified log, never taken from the owner's summary except its own accuracy and epochs."""
    pv = cfg.privacy
    # counted in the verified log, not taken from the owner's summary
    epochs = len(replayed.owner_epochs.get("fwd", ())) or cfg.run.epochs
    evaluations = len(replayed.owner_epochs.get("eval_fwd", ()))
    return {
        "configuration": defences.describe(pv),
        "dataset": cfg.data.name, "model": replayed.plan.model, "cuts": list(replayed.plan.cuts),
        "owner_tail": replayed.plan.tail or None,
        # from the signed roster's plan and the verified config
        "schedule": schedule(replayed.plan.in_flight, pv.release == "once"),
        "epochs": summary.get("epochs"), "test_accuracy": summary.get("test_accuracy"),
        "owner_accuracy_eval_half": owner_acc, "privacy": _privacy_text(pv, spec),
        # recomputed from the verified config, not copied from the owner's summary
        "epsilon": defences.spent(pv, cfg.run.epochs, epochs, evaluations,
                                  replayed.plan.classes),
        "label_obfuscation": _labels_text(pv),
        "privacy_settings": dataclasses.asdict(pv),
        # recomputed from the signed plan: who did the training's FLOPs
        "owner_flops_share": compute_plan(plan_spec(replayed.plan), tuple(replayed.plan.cuts),
                                          tail=replayed.plan.tail, batch_size=8).owner_share,
        "retention": cfg.log.retention, **info}


def _labels_text(pv) -> str:
    """How the run's labels were protected, in words."""
    parts = []
    if pv.label_epsilon:
        parts.append(f"randomised response (epsilon {pv.label_epsilon:g}, drawn once per sample)")
    if pv.label_gamma > 1:
        parts.append(f"{pv.label_gamma} secret pseudo-classes per class, permuted")
    if pv.owner_tail:
        parts.append("no label message leaves the owner (owner tail), but the gradients it "
                     "sends back depend on the " + ("randomised " if pv.label_epsilon else "")
                     + "labels")
    return "; ".join(parts) or "none"


def _privacy_text(pv, spec: FilterSpec | None) -> str:
    """The run's privacy protections in words, from its verified privacy section and filter."""
    parts = []
    if spec is None:
        parts.append("no activation protection")
    else:
        norm = "L2" if spec.mechanism == "gaussian" else "L1"
        parts.append(f"{norm} clip {spec.clip:g}, {spec.mechanism} noise {spec.noise:.4g} per "
                     f"coordinate ({spec.noise / spec.clip:.4g} x clip), release {spec.mode}")
    if pv.release == "once" and spec is None:
        parts.append("head fixed at its initial weights")
    if pv.nopeek:
        parts.append(f"NoPeek alpha {pv.nopeek:g}")
    if pv.evaluate == "owner":
        parts.append("evaluation on the owner only")
    if pv.secret_order:
        parts.append("secret batch order (releases linkable across epochs only by matching)")
    return "; ".join(parts)
