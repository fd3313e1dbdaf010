"""The documents `clicooper sweep` writes from its measured rows: the privacy frontier
(docs/PRIVACY.md and its figure) and the paper table (docs/RESULTS.md), each with the
`defended` targets judged on the measured numbers. Every number comes from a row of
`clicooper_bus.tools.sweep_rows.row` (a run's summary and audit report); nothing is typed in.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clicooper_bus.errors import ConfigError
from clicooper_bus.layout import write_atomic

if TYPE_CHECKING:
    from clicooper_bus.tools.sweep import Grid

# The CliCooper paper's headline claims (arXiv 2603.08421), for the paper table.
PAPER = {"clustering_success": 0.0, "ssim_undefended": 0.50, "ssim_defended": 0.03,
         "extraction": "about chance", "accuracy": "preserved", "watermark": "> 99 % detection"}
# The targets for the recommended `defended` configuration (issue 15), each judged on the
# strongest view: label inference over every channel a trainer receives, all trainers
# colluding; extraction as its gain over what the attackers' own data alone gives.
TARGETS = {"accuracy_drop": 0.03, "owner_share": 0.15, "ari": 0.05, "matched_over_chance": 0.05,
           "ssim_over_class_mean": 0.02, "extraction_50_gain": 0.10}
# a control arm within this of the fine-tuned accuracy: the trainers contributed nothing
CONTROL_MATCHES = 0.01


def judge(r: dict[str, Any], baseline: dict[str, Any] | None) -> list[tuple[str, str, bool]]:
    """The `defended` targets, each with the measured value and whether it is met (one not
    measured in `r` is left out)."""
    t = TARGETS
    checks = []
    if baseline is not None:
        drop = baseline["accuracy"] - r["accuracy"]
        checks.append((f"accuracy within {t['accuracy_drop'] * 100:.0f} points of undefended",
                       f"{r['accuracy']:.4f} vs {baseline['accuracy']:.4f} ({-drop * 100:+.1f} "
                       f"points)", drop <= t["accuracy_drop"]))
    if r.get("owner_share") is not None:
        checks.append((f"owner's share of the training FLOPs <= {t['owner_share']:.0%}",
                       f"{r['owner_share']:.1%}", r["owner_share"] <= t["owner_share"]))
    if r.get("control_accuracy") is not None:
        gap = r["accuracy"] - r["control_accuracy"]
        checks.append(("the trainers contribute: the fine-tune's control arm (untrained stages) "
                       f"more than {CONTROL_MATCHES * 100:.0f} point below",
                       f"control {r['control_accuracy']:.4f} ({-gap * 100:+.1f} points)",
                       gap > CONTROL_MATCHES))
    li = r.get("label_colluding") or {}
    if li.get("ari") is not None:
        checks.append((f"label inference over every channel, trainers colluding: ARI <= "
                       f"{t['ari']}", f"{li['ari']:.3f} ({r['label_colluding_where']})",
                       li["ari"] <= t["ari"]))
    if li.get("matched_over_chance") is not None:
        checks.append((f"... matched accuracy <= chance + {t['matched_over_chance'] * 100:.0f} "
                       f"points", f"{li['matched_over_chance'] * 100:+.1f} points",
                       li["matched_over_chance"] <= t["matched_over_chance"]))
    if r.get("ssim_over_class_mean") is not None:
        checks.append((f"no inversion more than {t['ssim_over_class_mean']} SSIM above the "
                       f"class-mean line", f"{r['ssim_over_class_mean']:+.3f}",
                       r["ssim_over_class_mean"] <= t["ssim_over_class_mean"]))
    gain = extraction_gain(r)
    if gain is not None:
        checks.append((f"extraction with 50 labels <= own-data baseline + "
                       f"{t['extraction_50_gain'] * 100:.0f} points",
                       f"{r['extraction']['extraction-50']:.3f} (own data "
                       f"{r['extraction_baseline']['extraction-50']:.3f}, {gain * 100:+.1f} "
                       f"points)", gain <= t["extraction_50_gain"]))
    covers = f"; covers {r['epsilon_covers']}" if r.get("epsilon") is not None else ""
    label = f"; labels {_label_eps(r)}" if r.get("label_epsilon") is not None else ""
    checks.append(("epsilon reported with its adjacency",
                   _eps(r) + (f" ({r['adjacency'].split(':')[0]}{covers})" if r.get("adjacency")
                              else "") + label,
                   r.get("epsilon") is not None or r.get("label_epsilon") is not None))
    return checks


def _label_eps(r: dict[str, Any]) -> str:
    e = r.get("label_epsilon")
    return "-" if e is None else f"{e:.3g} (label-DP of the transcript, randomised response)"


def extraction_gain(r: dict[str, Any]) -> float | None:
    """Extraction with 50 labels over the best own-data baseline with the same 50 labels."""
    got = (r.get("extraction") or {}).get("extraction-50")
    base = (r.get("extraction_baseline") or {}).get("extraction-50")
    return None if got is None or base is None else got - base


def label_cell(r: dict[str, Any], key: str) -> str:
    """A threat model's strongest label inference: ARI, matched accuracy over chance, where."""
    li = r.get(key) or {}
    if li.get("ari") is None:
        return "-"
    return (f"ARI {_m(r, f'{key}.ari')}, matched accuracy {_m(r, f'{key}.matched_over_chance', '+.3f')} "
            f"over chance ({r[f'{key}_where']})")


def _eps(r: dict[str, Any]) -> str:
    e = r.get("epsilon")
    if e is None:
        return "none (no noise)"
    if isinstance(e, float) and not math.isfinite(e):
        return "infinite"
    return f"{e:.3g} (delta {r['delta']:g})"


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _m(r: dict[str, Any], key: str, fmt: str = ".3f") -> str:
    """A row's number, with its range over the seeds when it ran with several: `key` is a
    field, or "field.attack" inside a per-attack map."""
    outer, _, inner = key.partition(".")
    v = (r.get(outer) or {}).get(inner) if inner else r.get(key)
    lo_hi = (r.get("spread") or {}).get(key)
    if v is None or not lo_hi:
        return _f(v, fmt)
    return f"{format(v, fmt)} ({format(lo_hi[0], fmt)} to {format(lo_hi[1], fmt)})"


def seeds_line(rows: list[dict[str, Any]]) -> list[str]:
    """The sentence that says how many seeds each configuration ran with, if any ran several."""
    n = sorted({r.get("seeds", 1) for r in rows})
    if n == [1]:
        return []
    return [f"Seeds: each configuration ran {' or '.join(map(str, n))} time(s), the training "
            f"seed and the run key varying; with several, a number is the mean and its range "
            f"over the seeds follows in brackets.", ""]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    inv = sorted({n for r in rows for n in r["ssim"]})
    head = (["run", "defences", "epochs", "accuracy", "split / control accuracy",
             "owner's FLOPs", "label epsilon",
             "label inference ARI, every channel: one trainer / colluding",
             "first stage's activations: ARI (strongest)", "success"]
            + [f"SSIM {n}" for n in inv]
            + ["best SSIM - mean image", "best non-class-mean SSIM - class mean",
               "extraction 0 / 10 / 50 labels", "extraction-50 over own data", "epsilon"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"`{r['name']}`", r["defence"], str(r["epochs"]), _m(r, "accuracy", ".4f"),
                 f"{_m(r, 'split_accuracy', '.4f')} / {_m(r, 'control_accuracy', '.4f')}",
                 _f(r.get("owner_share"), ".1%"), _f(r.get("label_epsilon"), ".3g"),
                 f"{_m(r, 'label_alone.ari')} / {_m(r, 'label_colluding.ari')}",
                 f"{_m(r, 'ari')} ({r['ari_variant']})",
                 "-" if r["success"] is None else f"{r['success'] * 100:.0f} %"]
        cells += [_m(r, f"ssim.{n}") for n in inv]
        cells += [_f(r.get("ssim_over_mean_image"), "+.3f"), _f(r.get("ssim_over_class_mean"), "+.3f"),
                  " / ".join(_m(r, f"extraction.{k}") for k in ("extraction-unlabelled",
                                                                 "extraction-10", "extraction-50")),
                  _f(extraction_gain(r), "+.3f"), _eps(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _floors(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    fl = r["floors"]
    return (f"Lines to read the table by (first run's samples): mean aux image SSIM "
            f"{fl.get('mean_image', float('nan')):.3f}, all-black {fl.get('black', float('nan')):.3f}, "
            f"true class mean {fl.get('class_mean', float('nan')):.3f}; raw-pixel clustering ARI "
            f"{_f(r['ari_raw_pixels'])}; extraction chance {_f(r['extraction_chance'])}.")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [(lambda r: (r.get("label_colluding") or {}).get("ari"),
               "label inference ARI, every channel, trainers colluding", TARGETS["ari"]),
              (lambda r: r.get("ssim_over_class_mean"), "best inversion SSIM - class-mean line",
               TARGETS["ssim_over_class_mean"]),
              (extraction_gain, "extraction with 50 labels - own-data baseline",
               TARGETS["extraction_50_gain"])]
    for ax, (measured, label, target) in zip(axes, panels, strict=True):
        for r in rows:
            y = measured(r)
            if y is None:
                continue
            ax.scatter(y, r["accuracy"], s=40)
            ax.annotate(r["name"], (y, r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axvline(target, color="grey", linestyle="--", linewidth=1)
        ax.text(target, ax.get_ylim()[0], " target", color="grey", fontsize=7, va="bottom")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("Accuracy against what the auditor's strongest attacks recover (upper left is "
                 "best: accurate, and left of the dashed target line)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def source_line(grid: Grid, command: str) -> str:
    """Where a document's numbers come from: the grid's run directories, or the rows recorded
    beside the document by the same settings and auditor (`tools/sweep_record.py`)."""
    from clicooper_bus.tools.sweep_record import auditor_fingerprint, record_path

    return (f"Generated by `{command}` from the runs in `{relative(grid.out)}`, each trained over "
            f"the bus and audited, or, for a run whose directory is not on this machine, from "
            f"its row in `{relative(record_path(grid.doc))}`, recorded with the same settings "
            f"and the same auditor (fingerprint {auditor_fingerprint()[:16]}); "
            f"{time.strftime('%Y-%m-%d')}. The tables and the figure are not typed in by hand "
            f"(rerun the command to reproduce them); the findings under them are.")


def write_frontier(grid: Grid, rows: list[dict[str, Any]], command: str) -> None:
    fig = grid.doc.with_suffix(".png")
    plot(rows, fig)
    base = next((r for r in rows if r["name"] == "undefended"), None)
    lines = [
        "# Privacy frontier",
        "",
        source_line(grid, command),
        "",
        "Accuracy is the owner's test accuracy; with `evaluate = \"owner\"` it is the delivered "
        "model's (head, clip, stages, tail: no noise) on the whole test set. With the owner's "
        "fine-tune (`finetune_epochs`) it is the fine-tuned model's, the split-trained one's "
        "beside it, and the control arm's: the same fine-tune from untrained weights, what the "
        "owner reaches without the trainers. The owner's share of the training FLOPs counts its "
        "head and tail at every step and its fine-tune (the control arm is a measurement, not "
        "counted). The label epsilon is randomised response's: pure label-DP of every message "
        "of the run (one sample's label changed), each label drawn once. Label inference is "
        "the strongest ARI over every channel a trainer receives (activations, gradients, labels, "
        "evaluation traffic; clustering, gradient clustering and model completion), for one "
        "trainer alone and for all trainers colluding; the first stage's ARI is the strongest "
        "clustering variant's on its received activations alone; each SSIM is over 500 "
        "reconstructions; the class-mean attacker scores what class information alone gives, so "
        "an attack above the class-mean line recovers detail beyond the class. Extraction is the "
        "colluding trainers' surrogate on the evaluation half of the test set. Epsilon is per "
        "training sample (replace-one adjacency, sensitivity 2 x clip in the clip's norm). The "
        "noise is exact integer noise on the lattice clip x 2^-20 (`ml/privacy/lattice.py`; the "
        "discrete distributions of Canonne, Kamath and Steinke 2020), with nothing left "
        "unaccounted: Gaussian is the "
        "discrete Gaussian, rho-zCDP with rho = releases x (2 clip)^2 / (2 sigma^2), converted "
        "to (epsilon, delta) at the best Renyi order; Laplace is the discrete Laplace, pure 2 clip "
        "/ b per release, the smaller of pure composition and its zCDP conversion. It bounds "
        "the whole run only with `once` (the head is fixed); with `per-step` the "
        "head trains on raw images without DP and the epsilon covers each sample's own releases "
        "only, so it is not a differential-privacy guarantee for the run.",
        "",
        *_table(rows),
        "",
        *seeds_line(rows),
        _floors(rows),
        "",
        f"![accuracy against attack success]({fig.name})",
        "",
    ]
    if base is not None:
        # every target any row is judged on (the control arm's only where one ran), in order
        targets = list(dict.fromkeys(c[0] for r in [base, *rows] for c in judge(r, base)))
        lines += ["## Against the `defended` targets", "",
                  "| configuration | " + " | ".join(targets) + " |",
                  "|" + " --- |" * (1 + len(targets))]
        for r in rows:
            if r is base:
                continue
            got = {t: (v, ok) for t, v, ok in judge(r, base)}
            lines.append(f"| `{r['name']}` | " + " | ".join(
                f"{'met' if got[t][1] else 'MISSED'}: {got[t][0]}" if t in got else "not measured"
                for t in targets) + " |")
        lines.append("")
    if grid.notes:
        lines += ["## Findings", "", grid.notes, ""]
    grid.doc.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(grid.doc, "\n".join(lines))


def write_results(grid: Grid, rows: list[dict[str, Any]], command: str) -> None:
    by = {r["name"]: r for r in rows}
    missing = {"undefended", "paper", "defended"} - set(by)
    if missing:
        raise ConfigError(f"{grid.path}: the paper table needs runs named undefended, paper and "
                          f"defended (missing {sorted(missing)})")
    u, p, d = by["undefended"], by["paper"], by["defended"]

    def inv(r: dict[str, Any]) -> str:
        return f"{r['ssim_max']:.3f} ({r['ssim_max_attack']})" if "ssim_max" in r else "-"

    def ex(r: dict[str, Any]) -> str:
        return (" / ".join(_m(r, f"extraction.{k}") for k in ("extraction-unlabelled",
                                                             "extraction-10", "extraction-50"))
                + f" (chance {_f(r['extraction_chance'])})")

    def gain(r: dict[str, Any]) -> str:
        g = extraction_gain(r)
        return "-" if g is None else (f"{g * 100:+.1f} points (own data "
                                      f"{_m(r, 'extraction_baseline.extraction-50')})")

    table = [
        "| | CliCooper paper (reported) | undefended (ours) | paper configuration (ours) | "
        "defended (ours) |",
        "| --- | --- | --- | --- | --- |",
        f"| test accuracy | {PAPER['accuracy']} | {_m(u, 'accuracy', '.4f')} | "
        f"{_m(p, 'accuracy', '.4f')} | {_m(d, 'accuracy', '.4f')} |",
        f"| test accuracy of the split-trained model / of the fine-tune's control arm (untrained "
        f"stages) | - | {_split(u)} | {_split(p)} | {_split(d)} |",
        f"| owner's share of the training FLOPs | - | {_m(u, 'owner_share', '.1%')} | "
        f"{_m(p, 'owner_share', '.1%')} | {_m(d, 'owner_share', '.1%')} |",
        f"| clustering of the first stage's activations: success rate (ARI, strongest variant) "
        f"| {PAPER['clustering_success']:.0%} | "
        f"{_cl(u)} | {_cl(p)} | {_cl(d)} |",
        f"| inversion: best SSIM over all attacks (attack) | {PAPER['ssim_undefended']} -> "
        f"{PAPER['ssim_defended']} | {inv(u)} | {inv(p)} | {inv(d)} |",
        f"| inversion: best non-class-mean SSIM - class-mean line | - | "
        f"{_f(u.get('ssim_over_class_mean'), '+.3f')} | {_f(p.get('ssim_over_class_mean'), '+.3f')} | "
        f"{_f(d.get('ssim_over_class_mean'), '+.3f')} |",
        f"| label inference, strongest over every channel: one trainer alone (the paper's threat "
        f"model) | {PAPER['clustering_success']:.0%} clustering success | "
        f"{label_cell(u, 'label_alone')} | {label_cell(p, 'label_alone')} | "
        f"{label_cell(d, 'label_alone')} |",
        f"| label inference, strongest over every channel: all trainers colluding | - | "
        f"{label_cell(u, 'label_colluding')} | {label_cell(p, 'label_colluding')} | "
        f"{label_cell(d, 'label_colluding')} |",
        f"| extraction accuracy, 0 / 10 / 50 labels | {PAPER['extraction']} | {ex(u)} | {ex(p)} | "
        f"{ex(d)} |",
        f"| extraction with 50 labels over the attackers' own-data baseline | - | {gain(u)} | "
        f"{gain(p)} | {gain(d)} |",
        f"| epsilon (delta) | - | {_eps(u)} | {_eps(p)} | {_eps(d)} |",
        f"| epsilon covers | - | - | {p['epsilon_covers'] if p.get('epsilon') else '-'} | "
        f"{d['epsilon_covers'] if d.get('epsilon') else '-'} |",
        f"| defences | - | {u['defence']} | {p['defence']} | {d['defence']} |",
        f"| epochs | - | {u['epochs']} | {p['epochs']} | {d['epochs']} |",
    ]
    verdict = ["| target | measured | |", "| --- | --- | --- |"] + [
        f"| {t} | {v} | {'met' if ok else '**missed**'} |" for t, v, ok in judge(d, u)]
    lines = [
        "# Results: the CliCooper paper's headline rows beside ours",
        "",
        source_line(grid, command) + " Configurations: `configs/undefended.toml`, "
        "`configs/paper.toml`, `configs/defended.toml` (with the overrides of "
        f"`{relative(grid.path)}`); each run's `audit/report.json` names its configuration.",
        "",
        *table,
        "",
        *seeds_line(rows),
        _floors(rows),
        "",
        "## The `defended` configuration against its targets",
        "",
        *verdict,
        "",
    ]
    if grid.notes:
        lines += ["## Findings", "", grid.notes, ""]
    grid.doc.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(grid.doc, "\n".join(lines))


def _split(r: dict[str, Any]) -> str:
    control = "-" if r.get("control_accuracy") is None else _m(r, "control_accuracy", ".4f")
    return f"{_m(r, 'split_accuracy', '.4f')} / {control}"


def _cl(r: dict[str, Any]) -> str:
    return "-" if r.get("ari") is None else f"{r['success']:.0%} ({r['ari']:.3f})"


def relative(p: Path) -> str:
    """`p` relative to the working directory when it lies under it, else as given."""
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)
