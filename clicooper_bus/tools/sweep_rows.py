"""A sweep's rows: one run's measurements in one line (`row`, from its summary and audit
report), the strongest label inference over every channel per threat model, and one
configuration's row from its seeds' (`aggregate`: means and ranges). The documents
(`sweep_docs.py`) and the record (`sweep_record.py`) are written from these rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout

__all__ = ["LABEL_FAMILIES", "accuracies", "aggregate", "colluding", "label_inference", "row"]


def row(run_dir: Path) -> dict[str, Any]:
    """One line of the frontier, from a run's summary and audit report: each attack family
    gives its fields (`Family.frontier`). Raises ClicooperError if the audit was refused or
    forced, OSError or ValueError if either file is missing or unreadable."""
    from clicooper_bus.audit import families

    layout = RunLayout(run_dir)
    summary = json.loads(layout.summary.read_text())
    report = json.loads(layout.audit_report.read_text())
    if report.get("refused") or report.get("forced"):
        raise ClicooperError(f"the audit of {run_dir} was refused or forced: not a measurement")
    st = report["settings"]
    eps = st.get("epsilon") or {}
    measured: dict[str, Any] = {}
    for fam in families.families():  # in registration order: the row's field order
        measured.update(fam.frontier(families.rows_of(report["attacks"], fam.name)))
    out = {
        "name": run_dir.name, "configuration": st.get("configuration"),
        "defence": _defence(st.get("privacy_settings") or {}),
        "privacy": st.get("privacy"), "labels": st.get("label_obfuscation"),
        "epochs": summary["epochs"], **accuracies(summary), **measured,
        "epsilon": eps.get("epsilon"), "delta": eps.get("delta"),
        "label_epsilon": (eps.get("labels") or {}).get("epsilon"),
        "epsilon_covers": "the run" if (st.get("privacy_settings") or {}).get("release") == "once"
        else "own releases only (head trained without DP)",
        "adjacency": eps.get("adjacency"), "sensitivity": eps.get("sensitivity"),
        "wall_s": summary["wall_s"], "audit_s": report.get("wall_s"),
    }
    out.update(label_inference(report["attacks"]))
    if out["ssim"]:
        _inversion_margins(out)
    return out


def accuracies(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's accuracies and the owner's share of the training FLOPs: `accuracy` is what the
    owner ends with (the fine-tuned model's when it fine-tuned), `split_accuracy` the split-
    trained model's, `control_accuracy` the fine-tune's control arm's (None without one);
    `owner_share` counts the fine-tune's FLOPs as the owner's."""
    ft = summary.get("finetune") or {}
    return {"accuracy": ft.get("accuracy", summary["test_accuracy"]),
            "split_accuracy": summary["test_accuracy"],
            "control_accuracy": (ft.get("control") or {}).get("accuracy"),
            "owner_share": ft.get("owner_flops_share", summary.get("owner_flops_share"))}


# the families whose rows infer training labels, each from a channel a party received
LABEL_FAMILIES = ("clustering", "channels", "completion")


def colluding(attack: dict[str, Any]) -> bool:
    """Whether an audit row's party is all trainers colluding (its threat model says so)."""
    party = (attack.get("threat_model") or {}).get("party", "")
    return "colluding" in party and "non-colluding" not in party


def label_inference(attacks: list[dict[str, Any]]) -> dict[str, Any]:
    """The strongest label inference of an audit, per threat model (`label_alone`: one trainer
    by itself, what the CliCooper paper assumes; `label_colluding`: all trainers together, who
    can also do whatever one of them can): the largest ARI and the largest matched accuracy over
    chance, each over every channel and variant of the clustering, channel and completion
    attacks, and where the largest ARI came from (`..._where`: party, channel, attack). Values
    None where no such row was scored."""
    out: dict[str, Any] = {}
    scored = [a for a in attacks if a.get("family") in LABEL_FAMILIES and a.get("ari") is not None]
    for key, rows in (("label_alone", [a for a in scored if not colluding(a)]),
                      ("label_colluding", scored)):
        top = max(rows, key=lambda a: a["ari"], default=None)
        over = [a["matched_accuracy"] - a["matched_accuracy_chance"] for a in rows
                if a.get("matched_accuracy") is not None]
        out[key] = {"ari": top["ari"] if top else None,
                    "matched_over_chance": max(over, default=None)}
        out[f"{key}_where"] = _where(top) if top else None
    return out


def _where(attack: dict[str, Any]) -> str:
    party = attack.get("trainer") or (attack.get("threat_model") or {}).get("party", "?")
    return f"{party.split(',')[0]}: {attack.get('channel') or 'fwd'} ({attack['name']})"


def aggregate(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's row from its seeds' rows: every number (also inside the per-attack
    maps) is the mean, its range is in `spread` ("key" or "key.attack" -> [min, max]); the
    rest (names, settings) is the first seed's. One row is returned as it is, with seeds 1."""
    if len(rows) == 1:
        return {**rows[0], "seeds": 1}
    out: dict[str, Any] = {**rows[0], "name": name, "seeds": len(rows)}
    spread: dict[str, list[float]] = {}
    for key, first in rows[0].items():
        if isinstance(first, dict):
            out[key] = {k: _mean(rows, key, k, spread) for k in first}
        elif _number(first):
            out[key] = _mean(rows, None, key, spread)
    out["spread"] = spread
    if out.get("ssim"):
        _inversion_margins(out)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _mean(rows: list[dict[str, Any]], outer: str | None, key: str,
          spread: dict[str, list[float]]) -> Any:
    """The mean over rows of row[outer][key] (or row[key]); the first value if not numbers."""
    values = [(r.get(outer) or {}).get(key) if outer else r.get(key) for r in rows]
    if not all(_number(v) for v in values) or len(set(values)) == 1:
        return values[0]
    spread[f"{outer}.{key}" if outer else key] = [min(values), max(values)]
    return sum(values) / len(values)


def _inversion_margins(out: dict[str, Any]) -> None:
    """The best inversion SSIM, and its margins over the mean-image and class-mean lines."""
    floors = out["floors"]
    out["ssim_max"] = max(out["ssim"].values())
    out["ssim_max_attack"] = max(out["ssim"], key=out["ssim"].get)
    out["ssim_over_mean_image"] = out["ssim_max"] - floors.get("mean_image", 0.0)
    # detail beyond the class: the best attack other than the class-mean attacker itself
    detail = {n: v for n, v in out["ssim"].items() if n != "class-mean"}
    out["ssim_over_class_mean"] = max(detail.values()) - floors.get("class_mean", 0.0) \
        if detail else None


def _defence(settings: dict[str, Any]) -> str:
    """The defences of a run in words, from its verified settings (not its name)."""
    from clicooper_bus.config import PrivacySection
    from clicooper_bus.ml.privacy.defences import describe

    known = {k: v for k, v in settings.items() if k in PrivacySection.__dataclass_fields__}
    words = describe(PrivacySection(**{**known, "name": ""}))
    # `describe` (ml/privacy, under the auditor's fingerprint) does not name the secret order
    # yet: it moves there with the next change to the auditor, which remeasures every row
    if known.get("secret_order"):
        words = "secret batch order" if words == "undefended" else words + " + secret batch order"
    return words
