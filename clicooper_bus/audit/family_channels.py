"""The `channels` family: label inference on every channel one trainer received (activations,
gradients, labels, evaluation traffic; single releases and linked across epochs), scored per
channel against the true labels of the samples each row belongs to. The headline is the
strongest channel and variant, named, beside the rows that trainer saw in that channel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from clicooper_bus.audit import scoring
from clicooper_bus.audit.families import Family, Row, register
from clicooper_bus.ml.attacks.channels import SIMULATED

if TYPE_CHECKING:
    from clicooper_bus.audit.auditor import Audit
    from clicooper_bus.audit.truth import Truth
    from clicooper_bus.ml.attacks.base import Attack, Track


def _score(attack: Attack, out: Any, truth: Truth, audit: Audit, progress: Track) -> Row:
    """Each channel's strongest variant; the strongest channel's scores head the row. The
    colluding row also holds each member's channels (`member:channel`): colluders have at
    least what each of them has, so their row is never weaker than a member's."""
    every = audit.references.get("channels_seen", {})
    # colluders' joined rows: each (sample, epoch) the first stage received once
    seen = every.get(attack.trainer) or {"joined": every.get(getattr(attack, "stages", [""])[0],
                                                             {}).get("fwd", 0)}
    channels = {}
    for name, ch in out.items():
        scored, rows_of = private_rows(ch, len(truth.aux), len(np.unique(truth.aux_labels)))
        if name.split("+")[0].endswith(SIMULATED):
            rows_of = f"simulated white-box (final weights), {rows_of}: not rows received"
        if "matches" in ch:  # linked by matching (a secret batch order): how well it linked
            within = " within received labels" if ch.get("blocks") else ""
            rows_of += (f"; linked by matching{within}, "
                        f"{linked_correctly(ch['matches'], truth):.0%} of matches the same sample")
        labels = truth.labels_of(ch["split"], ch["ids"][scored])
        variants = {v: scoring.clustering_scores(p[scored], labels)
                    for v, p in ch["variants"].items()}
        best = max(variants, key=lambda v: variants[v]["ari"])
        # own outputs count against the rows they were computed from
        source = ch.get("source", name.split("+")[0])
        channels[name] = {"strongest": best, **variants[best], "samples": len(labels),
                          "seen": seen.get(source, 0), "rows_of": rows_of,
                          **({"releases_per_sample": ch["releases"]} if "releases" in ch else {}),
                          **({"linked_correctly": linked_correctly(ch["matches"], truth)}
                             if "matches" in ch else {})}
    channels.update(members_channels(attack, audit, CHANNELS_NAME))
    if not channels:
        return {"trainer": attack.trainer, "channel": None, "samples": 0, "ari": 0.0,
                "matched_accuracy": 0.0, "matched_accuracy_chance": 0.0, "success_rate": 0.0,
                "channels": {}, "note": "no retained channel"}
    # a channel scored on public images only measures no private leak: it heads the row only
    # when nothing else was measured
    private = [c for c in channels if not channels[c].get("rows_of", "").startswith(PUBLIC)]
    top = max(private or channels, key=lambda c: channels[c]["ari"])
    return {"trainer": attack.trainer, "channel": top, **channels[top], "channels": channels}


CHANNELS_NAME = "channels"


def linked_correctly(matches: np.ndarray, truth: Truth) -> float:
    """The share of an attack's cross-epoch matches (M x 2 release tags) that paired two
    releases of the same sample: how well it linked without the secret batch order."""
    if not len(matches):
        return 0.0
    pairs = truth.order.samples(matches.reshape(-1)).reshape(-1, 2)
    return float(np.mean(pairs[:, 0] == pairs[:, 1]))
PUBLIC = "public aux images only"


def private_rows(ch: dict, n_aux: int, classes: int) -> tuple[np.ndarray, str]:
    """(mask of the rows of channel `ch` to score, what they are). Evaluation rows (split
    `test`) of the public aux images, which every trainer holds, measure nothing private: only
    the private half's rows (position >= `n_aux`) are scored, when at least 2 per class were
    received; otherwise every row is, and the result says they were public images."""
    ids = np.asarray(ch["ids"])
    if ch["split"] != "test":
        return np.ones(len(ids), bool), "training samples"
    private = ids >= n_aux
    if private.sum() >= 2 * classes:
        return private, "private evaluation images"
    return np.ones(len(ids), bool), (f"{PUBLIC} ({int(private.sum())} private evaluation "
                                     f"rows kept, too few to score)")


def members_channels(attack: Attack, audit: Audit, family: str) -> dict[str, dict]:
    """For a colluding attack (one with `stages`), every channel of its members' rows already
    scored in `audit.results` (same family), named `member:channel`; {} otherwise."""
    members = getattr(attack, "stages", None)
    if not members:
        return {}
    return {f"{r['trainer']}:{name}": m for r in getattr(audit, "results", [])
            if r.get("family") == family and r.get("trainer") in members
            for name, m in (r.get("channels") or {}).items()}


def _headline(row: Row) -> tuple[str, str, str]:
    if row["channel"] is None:
        return ("no retained channel to attack", "-", "-")
    rows = (f"{row['samples']} followed samples, simulated white-box with the final weights"
            if row.get("rows_of", "").startswith("simulated") else
            f"{row['samples']} of {row['seen']} rows {row['trainer']} received")
    return (f"ARI {row['ari']:.3f}, matched accuracy {row['matched_accuracy']:.3f} on "
            f"{row['channel']} ({row['strongest']}; {rows})",
            f"chance ARI 0, matched accuracy {row['matched_accuracy_chance']:.3f}",
            f"{row['matched_accuracy'] - row['matched_accuracy_chance']:+.3f} accuracy over chance")


def _details(rows: list[Row]) -> list[str]:
    lines = ["", "### Every channel a trainer received (strongest variant each)", "",
             "| trainer | channel | variant | ARI | matched accuracy | chance | rows used | rows "
             "received | scored on |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:  # a colluding row's `member:channel` entries are the members' own lines
        for name, m in ((n, m) for n, m in r["channels"].items() if ":" not in n):
            lines.append(f"| {r['trainer']} | {name} | {m['strongest']} | {m['ari']:.3f} | "
                         f"{m['matched_accuracy']:.3f} | {m['matched_accuracy_chance']:.3f} | "
                         f"{m['samples']} | {m['seen']} | {m.get('rows_of', '-')} |")
    return lines


def _plot(ax: Any, rows: list[Row]) -> None:
    own = [(f"{r['trainer']}:{c}", m) for r in rows for c, m in r["channels"].items()
           if ":" not in c]
    names, aris = [n for n, _ in own], [m["ari"] for _, m in own]
    ax.bar(names, aris, color="tab:purple")
    ax.set_title("channels: ARI per trainer and channel")
    ax.tick_params(axis="x", labelrotation=45, labelsize=6)


def _frontier(rows: list[Row]) -> dict[str, Any]:
    top = max((r for r in rows if r["channel"]), key=lambda r: r["ari"], default=None)
    return {"channel_ari": top["ari"] if top else None,
            "channel": f"{top['trainer']}:{top['channel']}" if top else None}


CHANNELS = register(Family(CHANNELS_NAME, _score, _headline, "ari", "ARI", 3, _plot, _frontier,
                           _details, leaks="the private labels"))
