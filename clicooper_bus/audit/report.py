"""The audit report: `report.json` for machines, `report.md` for people, PNG figures, and the
side-by-side comparison of several runs. Every score is written beside its chance level or
floor; a forced audit of an unverified log says so on the report's first line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from clicooper_bus.audit import families
from clicooper_bus.audit.auditor import Audit
from clicooper_bus.layout import RunLayout, write_atomic

REPORT_JSON, REPORT_MD = "report.json", "report.md"  # in the report directory (RUN_DIR/audit)
FIGURES = ("reconstructions.png", "scores.png")


def to_json(audit: Audit) -> dict[str, Any]:
    integ = audit.integrity.to_json()
    return {
        "forced": audit.forced,
        "run_id": integ.get("run_id") or audit.run_dir.name,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "integrity": integ,
        "settings": audit.settings,
        "attacks": audit.results,
        "references": audit.references,
        "wall_s": round(audit.wall_s, 1),
    }


def headline(row: dict[str, Any]) -> tuple[str, str, str]:
    """(score, the line it must beat, verdict-free margin) of one attack, as text: its
    family's headline. Raises UnknownFamily (a ClicooperError) for an unregistered family."""
    return families.family(row["family"]).headline(row)


def epsilon_text(e: dict[str, Any] | None) -> str:
    """The privacy spent, as the auditor recomputed it, with what it holds for."""
    if not e or e.get("epsilon") is None and e.get("mechanism") in (None, "none"):
        return "epsilon: none (the releases carry no noise: no differential privacy)"
    eps = e.get("epsilon")
    text = (f"epsilon {'infinite' if eps is None else format(eps, '.4g')} at delta "
            f"{e['delta']:g} per training sample over {e['releases']} release(s), "
            f"{e['mechanism']} noise {e['noise']:.4g} per coordinate, clip {e['clip']:g}, "
            f"sensitivity {e['sensitivity']:g}; {e['method']}")
    if e.get("rdp_epsilon") is not None:
        text += f" (opacus RDP bound: {e['rdp_epsilon']:.4g})"
    text += f". Adjacency: {e['adjacency']}"
    if e.get("scope"):
        text += f". Covers: {e['scope']}"
    t = e.get("test_set")
    if t:
        eps_t = t.get("epsilon")
        text += (f". Test set (evaluated through the chain, {t['releases']} release(s)): epsilon "
                 f"{'infinite' if eps_t is None else format(eps_t, '.4g')}")
    return text


def to_markdown(doc: dict[str, Any]) -> str:
    integ, s = doc["integrity"], doc["settings"]
    lines = []
    if doc["forced"]:
        f = integ.get("failure") or {}
        lines.append(f"**WARNING: this log did NOT verify ({f.get('file', '')} "
                     f"{'' if f.get('index') is None else 'index ' + str(f['index'])}: "
                     f"{f.get('reason', '')}); the audit was forced with --force and its numbers "
                     f"describe a log that may have been tampered with.**")
    else:
        lines.append(f"Integrity: the log verified: {integ['entries']} entries, "
                     f"{integ['checkpoints']} signed checkpoints, every sender's chain, "
                     f"tree root {integ['root'][:16]}...")
    lines += ["", f"# Audit of run `{doc['run_id']}`", "",
              f"Generated {doc['generated']} in {doc['wall_s']} s.", "", "## Run", "",
              f"- {s.get('model')} on {s.get('dataset')}, cuts {s.get('cuts')}, "
              f"{s.get('epochs')} epochs, {s.get('schedule')}; test accuracy "
              f"{s.get('test_accuracy')}, "
              f"on the evaluation half {s.get('owner_accuracy_eval_half', float('nan')):.4f}",
              f"- configuration: **{s.get('configuration', 'undefended')}**",
              f"- privacy: {s.get('privacy')}; label obfuscation: {s.get('label_obfuscation')}",
              f"- {epsilon_text(s.get('epsilon'))}",
              f"- attacked: {s.get('released_samples')} released activations of epoch(s) "
              f"{s.get('released_epochs')} (retention `{s.get('retention')}`); aux data "
              f"{s.get('aux_samples')} public images (first half of the test split); "
              f"evaluation {s.get('eval_samples')} (second half); {s.get('eval_pairs')} "
              f"evaluation releases of aux images in the log",
              "", "## Integrity", "",
              f"- entries {integ['entries']}, body records {integ['body_records']}, checkpoints "
              f"{integ['checkpoints']}, uncovered entries {integ['uncovered']}",
              f"- per sender: {integ['per_sender']}"]
    lines += [f"- warning: {w}" for w in integ.get("warnings", [])]
    lines += ["", "## Attacks", "", "| attack | party | score | line to beat | margin |",
              "| --- | --- | --- | --- | --- |"]
    for row in doc["attacks"]:
        score, floor, margin = headline(row)
        lines.append(f"| {row['title']} | {row['threat_model']['party']} | {score} | {floor} | "
                     f"{margin} |")
    lines += ["", "### Threat models", ""]
    for row in doc["attacks"]:
        t = row["threat_model"]
        lines.append(f"- **{row['name']}** ({row['wall_s']} s): {t['party']}; sees "
                     f"{', '.join(t['sees'])}; aux: {t['aux']}")
    for fam in families.families():
        rows = families.rows_of(doc["attacks"], fam.name)
        if rows and fam.details is not None:
            lines += fam.details(rows)
    lines += ["", "Figures: `reconstructions.png` (originals above each attack's "
              "reconstructions), `scores.png`.", ""]
    return "\n".join(lines)


def _reconstruction_grid(audit: Audit, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["originals"] + [k for k in audit.figures if k != "originals"]
    n = len(audit.figures.get("originals", []))
    if not n:
        return
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.0), squeeze=False)
    for r, name in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = audit.figures[name][c]
            ax.imshow(img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0)),
                      cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _scores_figure(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted(families.families(), key=lambda f: f.panel)
    fig, axes = plt.subplots(1, len(fams), figsize=(13, 3.6))
    for ax, fam in zip(axes, fams, strict=True):  # left empty when none of its attacks ran
        rows = families.rows_of(doc["attacks"], fam.name)
        if rows:
            fam.plot(ax, rows)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(audit: Audit, out: Path | None = None) -> Path:
    """Write report.json, report.md and figures to `out` (default RUN_DIR/audit); atomically
    per file, so a crash never leaves half a report under the final name."""
    out = Path(out) if out else RunLayout(audit.run_dir).audit
    out.mkdir(parents=True, exist_ok=True)
    _remove_figures(out)  # an earlier audit's figures must not sit beside this report
    doc = to_json(audit)
    write_atomic(out / REPORT_JSON, json.dumps(doc, indent=2, default=_plain) + "\n")
    write_atomic(out / REPORT_MD, to_markdown(doc))
    if audit.results:
        _reconstruction_grid(audit, out / FIGURES[0])
        _scores_figure(doc, out / FIGURES[1])
    return out


def refusal_markdown(audit: Audit) -> str:
    f = audit.integrity.failure
    return (f"**REFUSED: the log did not verify; no attack was run.**\n\n"
            f"- where: {f.file if f else ''} {'' if not f or f.index is None else 'index ' + str(f.index)}\n"
            f"- reason: {f.reason if f else ''}\n\n"
            f"Repair or re-obtain the log; `clicooper audit --force` attacks it anyway and says "
            f"so on the report's first line.\n")


def write_refusal(audit: Audit, out: Path | None = None) -> Path:
    """Write the refusal's report.json and report.md to `out` (default RUN_DIR/audit),
    atomically per file, removing an earlier audit's figures. Raises OSError."""
    out = Path(out) if out else RunLayout(audit.run_dir).audit
    out.mkdir(parents=True, exist_ok=True)
    _remove_figures(out)
    doc = {"refused": True, "run_id": audit.run_dir.name, "integrity": audit.integrity.to_json()}
    write_atomic(out / REPORT_JSON, json.dumps(doc, indent=2, default=_plain) + "\n")
    write_atomic(out / REPORT_MD, refusal_markdown(audit))
    return out


def _remove_figures(out: Path) -> None:
    for name in FIGURES:
        (out / name).unlink(missing_ok=True)


def _plain(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def compare(run_dirs: list[Path], out: Path) -> Path:
    """One table and one figure over several audited runs (each needs audit/report.json)."""
    docs = []
    for d in run_dirs:
        p = RunLayout(d).audit_report
        if not p.exists():
            from clicooper_bus.errors import ClicooperError

            raise ClicooperError(f"{p} does not exist: audit the run first (`clicooper audit {d}`)")
        docs.append(json.loads(p.read_text()))
    names = [r["name"] for r in docs[0].get("attacks", [])]
    for doc in docs[1:]:
        names += [r["name"] for r in doc.get("attacks", []) if r["name"] not in names]
    out.mkdir(parents=True, exist_ok=True)
    head = ["attack"] + [f"{d['run_id']}{' (FORCED)' if d.get('forced') else ''}" for d in docs]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines.append("| test accuracy | " + " | ".join(
        f"{d.get('settings', {}).get('test_accuracy')}" for d in docs) + " |")
    lines.append("| privacy | " + " | ".join(
        f"{d.get('settings', {}).get('privacy')}" for d in docs) + " |")
    values: dict[str, list[float | None]] = {}
    for name in names:
        cells, vals = [], []
        for d in docs:
            row = next((r for r in d.get("attacks", []) if r["name"] == name), None)
            cells.append(headline(row)[0] if row else "not run")
            vals.append(None if row is None else row.get(families.family(row["family"]).metric))
        values[name] = vals
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_atomic(out / "compare.md", "# Audits side by side\n\n" + "\n".join(lines) + "\n")
    write_atomic(out / "compare.json", json.dumps({"runs": [d["run_id"] for d in docs],
                                                   "scores": values}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.2), 3.6))
    width = 0.8 / len(docs)
    for i, d in enumerate(docs):
        ys = [values[n][i] if values[n][i] is not None else 0 for n in names]
        ax.bar(np.arange(len(names)) + i * width, ys, width, label=d["run_id"])
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, fontsize=7)
    ax.set_ylabel(" / ".join(f.label for f in families.families()))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)
    return out


def audit_and_write(run_dir: Path, *, force: bool = False, owner=None,
                    witnessed: list[str] | None = None, out: Path | None = None,
                    attacks=None) -> tuple[bool, Path, dict[str, Any]]:
    """Audit a finished run and write its report. Returns (attacked, report directory, doc);
    a log that does not verify is not attacked unless `force`, and a refusal report says
    where it broke."""
    from clicooper_bus.audit.auditor import AuditRefused, audit_run

    try:
        audit = audit_run(run_dir, force=force, owner=owner, witnessed=witnessed,
                          attacks=attacks)
    except AuditRefused as exc:
        refused = Audit(Path(run_dir), exc.result, forced=False)
        where = write_refusal(refused, out)
        return False, where, json.loads((where / REPORT_JSON).read_text())
    where = write_report(audit, out)
    return True, where, to_json(audit)


def print_audit(attacked: bool, where: Path, doc: dict) -> None:
    """The report's headline lines on the console."""
    if not attacked:
        f = doc["integrity"]["failure"] or {}
        at = f" at index {f['index']}" if f.get("index") is not None else ""
        print(f"audit REFUSED: the log does not verify ({f.get('file', '')}{at}: "
              f"{f.get('reason', '')}); no attack was run. Pass --force to attack it anyway.\n"
              f"report: {where / REPORT_MD}")
        return
    if doc["forced"]:
        print("WARNING: the log did NOT verify; this audit was forced")
    s = doc["settings"]
    print(f"audit of {doc['run_id']}: log {'verified' if not doc['forced'] else 'UNVERIFIED'}, "
          f"{doc['integrity']['entries']} entries; owner accuracy {s['owner_accuracy_eval_half']:.4f} "
          f"on the evaluation half; {doc['wall_s']} s")
    for row in doc["attacks"]:
        score, floor, _ = headline(row)
        print(f"  {row['name']:<22} {score}\n  {'':<22} beside: {floor}")
    print(f"report: {where / REPORT_MD}")
