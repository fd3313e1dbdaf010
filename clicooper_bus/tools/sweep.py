"""`clicooper sweep GRID`: run a grid of privacy configurations end to end, audit every run,
and write the frontier (docs/PRIVACY.md) or the paper table (docs/RESULTS.md).

A grid is a TOML file:

    base = "configs/undefended.toml"     # config every run starts from (relative to the grid)
    out = "runs/sweep"                   # where the runs go (one directory per run name)
    doc = "docs/PRIVACY.md"              # what to write
    kind = "frontier"                    # or "results" (the paper table)
    attacks = ""                         # optional: only these attacks (default: all)
    notes = '''...'''                    # optional: findings, printed under the tables
    [all.run]                            # sections applied to every run (before its own)
    epochs = 3
    [[run]]
    name = "gaussian-0.1"                # run id, and the configuration's name in reports
    config = "configs/paper.toml"        # optional: another base for this run
    privacy = { mechanism = "gaussian", noise_multiplier = 0.1 }   # any section's keys

Every run goes over the bus like `clicooper run --audit` (separate processes, free ports, a
following auditor). A run whose audit report exists is reused, so an interrupted sweep resumes
where it stopped (`--fresh` reruns everything); nothing is written to the document that was not
measured by a run in `out`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clicooper_bus.errors import ClicooperError, ConfigError

# The CliCooper paper's headline claims (arXiv 2603.08421), for the paper table.
PAPER = {"clustering_success": 0.0, "ssim_undefended": 0.50, "ssim_defended": 0.03,
         "extraction": "about chance", "accuracy": "preserved", "watermark": "> 99 % detection"}
# The issue's targets for the recommended `defended` configuration.
TARGETS = {"accuracy_drop": 0.03, "ari": 0.05, "success": 0.0, "ssim_over_class_mean": 0.02,
           "extraction_50_over_chance": 0.10}
SECTIONS = ("run", "data", "model", "participants", "bus", "log", "watermark", "privacy")


@dataclass
class Entry:
    name: str
    config: Path
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Grid:
    path: Path
    out: Path
    doc: Path
    kind: str
    runs: list[Entry]
    attacks: str = ""  # comma-separated attack names; empty: the auditor's whole suite
    notes: str = ""  # findings written by hand about these runs, placed under the tables


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"grid file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"grid file {path} is not valid TOML: {exc}") from None
    unknown = set(raw) - {"base", "out", "doc", "kind", "attacks", "notes", "all", "run"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; a grid has base, out, doc, "
                          f"kind, attacks, [all] and [[run]] tables")
    attacks = raw.get("attacks", "")
    if attacks:
        from clicooper_bus.ml.attacks import select

        select(attacks)  # an unknown name fails here, before any run
    common = raw.get("all", {})
    if set(common) - set(SECTIONS):
        raise ConfigError(f"{path}: [all] may hold config sections only ({', '.join(SECTIONS)})")
    kind = raw.get("kind", "frontier")
    if kind not in ("frontier", "results"):
        raise ConfigError(f"{path}: kind must be frontier or results, got {kind!r}")
    root = Path.cwd()
    base = raw.get("base")
    runs, names = [], set()
    for i, r in enumerate(raw.get("run", [])):
        name = r.get("name")
        if type(name) is not str or not name:
            raise ConfigError(f"{path}: [[run]] number {i + 1} needs a name")
        if name in names:
            raise ConfigError(f"{path}: run name {name!r} appears twice")
        from clicooper_bus.net.identity import check_name

        try:  # it becomes a directory name and a run id
            check_name(name, "run name")
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        names.add(name)
        bad = set(r) - {"name", "config", *SECTIONS}
        if bad:
            raise ConfigError(f"{path}: run {name!r} has unknown keys {sorted(bad)}; use "
                              f"config sections ({', '.join(SECTIONS)})")
        cfg = r.get("config", base)
        if not cfg:
            raise ConfigError(f"{path}: run {name!r} has no config and the grid no base")
        over = {s: {**common.get(s, {}), **r.get(s, {})} for s in SECTIONS
                if s in r or s in common}
        runs.append(Entry(name, root / cfg, over))
    if not runs:
        raise ConfigError(f"{path}: the grid has no [[run]] tables")
    return Grid(path, root / raw.get("out", "runs/sweep"), root / raw.get("doc", "docs/PRIVACY.md"),
                kind, runs, attacks, str(raw.get("notes", "")).strip())


def _overrides(entry: Entry, out: Path) -> dict[str, dict[str, Any]]:
    over = {k: dict(v) for k, v in entry.overrides.items()}
    over.setdefault("run", {}).update({"id": entry.name, "out_dir": str(out)})
    if "name" not in entry.overrides.get("privacy", {}):  # reports call it by the run's name
        over.setdefault("privacy", {})["name"] = entry.name
    return over


def run_entry(entry: Entry, out: Path, fresh: bool = False, attacks: str = "") -> Path:
    """Run and audit one configuration (or reuse a finished one); returns its run directory."""
    from clicooper_bus.tools.run import run

    run_dir = out / entry.name
    report = run_dir / "audit" / "report.json"
    made_with = _made_with(entry, attacks)
    recorded = run_dir / "sweep-entry.json"
    if report.exists() and not fresh:
        if not recorded.exists():
            print(f"sweep: {entry.name}: reusing {run_dir} (it does not record the settings it "
                  f"was made with; --fresh reruns it)", flush=True)
            return run_dir
        if json.loads(recorded.read_text()) == made_with:
            print(f"sweep: {entry.name}: reusing {run_dir}", flush=True)
            return run_dir
        print(f"sweep: {entry.name}: the grid changed since {run_dir} was made: rerunning",
              flush=True)
    if run_dir.exists():
        what = "an older run in" if report.exists() else "the unfinished"
        print(f"sweep: {entry.name}: removing {what} {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    print(f"sweep: {entry.name}: running {entry.config} with {entry.overrides}", flush=True)
    t0 = time.perf_counter()
    code = run(str(entry.config), audit=attacks or True, overrides=_overrides(entry, out))
    if code != 0 or not report.exists():
        raise ClicooperError(f"run {entry.name} failed (exit {code}); see {run_dir}/telemetry")
    recorded.write_text(json.dumps(made_with, indent=1, sort_keys=True) + "\n")
    print(f"sweep: {entry.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def _made_with(entry: Entry, attacks: str) -> dict[str, Any]:
    """What a run of this entry depends on: its config file's bytes, overrides and attacks."""
    import hashlib

    return {"config": str(entry.config),
            "config_sha256": hashlib.sha256(entry.config.read_bytes()).hexdigest(),
            "overrides": entry.overrides, "attacks": attacks}


def row(run_dir: Path) -> dict[str, Any]:
    """One line of the frontier, from a run's summary and audit report."""
    summary = json.loads((run_dir / "summary.json").read_text())
    report = json.loads((run_dir / "audit" / "report.json").read_text())
    if report.get("refused") or report.get("forced"):
        raise ClicooperError(f"the audit of {run_dir} was refused or forced: not a measurement")
    by = {a["name"]: a for a in report["attacks"]}
    st = report["settings"]
    inv = {a["name"]: a for a in report["attacks"] if a["family"] == "inversion"}
    floors = next(iter(inv.values()))["floors"] if inv else {}
    eps = st.get("epsilon") or {}
    cl = by.get("clustering", {})
    out = {
        "name": run_dir.name, "configuration": st.get("configuration"),
        "defence": _defence(st.get("privacy_settings") or {}),
        "privacy": st.get("privacy"), "labels": st.get("label_obfuscation"),
        "epochs": summary["epochs"], "accuracy": summary["test_accuracy"],
        "ari": cl.get("ari"), "ari_variant": cl.get("strongest"),
        "success": cl.get("success_rate"),
        "ari_raw_pixels": (cl.get("reference_raw_pixels") or {}).get("ari"),
        "ssim": {n: a["ssim"] for n, a in inv.items()},
        "floors": floors,
        "extraction": {n: by[n]["accuracy"] for n in ("extraction-unlabelled", "extraction-10",
                                                      "extraction-50") if n in by},
        "extraction_chance": (by.get("extraction-50") or {}).get("chance"),
        "epsilon": eps.get("epsilon"), "delta": eps.get("delta"),
        "epsilon_covers": "the run" if (st.get("privacy_settings") or {}).get("release") == "once"
        else "own releases only (head trained without DP)",
        "adjacency": eps.get("adjacency"), "sensitivity": eps.get("sensitivity"),
        "wall_s": summary["wall_s"], "audit_s": report.get("wall_s"),
    }
    if inv:
        out["ssim_max"] = max(out["ssim"].values())
        out["ssim_max_attack"] = max(out["ssim"], key=out["ssim"].get)
        out["ssim_over_mean_image"] = out["ssim_max"] - floors.get("mean_image", 0.0)
        # detail beyond the class: the best attack other than the class-mean attacker itself
        detail = {n: v for n, v in out["ssim"].items() if n != "class-mean"}
        out["ssim_over_class_mean"] = max(detail.values()) - floors.get("class_mean", 0.0) \
            if detail else None
    return out


def _defence(settings: dict[str, Any]) -> str:
    """The defences of a run in words, from its verified settings (not its name)."""
    from clicooper_bus.config import PrivacySection
    from clicooper_bus.ml.privacy.defences import describe

    known = {k: v for k, v in settings.items() if k in PrivacySection.__dataclass_fields__}
    return describe(PrivacySection(**{**known, "name": ""}))


def judge(r: dict[str, Any], baseline: dict[str, Any] | None) -> list[tuple[str, str, bool]]:
    """The `defended` targets, each with the measured value and whether it is met."""
    t = TARGETS
    checks = []
    if baseline is not None:
        drop = baseline["accuracy"] - r["accuracy"]
        checks.append((f"accuracy within {t['accuracy_drop'] * 100:.0f} points of undefended",
                       f"{r['accuracy']:.4f} vs {baseline['accuracy']:.4f} ({-drop * 100:+.1f} "
                       f"points)", drop <= t["accuracy_drop"]))
    if r.get("ari") is not None:
        checks.append((f"clustering ARI <= {t['ari']}", f"{r['ari']:.3f} ({r['ari_variant']})",
                       r["ari"] <= t["ari"]))
        checks.append(("clustering success rate 0 %", f"{r['success'] * 100:.0f} %",
                       r["success"] <= t["success"]))
    if r.get("ssim_over_class_mean") is not None:
        checks.append((f"no inversion more than {t['ssim_over_class_mean']} SSIM above the "
                       f"class-mean line", f"{r['ssim_over_class_mean']:+.3f}",
                       r["ssim_over_class_mean"] <= t["ssim_over_class_mean"]))
    if "extraction-50" in r["extraction"]:
        over = r["extraction"]["extraction-50"] - r["extraction_chance"]
        checks.append((f"extraction with 50 labels <= chance + {t['extraction_50_over_chance'] * 100:.0f}"
                       f" points", f"{r['extraction']['extraction-50']:.3f} (chance "
                       f"{r['extraction_chance']:.3f}, {over * 100:+.1f} points)",
                       over <= t["extraction_50_over_chance"]))
    covers = f"; covers {r['epsilon_covers']}" if r.get("epsilon") is not None else ""
    checks.append(("epsilon reported with its adjacency",
                   _eps(r) + (f" ({r['adjacency'].split(':')[0]}{covers})" if r.get("adjacency")
                              else ""), r.get("epsilon") is not None))
    return checks


def _eps(r: dict[str, Any]) -> str:
    e = r.get("epsilon")
    if e is None:
        return "none (no noise)"
    if isinstance(e, float) and not math.isfinite(e):
        return "infinite"
    return f"{e:.3g} (delta {r['delta']:g})"


def _f(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    inv = sorted({n for r in rows for n in r["ssim"]})
    head = (["run", "defences", "epochs", "accuracy", "ARI (strongest)", "success"]
            + [f"SSIM {n}" for n in inv]
            + ["best SSIM - mean image", "best non-class-mean SSIM - class mean",
               "extraction 0 / 10 / 50 labels", "epsilon"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        ex = r["extraction"]
        cells = [f"`{r['name']}`", r["defence"], str(r["epochs"]), _f(r["accuracy"], ".4f"),
                 f"{_f(r['ari'])} ({r['ari_variant']})",
                 "-" if r["success"] is None else f"{r['success'] * 100:.0f} %"]
        cells += [_f(r["ssim"].get(n)) for n in inv]
        cells += [_f(r.get("ssim_over_mean_image"), "+.3f"), _f(r.get("ssim_over_class_mean"), "+.3f"),
                  " / ".join(_f(ex.get(k)) for k in ("extraction-unlabelled", "extraction-10",
                                                      "extraction-50")), _eps(r)]
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
    chance = next((r["extraction_chance"] for r in rows if r.get("extraction_chance")), 0.1)
    panels = [("ari", "clustering ARI (strongest variant)", TARGETS["ari"]),
              ("ssim_over_class_mean", "best inversion SSIM - class-mean line",
               TARGETS["ssim_over_class_mean"]),
              ("extraction-50", "extraction accuracy, 50 labels",
               chance + TARGETS["extraction_50_over_chance"])]
    for ax, (key, label, target) in zip(axes, panels, strict=True):
        for r in rows:
            y = r["extraction"].get(key) if key.startswith("extraction") else r.get(key)
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


def write_frontier(grid: Grid, rows: list[dict[str, Any]], command: str) -> None:
    fig = grid.doc.with_suffix(".png")
    plot(rows, fig)
    base = next((r for r in rows if r["name"] == "undefended"), None)
    lines = [
        "# Privacy frontier",
        "",
        f"Generated by `{command}` from the runs in `{_rel(grid.out)}` (each trained over the bus "
        f"and audited by the following auditor); {time.strftime('%Y-%m-%d')}. Nothing here was "
        f"typed in by hand: rerun the command to reproduce it.",
        "",
        "Accuracy is the owner's test accuracy; with `evaluate = \"owner\"` it is the delivered "
        "model's (head, clip, stages, tail: no noise) on the whole test set. ARI is the strongest "
        "clustering variant's on the first stage's received activations; each SSIM is over 500 "
        "reconstructions; the class-mean attacker scores what class information alone gives, so "
        "an attack above the class-mean line recovers detail beyond the class. Extraction is the "
        "colluding trainers' surrogate on the evaluation half of the test set. Epsilon is per "
        "training sample (replace-one adjacency, sensitivity 2 x clip in the clip's norm; "
        "Gaussian: analytic, exact composition; Laplace: the smaller of pure composition and "
        "RDP). It bounds the whole run only with `once` (the head is fixed); with `per-step` the "
        "head trains on raw images without DP and the epsilon covers each sample's own releases "
        "only, so it is not a differential-privacy guarantee for the run.",
        "",
        *_table(rows),
        "",
        _floors(rows),
        "",
        f"![accuracy against attack success]({fig.name})",
        "",
    ]
    if base is not None:
        targets = [c[0] for c in judge(base, base)]
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
    grid.doc.write_text("\n".join(lines))


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
        e = r["extraction"]
        return (f"{_f(e.get('extraction-unlabelled'))} / {_f(e.get('extraction-10'))} / "
                f"{_f(e.get('extraction-50'))} (chance {_f(r['extraction_chance'])})")

    table = [
        "| | CliCooper paper (reported) | undefended (ours) | paper configuration (ours) | "
        "defended (ours) |",
        "| --- | --- | --- | --- | --- |",
        f"| test accuracy | {PAPER['accuracy']} | {u['accuracy']:.4f} | {p['accuracy']:.4f} | "
        f"{d['accuracy']:.4f} |",
        f"| clustering: success rate (ARI, strongest variant) | {PAPER['clustering_success']:.0%} | "
        f"{_cl(u)} | {_cl(p)} | {_cl(d)} |",
        f"| inversion: best SSIM over all attacks (attack) | {PAPER['ssim_undefended']} -> "
        f"{PAPER['ssim_defended']} | {inv(u)} | {inv(p)} | {inv(d)} |",
        f"| inversion: best non-class-mean SSIM - class-mean line | - | "
        f"{_f(u.get('ssim_over_class_mean'), '+.3f')} | {_f(p.get('ssim_over_class_mean'), '+.3f')} | "
        f"{_f(d.get('ssim_over_class_mean'), '+.3f')} |",
        f"| extraction accuracy, 0 / 10 / 50 labels | {PAPER['extraction']} | {ex(u)} | {ex(p)} | "
        f"{ex(d)} |",
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
        f"Reproduce with `{command}` (runs in `{_rel(grid.out)}`; every number below was "
        f"measured by those runs and their audits, in the same invocation or resumed from it); "
        f"{time.strftime('%Y-%m-%d')}. Configurations: `configs/undefended.toml`, "
        f"`configs/paper.toml`, `configs/defended.toml`; each run's `audit/report.json` names its "
        f"configuration.",
        "",
        *table,
        "",
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
    grid.doc.write_text("\n".join(lines))


def _cl(r: dict[str, Any]) -> str:
    return "-" if r.get("ari") is None else f"{r['success']:.0%} ({r['ari']:.3f})"


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def sweep(grid_path: str, *, only: list[str] | None = None, fresh: bool = False,
          doc: str | None = None) -> int:
    grid = load_grid(grid_path)
    if doc:
        grid.doc = Path(doc)
    entries = [e for e in grid.runs if not only or e.name in only]
    if only and len(entries) != len(set(only)):
        raise ConfigError(f"--only names runs the grid does not have: "
                          f"{sorted(set(only) - {e.name for e in grid.runs})}")
    t0 = time.perf_counter()
    for i, entry in enumerate(entries, 1):
        print(f"sweep: [{i}/{len(entries)}] {entry.name} ({time.perf_counter() - t0:.0f} s so "
              f"far)", flush=True)
        run_entry(entry, grid.out, fresh, grid.attacks)
        # written after every run: an interrupted sweep keeps what it measured
        done = [row(grid.out / e.name) for e in grid.runs if _finished(grid.out / e.name)]
        (grid.out / "sweep.json").write_text(json.dumps(done, indent=1, default=str) + "\n")
    # the document covers every run of the grid that has been measured, not only this call's
    missing = [e.name for e in grid.runs if not _finished(grid.out / e.name)]
    if missing:
        print(f"sweep: not writing {grid.doc}: runs {', '.join(missing)} have not been measured "
              f"yet (run them, e.g. without --only)", flush=True)
        return 0
    rows = [row(grid.out / e.name) for e in grid.runs]
    command = f"clicooper sweep {_rel(Path(grid_path).resolve())}"
    (write_results if grid.kind == "results" else write_frontier)(grid, rows, command)
    print(f"sweep: wrote {grid.doc} from {len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    return 0


def _finished(run_dir: Path) -> bool:
    return (run_dir / "audit" / "report.json").exists()


if __name__ == "__main__":
    sys.exit(sweep(sys.argv[1]))
