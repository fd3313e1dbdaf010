"""Attack families, each registered once: how the auditor scores an attack of the family, how
the report states its headline (beside the line it must beat), draws its panel and adds its
details, and which fields the sweep's frontier takes from it.

An attack names its family (`Attack.family`, in `clicooper_bus.ml.attacks`); the auditor, the
report and the sweep look the family up here (`family(name)`) instead of switching on names.
A new family is one `register(Family(...))`. Scores are attack success: for the defence,
lower is better. Nothing here imports torch at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from clicooper_bus.audit import scoring
from clicooper_bus.errors import ClicooperError

if TYPE_CHECKING:
    from clicooper_bus.audit.auditor import Audit
    from clicooper_bus.audit.truth import Truth
    from clicooper_bus.ml.attacks.base import Attack, Track

INVERT_SAMPLES = 500  # activations reconstructed and scored by SSIM
DEGENERATE_STD = 0.02  # pixel spread (images in [0, 1]) under which reconstructions are constant
MIN_MARGIN = 0.02  # a score closer than this to the line it must beat is read as at the line
CLEAR_MARGIN = 0.10  # this far above the line, a leak is clear; between the two, weak

Row = dict[str, Any]  # one attack's entry in report.json's "attacks"
Scorer = Callable[["Attack", Any, "Truth", "Audit", "Track"], Row]
Headline = Callable[[Row], tuple[str, str, str]]
Verdict = Callable[[Row], tuple[str, str]]  # (verdict word, its reason in words)

# the verdict words, from the numbers beside the line each score must beat
LEAKS, CLASS_ONLY, WEAK, AT_CHANCE, AT_FLOOR, BELOW_FLOOR, BROKEN, NOT_RUN, NOT_JUDGED = (
    "leaks", "leaks the class only", "weak leak", "at chance", "at the floor", "below the floor",
    "broken attack", "nothing attacked", "not judged")
NO_GAIN = "no gain"  # an extraction no better than what the attackers' own data gives


def _noise(chance: float, n: int | None) -> float:
    """Three standard deviations of an accuracy of `n` guesses that are right with probability
    `chance`, or MIN_MARGIN if larger (or `n` unknown): a margin within it says nothing."""
    if not n:
        return MIN_MARGIN
    return max(MIN_MARGIN, 3 * float(np.sqrt(max(chance * (1 - chance), 0.0) / n)))


def verdict_label_inference(row: Row) -> tuple[str, str]:
    """A label-inference row (matched accuracy beside its matched chance, over `samples`):
    at chance within noise, a weak leak below CLEAR_MARGIN over it, a leak above; a row
    without those numbers (a family registered without a rule of its own) is not judged."""
    if "matched_accuracy" not in row or "matched_accuracy_chance" not in row:
        return NOT_JUDGED, "its family has no verdict rule for these scores"
    if not row.get("samples"):
        return NOT_RUN, "no retained rows to attack"
    chance = row["matched_accuracy_chance"]
    margin, noise = row["matched_accuracy"] - chance, _noise(chance, row["samples"])
    why = f"matched accuracy {margin:+.3f} over chance (noise {noise:.3f})"
    if margin <= noise:
        return AT_CHANCE, why
    return (WEAK if margin < CLEAR_MARGIN else LEAKS), why


class UnknownFamily(ClicooperError):
    """An attack or a report row names a family that is not registered."""


@dataclass(frozen=True)
class Family:
    """One attack family. `score(attack, output, truth, audit, progress)` returns the row's
    scores (it may add references to `audit.references` and images to `audit.figures`);
    `headline(row)` is (score, the line it must beat, margin) as text; `metric` is the row key
    of the headline number, `label` its name in words; `plot(ax, rows)` draws the family's
    panel `panel` of scores.png; `details(rows)` adds markdown lines under the threat models;
    `frontier(rows)` gives the sweep row's fields (every key, None or empty without rows);
    `verdict(row)` judges the row's score against its line, (word, reason): a word of LEAKS,
    CLASS_ONLY, WEAK, AT_CHANCE, AT_FLOOR, BELOW_FLOOR, BROKEN, NOT_RUN, NOT_JUDGED (default:
    a label-inference row's rule); `leaks` names, in words, what the family's attacks take."""

    name: str
    score: Scorer
    headline: Headline
    metric: str
    label: str
    panel: int
    plot: Callable[[Any, list[Row]], None]
    frontier: Callable[[list[Row]], dict[str, Any]]
    details: Callable[[list[Row]], list[str]] | None = None
    direction: Literal["lower is better", "higher is better"] = "lower is better"
    verdict: Verdict = verdict_label_inference
    leaks: str = ""  # what a successful attack takes, in words ("" : the attack's title)


_REGISTRY: dict[str, Family] = {}


def register(fam: Family) -> Family:
    """Add a family. Raises ValueError if its name or panel is taken."""
    if fam.name in _REGISTRY:
        raise ValueError(f"attack family {fam.name!r} is registered already")
    if any(f.panel == fam.panel for f in _REGISTRY.values()):
        raise ValueError(f"panel {fam.panel} of scores.png is another family's")
    _REGISTRY[fam.name] = fam
    return fam


def families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_REGISTRY.values())


def family(name: str) -> Family:
    """The family called `name`. Raises UnknownFamily (a ClicooperError) if none is."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownFamily(f"unknown attack family {name!r}; the families are "
                            f"{', '.join(_REGISTRY)}") from None


def of(attack: Attack) -> Family:
    """The family of an attack. Raises UnknownFamily naming the attack."""
    try:
        return family(attack.family)
    except UnknownFamily as exc:
        raise UnknownFamily(f"attack {attack.name} has unknown family {attack.family!r} "
                            f"({exc})") from None


def rows_of(rows: list[Row], name: str) -> list[Row]:
    """The rows of one family, in report order."""
    return [r for r in rows if r["family"] == name]


def strongest(fam: Family, rows: list[Row]) -> Row:
    """The most successful attack of `rows` (all of family `fam`) by its headline metric."""
    pick = max if fam.direction == "lower is better" else min
    return pick(rows, key=lambda r: r.get(fam.metric) or 0.0)


# --- clustering: label inference from the received activations ----------------------------

def _score_clustering(attack: Attack, out: Any, truth: Truth, audit: Audit,
                      progress: Track) -> Row:
    """The strongest variant's scores, every variant's, and the raw-pixel reference."""
    refs = audit.references
    truth_labels = truth.labels[:len(next(iter(out.values())))]
    variants = {v: scoring.clustering_scores(p, truth_labels) for v, p in out.items()}
    best = max(variants, key=lambda v: variants[v]["ari"])
    if "raw_pixels" not in refs:
        from clicooper_bus.ml.attacks.clustering import cluster_variants

        raw = cluster_variants(truth.images[:len(truth_labels)], audit.classes,
                               track=progress, desc="clustering raw pixels (reference)")
        rv = {v: scoring.clustering_scores(p, truth_labels) for v, p in raw.items()}
        rbest = max(rv, key=lambda v: rv[v]["ari"])
        refs["raw_pixels"] = {"variant": rbest, **rv[rbest]}
    return {"samples": len(truth_labels), **_seen(audit), "strongest": best, **variants[best],
            "variants": variants, "reference_raw_pixels": refs["raw_pixels"]}


def _headline_clustering(row: Row) -> tuple[str, str, str]:
    raw = row["reference_raw_pixels"]
    return (f"ARI {row['ari']:.3f}, AMI {row['ami']:.3f}, matched accuracy "
            f"{row['matched_accuracy']:.3f}, success {row['success_rate']:.0%} "
            f"(strongest: {row['strongest']})",
            f"chance ARI 0, matched accuracy {row['matched_accuracy_chance']:.3f}; raw pixels "
            f"ARI {raw['ari']:.3f}",
            f"{row['matched_accuracy'] - row['matched_accuracy_chance']:+.3f} accuracy over chance")


def _details_clustering(rows: list[Row]) -> list[str]:
    lines = ["", "### Clustering variants (ARI)", "", "| variant | ARI | AMI | matched "
             "accuracy | success |", "| --- | --- | --- | --- | --- |"]
    for v, m in rows[0]["variants"].items():
        lines.append(f"| {v} | {m['ari']:.3f} | {m['ami']:.3f} | {m['matched_accuracy']:.3f} "
                     f"| {m['success_rate']:.0%} |")
    return lines


def _plot_clustering(ax: Any, rows: list[Row]) -> None:
    v = rows[0]["variants"]
    ax.bar(list(v), [m["ari"] for m in v.values()], color="tab:blue")
    ax.axhline(rows[0]["reference_raw_pixels"]["ari"], ls="--", color="k", lw=1,
               label="raw pixels")
    ax.set_title("clustering: ARI per variant")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)


def _frontier_clustering(rows: list[Row]) -> dict[str, Any]:
    cl = rows[0] if rows else {}
    return {"ari": cl.get("ari"), "ari_variant": cl.get("strongest"),
            "success": cl.get("success_rate"),
            "ari_raw_pixels": (cl.get("reference_raw_pixels") or {}).get("ari")}


def _seen(audit: Audit) -> Row:
    """How many released activations the first stage received (retained or not), beside the
    samples an attack on them used; empty when unknown (a report built without channels)."""
    seen = audit.references.get("released_seen")
    return {} if seen is None else {"seen": seen}


# --- inversion: reconstructing the private images -----------------------------------------

def _score_inversion(attack: Attack, out: Any, truth: Truth, audit: Audit,
                     progress: Track) -> Row:
    """Mean SSIM against the originals, beside the floors over exactly the samples scored."""
    recon = np.asarray(out, np.float32)
    originals = truth.images[:len(recon)]
    floors_by_n = audit.references.setdefault("inversion_floors", {})
    if str(len(recon)) not in floors_by_n:
        floors_by_n[str(len(recon))] = scoring.inversion_floors(
            originals, truth.labels[:len(recon)], truth.aux, truth.aux_labels)
    audit.figures.setdefault("originals", originals[:10])
    audit.figures[attack.name] = recon[:10]
    floors = floors_by_n[str(len(recon))]
    s = scoring.mean_ssim(recon, originals)
    row = {"samples": len(recon), "ssim": s, "floors": floors,
           "above_mean_image": s - floors["mean_image"], **_seen(audit)}
    row.update(degenerate(recon))
    if len(recon) < INVERT_SAMPLES:
        row["warning"] = (f"only {len(recon)} released activations were retained; the "
                          f"SSIM of fewer than {INVERT_SAMPLES} samples is noisy (keep more "
                          f"with [log] retention fwd=sample:N)")
    return row


def degenerate(recon: np.ndarray) -> Row:
    """{"degenerate": bool}, with a "degenerate_reason" when most reconstructions are
    (near-)constant images or all of them (nearly) the same image: such an attack scores the
    black or mean-image floor by construction, so its SSIM measures nothing of the run."""
    if len(recon) == 0:
        return {"degenerate": False}
    flat = recon.reshape(len(recon), -1).astype(np.float64)
    constant = float(np.mean(flat.std(axis=1) < DEGENERATE_STD))
    if constant > 0.5:
        return {"degenerate": True,
                "degenerate_reason": f"{constant:.0%} of the reconstructions are constant "
                                     f"images (pixel std under {DEGENERATE_STD})"}
    if len(recon) > 1 and float(flat.std(axis=0).mean()) < DEGENERATE_STD:
        return {"degenerate": True,
                "degenerate_reason": f"all {len(recon)} reconstructions are (nearly) the same "
                                     f"image (mean spread across them under {DEGENERATE_STD})"}
    return {"degenerate": False}


def _verdict_inversion(row: Row) -> tuple[str, str]:
    """Broken if degenerate; else SSIM against the no-information floor (the better of black
    and the mean image) and above that against the true class mean (class knowledge alone)."""
    if row.get("degenerate"):
        return BROKEN, row.get("degenerate_reason", "degenerate reconstructions")
    f = row["floors"]
    floor = max(f["mean_image"], f["black"])
    over, over_class = row["ssim"] - floor, row["ssim"] - f["class_mean"]
    if over < -MIN_MARGIN:
        return BELOW_FLOOR, f"{over:+.3f} under the no-information floor: a weak attack"
    if over <= MIN_MARGIN:
        return AT_FLOOR, f"within {MIN_MARGIN} of the no-information floor"
    if over_class > MIN_MARGIN:
        return LEAKS, f"{over_class:+.3f} over the true class mean: more than the class"
    return (WEAK if over < CLEAR_MARGIN else CLASS_ONLY), (
        f"{over:+.3f} over the no-information floor but not over the true class mean "
        f"({over_class:+.3f}): what the label gives, not the image")


def _headline_inversion(row: Row) -> tuple[str, str, str]:
    f = row["floors"]
    return (f"SSIM {row['ssim']:.3f}",
            f"mean image {f['mean_image']:.3f}, black {f['black']:.3f}, true class mean "
            f"{f['class_mean']:.3f}",
            f"{row['ssim'] - f['mean_image']:+.3f} over the mean image, "
            f"{row['ssim'] - f['class_mean']:+.3f} over the class mean")


def _plot_inversion(ax: Any, rows: list[Row]) -> None:
    f = rows[0]["floors"]
    ax.bar([r["name"] for r in rows], [r["ssim"] for r in rows], color="tab:red")
    for name, y, style in (("mean image", f["mean_image"], ":"), ("black", f["black"], "--"),
                           ("class mean", f["class_mean"], "-.")):
        ax.axhline(y, ls=style, color="k", lw=1, label=name)
    ax.set_title("inversion: SSIM")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)


def _frontier_inversion(rows: list[Row]) -> dict[str, Any]:
    return {"ssim": {r["name"]: r["ssim"] for r in rows},
            "floors": rows[0]["floors"] if rows else {}}


# registration order is the sweep row's field order and the comparison's axis label
CLUSTERING = register(Family("clustering", _score_clustering, _headline_clustering, "ari",
                             "ARI", 1, _plot_clustering, _frontier_clustering,
                             _details_clustering, verdict=verdict_label_inference,
                             leaks="the private labels"))
INVERSION = register(Family("inversion", _score_inversion, _headline_inversion, "ssim", "SSIM",
                            0, _plot_inversion, _frontier_inversion,
                            verdict=_verdict_inversion, leaks="the private images"))

# extraction, the per-trainer channels and model completion register themselves after these,
# in this order (their own modules, the same registry): the order is the sweep row's field order
# isort: off
from clicooper_bus.audit.family_extraction import EXTRACTION  # noqa: E402, F401
from clicooper_bus.audit import family_channels  # noqa: E402, F401
from clicooper_bus.audit import family_completion  # noqa: E402, F401
# isort: on
