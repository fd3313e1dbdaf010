"""The audit report: `report.json` for machines, `report.md` for people, PNG figures, and the
side-by-side comparison of several runs. Every score is written beside its chance level or
floor; a forced audit of an unverified log says so on the report's first line. `report.md`
opens with its findings: each family's verdict (from the family's own rule) per attacking party,
and every broken attack named as such."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clicooper_bus.audit import families, figures
from clicooper_bus.audit.auditor import Audit
from clicooper_bus.audit.families import Family, Row
from clicooper_bus.audit.training_replay import replay_markdown
from clicooper_bus.layout import RunLayout, write_atomic

REPORT_JSON, REPORT_MD = "report.json", "report.md"  # in the report directory (RUN_DIR/audit)
FIGURES = (figures.RECONSTRUCTIONS, figures.SCORES, figures.TRAINING)


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
        "findings": findings(audit.results),
        "training_replay": audit.replay,
    }


def headline(row: dict[str, Any]) -> tuple[str, str, str]:
    """(score, the line it must beat, verdict-free margin) of one attack, as text: its
    family's headline. Raises UnknownFamily (a ClicooperError) for an unregistered family."""
    return families.family(row["family"]).headline(row)


def _party(row: Row) -> str:
    return (row.get("threat_model") or {}).get("party", "an unnamed party")


def _finding(fam: Family, row: Row) -> dict[str, str]:
    """One finding: the family's verdict on `row`, with its headline, in words."""
    word, why = fam.verdict(row)
    score, line, margin = fam.headline(row)
    return {"verdict": word, "reason": why, "family": fam.name, "attack": row["name"],
            "party": _party(row), "leaks": fam.leaks or row.get("title", fam.name),
            "score": score, "line_to_beat": line, "margin": margin}


def findings(attacks: list[Row]) -> list[dict[str, str]]:
    """The report's judgement of `attacks`: per family that ran (in registration order) and
    attacking party, its strongest working attack, then each broken attack of that party."""
    out = []
    for fam in families.families():
        rows = families.rows_of(attacks, fam.name)
        for party in dict.fromkeys(_party(r) for r in rows):
            mine = [(r, fam.verdict(r)[0] == families.BROKEN) for r in rows if _party(r) == party]
            working = [r for r, broken in mine if not broken]
            if working:
                out.append(_finding(fam, families.strongest(fam, working)))
            out += [_finding(fam, r) for r, broken in mine if broken]
    return out


def findings_markdown(found: list[dict[str, str]], forced: bool = False,
                      first: Sequence[str] = ()) -> list[str]:
    """The Findings block: the lines `first` (a stage's replay divergence), then a line per
    finding, verdict first, each score beside its line."""
    lines = ["## Findings", "",
             f"One line per attack family and attacking party (its strongest working attack) "
             f"and per broken attack. Each score is judged against the line it must beat "
             f"(scores are attack success: for the defence, lower is better): "
             f"**{families.LEAKS}** (clearly over it), **{families.CLASS_ONLY}** (an inversion "
             f"over the floor, not over the true class mean), **{families.WEAK}** (over it, only "
             f"just), **{families.AT_CHANCE}** / **{families.AT_FLOOR}** (within noise: three "
             f"binomial standard deviations for accuracies, at least {families.MIN_MARGIN}), "
             f"**{families.NO_GAIN}** (an extraction no better than the attackers' own data "
             f"gives), **{families.BELOW_FLOOR}** (a weak attack), **{families.BROKEN}** (degenerate "
             f"output: its score is a floor by construction, not a measurement), "
             f"**{families.NOT_RUN}**.", ""]
    if forced:
        lines += ["These findings describe a log that did NOT verify (see the first line).", ""]
    lines += first
    for f in found:
        line = "" if f["line_to_beat"] in ("", "-") else f" against {f['line_to_beat']}"
        margin = "" if f["margin"] in ("", "-") else f" ({f['margin']})"
        lines.append(f"- **{f['verdict']}**: {f['party']}; target: {f['leaks']} ({f['family']}, "
                     f"`{f['attack']}`): {f['score']}{line}{margin}. Why: {f['reason']}.")
    return lines + (["- no attack was run."] if not found else []) + [""]


def figures_markdown(names: Sequence[str]) -> list[str]:
    """The figures written beside report.md, embedded, each under its caption."""
    if not names:
        return []
    lines = ["", "## Figures", ""]
    for name in names:
        lines += [f"{figures.CAPTIONS.get(name, name)}:", "", f"![{name}]({name})", ""]
    return lines


def cpu_text(cpu: dict[str, Any] | None) -> str:
    """The owner's measured share of the training CPU, in words, with every process's CPU
    seconds per step, from the signed usage messages the auditor read in the log."""
    if not cpu:
        return "no measured CPU (an audit from before usage reports)"
    rows = ", ".join(f"{r['name']} {r['train_cpu_s']:.2f} s" + (
        f" ({r['cpu_s_per_step'] * 1e3:.1f} ms/step over {r['steps']} steps)"
        if r.get("cpu_s_per_step") is not None else "") for r in cpu["processes"])
    missing = f"; no usage message from {', '.join(cpu['missing'])}" if cpu["missing"] else ""
    if cpu.get("implausible"):
        missing += (f"; step counts that are not the owner's from "
                    f"{', '.join(cpu['implausible'])}")
    share = cpu.get("owner_cpu_share")
    head = (f"{share:.1%} of the training CPU, as self-reported" if share is not None
            else "an unknown share of the training CPU")
    return (f"{head} (the owner's over the owner's and the trainers'; CPU seconds over each "
            f"process's training steps, each process's own signed claim in the log's usage "
            f"messages, which the auditor cannot check: the FLOPs share is the one it can; "
            f"{rows or 'none'}{missing})")


def simulated_text(sim: dict[str, Any]) -> str:
    """The report's line on the white-box simulated channels (`audit.simulated`)."""
    chans = "; ".join(f"`{c['channel']}` ({c['samples']} samples, epoch(s) {c['epochs']})"
                      for c in sim["channels"])
    return (f"- simulated, in every trainer's channels: {chans}, because {sim['why']}; "
            f"{sim['how']} (the final weights stand in for every epoch's: at least as strong "
            f"as what was sent; read beside the retained channels)")


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


def to_markdown(doc: dict[str, Any], figure_files: Sequence[str] = ()) -> str:
    """report.md: the integrity line (a forced audit's warning) first, the title, the
    findings, then the run, the integrity details, every attack and the figures embedded
    (`figure_files`: those written beside it)."""
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
              f"Generated {doc['generated']} in {doc['wall_s']} s.", ""]
    replayed = doc.get("training_replay")
    # a stage that did not compute what it sent comes first: its numbers are not the run's
    diverged = [f"- **DIVERGES**: {r['line']}" for r in replayed or [] if not r["ok"]]
    lines += findings_markdown(findings(doc["attacks"]), doc["forced"], diverged)
    lines += ["## Run", "",
              f"- {s.get('model')} on {s.get('dataset')}, cuts {s.get('cuts')}, "
              f"{s.get('epochs')} epochs, {s.get('schedule')}; test accuracy "
              f"{s.get('test_accuracy')}, "
              f"on the evaluation half {s.get('owner_accuracy_eval_half', float('nan')):.4f}",
              f"- configuration: **{s.get('configuration', 'undefended')}**",
              f"- compute: the owner did {s.get('owner_flops_share', float('nan')):.1%} of the "
              f"training FLOPs (from the signed plan, `clicooper plan`) and "
              f"{cpu_text(s.get('cpu'))}",
              f"- privacy: {s.get('privacy')}; label obfuscation: {s.get('label_obfuscation')}",
              f"- {epsilon_text(s.get('epsilon'))}",
              f"- attacked: {s.get('released_samples')} released activations of epoch(s) "
              f"{s.get('released_epochs')} (retention `{s.get('retention')}`); aux data "
              f"{s.get('aux_samples')} public images (first half of the test split); "
              f"evaluation {s.get('eval_samples')} (second half); {s.get('eval_pairs')} "
              f"evaluation releases of aux images in the log",
              *([simulated_text(doc["references"]["simulated"])]
                if (doc.get("references") or {}).get("simulated") else []),
              *([f"- the run's config.toml does not set {', '.join(s['config_defaulted'])} "
                 f"(written by an older version): audited with today's defaults for them"]
                if s.get("config_defaulted") else []),
              "", "## Integrity", "",
              f"- entries {integ['entries']}, body records {integ['body_records']}, checkpoints "
              f"{integ['checkpoints']}, uncovered entries {integ['uncovered']}",
              f"- per sender: {integ['per_sender']}"]
    lines += [f"- warning: {w}" for w in integ.get("warnings", [])]
    lines += ["", "## Attacks", "", "| attack | party | score | line to beat | margin | verdict |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in doc["attacks"]:
        score, floor, margin = headline(row)
        lines.append(f"| {row['title']} | {row['threat_model']['party']} | {score} | {floor} | "
                     f"{margin} | {families.family(row['family']).verdict(row)[0]} |")
    lines += ["", "### Threat models", ""]
    for row in doc["attacks"]:
        t = row["threat_model"]
        used = (f"; used {row['samples']} of the {row['seen']} rows that party received"
                if row.get("seen") and "samples" in row else "")
        lines.append(f"- **{row['name']}** ({row['wall_s']} s): {t['party']}; sees "
                     f"{', '.join(t['sees'])}; aux: {t['aux']}{used}")
    for fam in families.families():
        rows = families.rows_of(doc["attacks"], fam.name)
        if rows and fam.details is not None:
            lines += fam.details(rows)
    if replayed is not None:
        lines += ["", *replay_markdown(replayed)]
    lines += figures_markdown(figure_files) or [""]
    return "\n".join(lines)


def write_report(audit: Audit, out: Path | None = None) -> Path:
    """Write report.json, report.md and figures to `out` (default RUN_DIR/audit); atomically
    per file, so a crash never leaves half a report under the final name."""
    out = Path(out) if out else RunLayout(audit.run_dir).audit
    out.mkdir(parents=True, exist_ok=True)
    _remove_figures(out)  # an earlier audit's figures must not sit beside this report
    doc = to_json(audit)
    write_atomic(out / REPORT_JSON, json.dumps(doc, indent=2, default=_plain) + "\n")
    written = [name for name, wrote in (
        (figures.TRAINING, figures.training_curve(audit.summary, out / figures.TRAINING)),
        (figures.SCORES, figures.scores_figure(doc["attacks"], out / figures.SCORES)),
        (figures.RECONSTRUCTIONS,
         figures.reconstruction_grid(audit.figures, out / figures.RECONSTRUCTIONS))) if wrote]
    write_atomic(out / REPORT_MD, to_markdown(doc, written))
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
    figures.compare_figure(names, values, [d["run_id"] for d in docs], out / "compare.png")
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
    if not audit.forced:  # replay reads only a log that verified
        audit.replay = replay_and_mark(Path(run_dir))
    where = write_report(audit, out)
    return True, where, to_json(audit)


def replay_and_mark(run_dir: Path) -> list[dict[str, Any]]:
    """Every stage of the run replayed from its log (`audit.training_replay`); the verdicts
    also go into its provenance bundle (`replay.json`), where `clicooper model verify` reads
    them. Returns the rows."""
    from clicooper_bus.audit.model_replay import record
    from clicooper_bus.audit.training_replay import verify_training

    rows = [v.to_json() for v in verify_training(run_dir)]
    layout = RunLayout(run_dir)
    bundle = layout.provenance
    if bundle.root.is_dir():
        run_id = json.loads(bundle.manifest.read_text())["run_id"]
        write_atomic(bundle.replay, json.dumps(record(bundle, run_id, rows), indent=1) + "\n")
    return rows


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
        word = families.family(row["family"]).verdict(row)[0]
        print(f"  {row['name']:<22} {score}\n  {'':<22} beside: {floor}\n  {'':<22} {word}")
    print(f"report: {where / REPORT_MD}")
