"""The `extraction` family: a working copy of the model built by colluding trainers, scored on
the evaluation half against chance, the owner's own model, and what the colluders reach from
their public aux data alone (`clicooper_bus.audit.baselines`): an extraction is reported as its
gain over the best own-data baseline with as many labels, and marked "no gain" below it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clicooper_bus.audit import scoring
from clicooper_bus.audit.baselines import own_data
from clicooper_bus.audit.families import (
    AT_CHANCE,
    CLEAR_MARGIN,
    LEAKS,
    NO_GAIN,
    WEAK,
    Family,
    Row,
    _noise,
    register,
)

if TYPE_CHECKING:
    from clicooper_bus.audit.auditor import Audit
    from clicooper_bus.audit.truth import Truth
    from clicooper_bus.ml.attacks.base import Attack, Track


def _score_extraction(attack: Attack, out: Any, truth: Truth, audit: Audit,
                      progress: Track) -> Row:
    """The surrogate's accuracy on the evaluation half, beside chance and the owner's."""
    from clicooper_bus.ml.attacks.extraction import Surrogate

    assert isinstance(out, Surrogate)
    pred = out.predict(truth.eval_images)
    acc = (scoring.accuracy(pred, truth.eval_labels) if out.named
           else scoring.hungarian_accuracy(pred, truth.eval_labels))
    # unnamed groups are matched to classes after the fact, which lifts chance too
    chance = (scoring.chance_accuracy(truth.eval_labels) if out.named
              else scoring.matched_chance(pred, truth.eval_labels))
    base = _own_data(attack, truth, audit)
    return {"samples": len(truth.eval_labels), "accuracy": acc,
            "mapping": "soft vote of labelled samples" if out.named
            else "best consistent mapping (Hungarian, scored by the auditor)",
            "chance": chance,
            "owner_accuracy": audit.settings["owner_accuracy_eval_half"], "how": out.how,
            "own_data": base, "baseline": base["best"], "baseline_name": base["best_name"],
            "gain": acc - base["best"]}


def _own_data(attack: Attack, truth: Truth, audit: Audit) -> dict[str, Any]:
    """The own-data baselines with as many aux labels as the attack had (computed once per
    count and kept in the audit's references)."""
    n = attack.threat.aux_labels or 0
    cache = audit.references.setdefault("own_data", {})
    if n not in cache:
        cache[n] = own_data(truth.aux, truth.aux_labels, truth.eval_images.numpy(),
                            truth.eval_labels, n, audit.classes)
    return cache[n]


def _headline_extraction(row: Row) -> tuple[str, str, str]:
    if "baseline" not in row:  # a report written before the own-data baselines
        return (f"accuracy {row['accuracy']:.3f} ({row['mapping']})",
                f"chance {row['chance']:.3f}; owner {row['owner_accuracy']:.3f}",
                f"{row['accuracy'] - row['owner_accuracy']:+.3f} against the owner")
    return (f"accuracy {row['accuracy']:.3f} ({row['mapping']})",
            f"chance {row['chance']:.3f}; own-data baseline {row['baseline']:.3f} "
            f"({row['baseline_name']}); owner {row['owner_accuracy']:.3f}",
            f"{row['gain']:+.3f} over the own-data baseline")


def _verdict_extraction(row: Row) -> tuple[str, str]:
    """The surrogate's accuracy against chance (within noise: at chance), against what the
    colluders reach from their own data alone (within noise or below: no gain) and the
    owner's."""
    chance, owner = row["chance"], row["owner_accuracy"]
    margin, noise = row["accuracy"] - chance, _noise(chance, row.get("samples"))
    if margin <= noise:
        return AT_CHANCE, f"{margin:+.3f} over chance (noise {noise:.3f})"
    if "gain" in row and row["gain"] <= noise:
        return NO_GAIN, (f"{row['gain']:+.3f} over what the aux data alone gives "
                         f"({row['baseline_name']} {row['baseline']:.3f}; noise {noise:.3f})")
    if row["accuracy"] >= owner - noise:
        return LEAKS, f"{margin:+.3f} over chance: as accurate as the owner's model"
    share = margin / (owner - chance) if owner > chance else 1.0
    return (WEAK if margin < CLEAR_MARGIN else LEAKS), (
        f"{margin:+.3f} over chance, {share:.0%} of the way to the owner's accuracy")


def _plot_extraction(ax: Any, rows: list[Row]) -> None:
    ax.bar([r["name"] for r in rows], [r["accuracy"] for r in rows], color="tab:green")
    ax.axhline(rows[0]["chance"], ls=":", color="k", lw=1, label="chance")
    ax.axhline(rows[0]["owner_accuracy"], ls="--", color="k", lw=1, label="owner")
    if "baseline" in rows[-1]:
        ax.axhline(rows[-1]["baseline"], ls="-.", color="tab:gray", lw=1,
                   label=f"own data ({rows[-1]['name']})")
    ax.set_title("extraction: accuracy")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)


def _frontier_extraction(rows: list[Row]) -> dict[str, Any]:
    by = {r["name"]: r for r in rows}
    return {"extraction": {n: r["accuracy"] for n, r in by.items()},
            "extraction_chance": (by.get("extraction-50") or {}).get("chance"),
            "extraction_baseline": {n: r.get("baseline") for n, r in by.items()}}



EXTRACTION = register(Family("extraction", _score_extraction, _headline_extraction, "accuracy",
                             "accuracy", 2, _plot_extraction, _frontier_extraction,
                             verdict=_verdict_extraction, leaks="a working copy of the model"))
