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
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clicooper_bus.errors import ClicooperError, ConfigError
from clicooper_bus.layout import RunLayout, write_atomic
from clicooper_bus.tools.sweep_docs import (
    PAPER,
    TARGETS,
    judge,
    relative,
    write_frontier,
    write_results,
)

__all__ = ["PAPER", "TARGETS", "Entry", "Grid", "judge", "load_grid", "row", "run_entry", "sweep"]

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

    layout = RunLayout(out / entry.name)
    run_dir, report, recorded = layout.root, layout.audit_report, layout.sweep_entry
    made_with = _made_with(entry, attacks)
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
        raise ClicooperError(f"run {entry.name} failed (exit {code}); see {layout.telemetry}")
    write_atomic(recorded, json.dumps(made_with, indent=1, sort_keys=True) + "\n")
    print(f"sweep: {entry.name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def _made_with(entry: Entry, attacks: str) -> dict[str, Any]:
    """What a run of this entry depends on: its config file's bytes, overrides and attacks."""
    import hashlib

    return {"config": str(entry.config),
            "config_sha256": hashlib.sha256(entry.config.read_bytes()).hexdigest(),
            "overrides": entry.overrides, "attacks": attacks}


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
        "epochs": summary["epochs"], "accuracy": summary["test_accuracy"], **measured,
        "epsilon": eps.get("epsilon"), "delta": eps.get("delta"),
        "epsilon_covers": "the run" if (st.get("privacy_settings") or {}).get("release") == "once"
        else "own releases only (head trained without DP)",
        "adjacency": eps.get("adjacency"), "sensitivity": eps.get("sensitivity"),
        "wall_s": summary["wall_s"], "audit_s": report.get("wall_s"),
    }
    if out["ssim"]:
        _inversion_margins(out)
    return out


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
    return describe(PrivacySection(**{**known, "name": ""}))



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
        write_atomic(grid.out / "sweep.json", json.dumps(done, indent=1, default=str) + "\n")
    # the document covers every run of the grid that has been measured, not only this call's
    missing = [e.name for e in grid.runs if not _finished(grid.out / e.name)]
    if missing:
        print(f"sweep: not writing {grid.doc}: runs {', '.join(missing)} have not been measured "
              f"yet (run them, e.g. without --only)", flush=True)
        return 0
    rows = [row(grid.out / e.name) for e in grid.runs]
    command = f"clicooper sweep {relative(Path(grid_path).resolve())}"
    (write_results if grid.kind == "results" else write_frontier)(grid, rows, command)
    print(f"sweep: wrote {grid.doc} from {len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    return 0


def _finished(run_dir: Path) -> bool:
    return RunLayout(run_dir).audit_report.exists()


if __name__ == "__main__":
    sys.exit(sweep(sys.argv[1]))
