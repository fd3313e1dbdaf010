"""The `completion` family: model completion (Fu et al. 2022) by each trainer on its own stage
and by the trainers colluding, scored per channel against the true labels of the rows' sample
ids: accuracy (the labelled aux samples name the classes), ARI and matched accuracy, beside
chance (always the most frequent class of those rows) and the own-data baseline with as many
labels (`clicooper_bus.audit.baselines`, on the evaluation half: what the aux data alone gives
for labelling an image; the attacker does not hold the received rows' images, so that line is
a reference, and the verdict is judged against chance). The strongest channel (the largest
lead over chance beyond noise), named, heads the row; the colluding row also holds its
members' channels (colluders have at least what each has)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clicooper_bus.audit import scoring
from clicooper_bus.audit.baselines import own_data
from clicooper_bus.audit.families import (
    AT_CHANCE,
    CLEAR_MARGIN,
    LEAKS,
    NOT_RUN,
    WEAK,
    Family,
    Row,
    _noise,
    register,
)
from clicooper_bus.audit.family_channels import members_channels
from clicooper_bus.ml.attacks.channels import SIMULATED

if TYPE_CHECKING:
    from clicooper_bus.audit.auditor import Audit
    from clicooper_bus.audit.truth import Truth
    from clicooper_bus.ml.attacks.base import Attack, Track

NAME = "completion"


def _score(attack: Attack, out: Any, truth: Truth, audit: Audit, progress: Track) -> Row:
    """Each channel's accuracy and clustering scores; the most accurate channel heads the
    row, beside chance and the own-data baseline."""
    seen = audit.references.get("channels_seen", {})
    first = seen.get(attack.stages[0], {}) if getattr(attack, "stages", None) else {}
    channels = {}
    for name, ch in out.channels.items():
        labels = truth.labels_of(ch["split"], ch["ids"])
        channels[name] = {"accuracy": scoring.accuracy(ch["pred"], labels),
                          "chance": scoring.chance_accuracy(labels),
                          **scoring.clustering_scores(ch["pred"], labels),
                          "samples": len(labels), "seen": first.get(ch["source"], 0),
                          **({"releases_per_sample": ch["releases"]} if "releases" in ch
                             else {})}
    if len(attack.stages) > 1:  # colluding: every member's channels too
        channels.update(members_channels(attack, audit, NAME))
    base = _own_data(attack, truth, audit)
    row = {"trainer": attack.trainer, "how": out.how, "labelled": out.labelled,
           "own_data": base, "baseline": base["best"], "baseline_name": base["best_name"]}
    if not channels:
        return {**row, "channel": None, "samples": 0, "accuracy": 0.0, "chance": 0.0,
                "gain": 0.0, "channels": {}, "note": out.how or "no received rows"}
    top = max(channels, key=lambda c: lead(channels[c]))
    return {**row, "channel": top, **channels[top], "gain": channels[top]["accuracy"] -
            base["best"], "channels": channels}


def lead(m: Row) -> float:
    """A channel's lead over chance beyond its noise (three binomial standard deviations): how
    channels are ranked, so that a channel of 30 linked rows does not head the row on luck."""
    return m["accuracy"] - m["chance"] - _noise(m["chance"], m["samples"])


def _own_data(attack: Attack, truth: Truth, audit: Audit) -> dict[str, Any]:
    """The own-data baselines with as many aux labels as the attack had, computed once per
    count (the cache extraction's rows share)."""
    n = attack.threat.aux_labels or 0
    cache = audit.references.setdefault("own_data", {})
    if n not in cache:
        cache[n] = own_data(truth.aux, truth.aux_labels, truth.eval_images.numpy(),
                            truth.eval_labels, n, audit.classes)
    return cache[n]


def _headline(row: Row) -> tuple[str, str, str]:
    if row["channel"] is None:
        return ("no received rows to label", "-", "-")
    rows = (f"{row['samples']} followed samples, simulated white-box with the final weights"
            if SIMULATED in row["channel"].split("+")[0] else
            f"{row['samples']} of {row['seen']} rows {row['trainer']} received")
    return (f"accuracy {row['accuracy']:.3f}, ARI {row['ari']:.3f} on {row['channel']} "
            f"({rows})",
            f"chance {row['chance']:.3f}; own-data baseline {row['baseline']:.3f} "
            f"({row['baseline_name']}, {row['labelled']} labels, on images)",
            f"{row['accuracy'] - row['chance']:+.3f} over chance, {row['gain']:+.3f} over the "
            f"own-data baseline")


def _verdict(row: Row) -> tuple[str, str]:
    """The named accuracy against chance (within noise: at chance); the own-data baseline is
    named beside it."""
    if not row.get("samples"):
        return NOT_RUN, row.get("note") or "no received rows to label"
    chance = row["chance"]
    margin, noise = row["accuracy"] - chance, _noise(chance, row["samples"])
    why = (f"accuracy {margin:+.3f} over chance (noise {noise:.3f}), {row['gain']:+.3f} over "
           f"what {row['labelled']} labelled aux images alone give on images")
    if margin <= noise:
        return AT_CHANCE, why
    return (WEAK if margin < CLEAR_MARGIN else LEAKS), why


def _own(row: Row) -> dict[str, Row]:
    """A row's own channels (not the members' a colluding row repeats as `member:channel`)."""
    return {n: m for n, m in row["channels"].items() if ":" not in n}


def _details(rows: list[Row]) -> list[str]:
    lines = ["", "### Model completion per channel (a top on the party's stage, few labels)", "",
             "| party | channel | accuracy | chance | ARI | rows used | rows received | "
             "labelled inputs |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for name, m in _own(r).items():
            lines.append(f"| {r['trainer']} | {name} | {m['accuracy']:.3f} | {m['chance']:.3f} "
                         f"| {m['ari']:.3f} | {m['samples']} | {m['seen']} | "
                         f"{r['how'].split(';')[0]} |")
    tops = {r["how"].split("; ", 1)[-1] for r in rows if "; " in r.get("how", "")}
    return lines + [f"\nThe top: {t}." for t in sorted(tops)]


def _plot(ax: Any, rows: list[Row]) -> None:
    names = [f"{r['trainer']}:{c}" for r in rows for c in _own(r)]
    ax.bar(names, [m["accuracy"] for r in rows for m in _own(r).values()],
           color="tab:orange")
    if rows:
        ax.axhline(rows[0]["baseline"], ls="-.", color="tab:gray", lw=1, label="own data")
    ax.set_title("completion: accuracy per party and channel")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelrotation=45, labelsize=6)


def _frontier(rows: list[Row]) -> dict[str, Any]:
    top = max((r for r in rows if r["channel"]), key=lead, default=None)
    return {"completion_accuracy": top["accuracy"] if top else None,
            "completion_channel": f"{top['trainer']}:{top['channel']}" if top else None}


COMPLETION = register(Family(NAME, _score, _headline, "accuracy", "accuracy", 4, _plot,
                             _frontier, _details, verdict=_verdict, leaks="the private labels"))
