"""`clicooper sweep GRID`: run a grid of privacy configurations end to end, audit every run,
and write the frontier (docs/PRIVACY.md) or the paper table (docs/RESULTS.md).

A grid is a TOML file:

    base = "configs/undefended.toml"     # config every run starts from (relative to the grid)
    out = "runs/sweep"                   # where the runs go (one directory per run name)
    doc = "docs/PRIVACY.md"              # what to write
    kind = "frontier"                    # or "results" (the paper table)
    attacks = ""                         # optional: only these attacks (default: all)
    seeds = 1                            # optional: runs of each configuration (default 1)
    notes = '''...'''                    # optional: findings, printed under the tables
    [all.run]                            # sections applied to every run (before its own)
    epochs = 3
    [[run]]
    name = "gaussian-0.1"                # run id, and the configuration's name in reports
    config = "configs/paper.toml"        # optional: another base for this run
    privacy = { mechanism = "gaussian", noise_multiplier = 0.1 }   # any section's keys
    seeds = 3                            # optional: this configuration's runs (default: the grid's)

With `seeds = N` a configuration runs N times, as `NAME`, `NAME-seed1`, ..., each with the
training seed one higher (and, being a different run, its own run key): the documents give the
mean of each number and its range over the seeds.

Every run goes over the bus like `clicooper run --audit` (separate processes, free ports, a
following auditor). A run whose audit report exists is reused, so an interrupted sweep resumes
where it stopped (`--fresh` reruns everything). Each finished run's row also goes into the
record beside the document (`tools/sweep_record.py`: `docs/PRIVACY.runs.json`, committed), which
a sweep on another checkout reuses while the settings and the auditor's sources are the same:
a grid can be finished in parts, on different machines. `--status` says what is measured,
recorded and left, and runs nothing. Nothing is written to the document that was not measured
by a run of the grid.
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
from clicooper_bus.tools.sweep_record import Record, auditor_fingerprint, record_path
from clicooper_bus.tools.sweep_rows import aggregate, row

__all__ = ["PAPER", "TARGETS", "Entry", "Grid", "judge", "load_grid", "row", "run_entry", "sweep"]

SECTIONS = ("run", "data", "model", "participants", "bus", "log", "watermark", "privacy")


@dataclass
class Entry:
    name: str
    config: Path
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: int = 1

    def replicas(self) -> list[Entry]:
        """This configuration once per seed: itself, then `NAME-seedK` with the training seed
        K higher (each a run of its own, so with its own run key). Reports call every replica
        by this entry's name."""
        if self.seeds == 1:
            return [self]
        from clicooper_bus.config import load_config

        base = self.overrides.get("run", {}).get("seed")
        if base is None:
            base = load_config(str(self.config)).run.seed
        out = [self]
        for k in range(1, self.seeds):
            over = {sec: dict(v) for sec, v in self.overrides.items()}
            over.setdefault("run", {})["seed"] = base + k
            over.setdefault("privacy", {}).setdefault("name", self.name)
            out.append(Entry(f"{self.name}-seed{k}", self.config, over))
        return out


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
    unknown = set(raw) - {"base", "out", "doc", "kind", "attacks", "notes", "seeds", "all", "run"}
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
    seeds = _seeds(raw.get("seeds", 1), f"{path}: seeds")
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
        bad = set(r) - {"name", "config", "seeds", *SECTIONS}
        if bad:
            raise ConfigError(f"{path}: run {name!r} has unknown keys {sorted(bad)}; use "
                              f"config sections ({', '.join(SECTIONS)})")
        cfg = r.get("config", base)
        if not cfg:
            raise ConfigError(f"{path}: run {name!r} has no config and the grid no base")
        over = {s: {**common.get(s, {}), **r.get(s, {})} for s in SECTIONS
                if s in r or s in common}
        runs.append(Entry(name, root / cfg, over,
                          _seeds(r.get("seeds", seeds), f"{path}: run {name!r}: seeds")))
    if not runs:
        raise ConfigError(f"{path}: the grid has no [[run]] tables")
    return Grid(path, root / raw.get("out", "runs/sweep"), root / raw.get("doc", "docs/PRIVACY.md"),
                kind, runs, attacks, str(raw.get("notes", "")).strip())


def _seeds(value: Any, where: str) -> int:
    if type(value) is not int or not 1 <= value <= 10:
        raise ConfigError(f"{where} must be a whole number from 1 to 10, got {value!r}")
    return value


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
        if json.loads(recorded.read_text()) in made_with_forms(entry, attacks):
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


def _portable(made_with: dict[str, Any]) -> dict[str, Any]:
    """`made_with` as the record keeps it: the config path relative to the working directory
    (the repository root), so that another checkout compares equal."""
    return {**made_with, "config": relative(Path(made_with["config"]))}


def _made_with(entry: Entry, attacks: str) -> dict[str, Any]:
    """What a run of this entry depends on: its config file's settings (`settings_digest`),
    overrides and attacks."""
    return {"config": str(entry.config), "settings_sha256": settings_digest(entry.config),
            "overrides": entry.overrides, "attacks": attacks}


def made_with_forms(entry: Entry, attacks: str) -> list[dict[str, Any]]:
    """Every `made_with` that names this entry as it is now: today's, and the form runs and
    records kept before settings were digested (`config_sha256`: the config file's bytes),
    which still names it while those bytes are unchanged."""
    import hashlib

    now = _made_with(entry, attacks)
    legacy = {"config": now["config"],
              "config_sha256": hashlib.sha256(entry.config.read_bytes()).hexdigest(),
              "overrides": now["overrides"], "attacks": attacks}
    return [now, legacy]


def settings_digest(config: Path) -> str:
    """SHA-256 (hex) of a config file's settings: its parsed TOML as canonical JSON, so that a
    comment or a layout change keeps the runs made with it while any changed value drops them.
    Raises ConfigError for a file that is not TOML."""
    import hashlib

    try:
        doc = tomllib.loads(config.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{config}: cannot read its settings ({exc})") from None
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def sweep(grid_path: str, *, only: list[str] | None = None, fresh: bool = False,
          doc: str | None = None, status: bool = False) -> int:
    grid = load_grid(grid_path)
    record = Record.load(record_path(grid.doc))  # the grid's, whichever document is written
    if doc:
        grid.doc = Path(doc)
    entries = [e for e in grid.runs if not only or e.name in only]
    if only and len(entries) != len(set(only)):
        raise ConfigError(f"--only names runs the grid does not have: "
                          f"{sorted(set(only) - {e.name for e in grid.runs})}")
    t0 = time.perf_counter()
    measured = Measured(grid, record, auditor_fingerprint())
    measured.upgrade()
    measured.record_finished()
    todo = [r for e in entries for r in e.replicas()]
    if status:
        return measured.status(todo)
    for i, entry in enumerate(todo, 1):
        print(f"sweep: [{i}/{len(todo)}] {entry.name} ({time.perf_counter() - t0:.0f} s so "
              f"far)", flush=True)
        if not fresh and measured.recorded(entry) is not None:
            print(f"sweep: {entry.name}: reusing its row in {relative(measured.record.path)}",
                  flush=True)
            continue
        run_entry(entry, grid.out, fresh, grid.attacks)
        measured.record_finished()  # after every run: an interrupted sweep keeps what it measured
        done = [r for e in grid.runs for rep in e.replicas()
                if (r := measured.row(rep)) is not None]
        write_atomic(grid.out / "sweep.json", json.dumps(done, indent=1, default=str) + "\n")
    # the document covers every run of the grid that has been measured, not only this call's
    missing = [r.name for e in grid.runs for r in e.replicas() if measured.row(r) is None]
    if missing:
        print(f"sweep: not writing {grid.doc}: runs {', '.join(missing)} have not been measured "
              f"yet (run them, e.g. without --only)", flush=True)
        return 0
    rows = [aggregate(e.name, [measured.row(r) for r in e.replicas()]) for e in grid.runs]
    command = f"clicooper sweep {relative(Path(grid_path).resolve())}"
    (write_results if grid.kind == "results" else write_frontier)(grid, rows, command)
    print(f"sweep: wrote {grid.doc} from {len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    return 0


def _finished(run_dir: Path) -> bool:
    return RunLayout(run_dir).audit_report.exists()


@dataclass
class Measured:
    """What a grid's runs measured: their run directories in `out`, else the record's rows
    made with the same settings and auditor (`fingerprint`)."""

    grid: Grid
    record: Record
    fingerprint: str

    def _made_with(self, entry: Entry) -> dict[str, Any]:
        return _portable(_made_with(entry, self.grid.attacks))

    def recorded(self, entry: Entry) -> dict[str, Any] | None:
        if _finished(self.grid.out / entry.name):
            return None  # the run directory is the measurement
        return self.record.row(entry.name, self._forms(entry), self.fingerprint)

    def _forms(self, entry: Entry) -> list[dict[str, Any]]:
        return [_portable(f) for f in made_with_forms(entry, self.grid.attacks)]

    def upgrade(self) -> None:
        """Rewrite each recorded row kept in the older `made_with` form (the config's bytes)
        that still names its entry, in today's (its settings), so that a later edit of a
        comment keeps it; the row and its auditor stay as they are."""
        changed = False
        for entry in (r for e in self.grid.runs for r in e.replicas()):
            got = self.record.runs.get(entry.name)
            now = self._made_with(entry)
            if type(got) is dict and got.get("made_with") != now \
                    and got.get("made_with") in self._forms(entry):
                got["made_with"] = now
                changed = True
        if changed:
            self.record.save()

    def row(self, entry: Entry) -> dict[str, Any] | None:
        """Its row: from its run directory when finished, else from the record; None when it
        has not been measured."""
        run_dir = self.grid.out / entry.name
        return row(run_dir) if _finished(run_dir) else self.recorded(entry)

    def record_finished(self) -> None:
        """Put into the record the row of every finished run made with the grid's current
        settings (its `sweep-entry.json`, rewritten in today's form if in the older one),
        with the auditor of the run (`sweep-auditor.txt`, written beside it; the current one
        for a run from before the record)."""
        changed = False
        for entry in (r for e in self.grid.runs for r in e.replicas()):
            layout = RunLayout(self.grid.out / entry.name)
            try:
                made = json.loads(layout.sweep_entry.read_text())
            except (OSError, ValueError):
                continue
            if not _finished(layout.root) or made not in made_with_forms(entry, self.grid.attacks):
                continue
            if made != (now := _made_with(entry, self.grid.attacks)):  # the older form: rewrite
                write_atomic(layout.sweep_entry, json.dumps(now, indent=1, sort_keys=True) + "\n")
            auditor = layout.sweep_auditor
            if not auditor.exists():
                write_atomic(auditor, self.fingerprint + "\n")
            fp = auditor.read_text().strip()
            new = row(layout.root)
            if self.record.row(entry.name, [self._made_with(entry)], fp) != new:
                self.record.put(entry.name, self._made_with(entry), fp, new)
                changed = True
        if changed:
            self.record.save()

    def status(self, todo: list[Entry]) -> int:
        """`--status`: each run of the grid measured (a run directory), recorded, or left."""
        left = 0
        for entry in todo:
            if _finished(self.grid.out / entry.name):
                where = f"measured in {relative(self.grid.out / entry.name)}"
            elif self.recorded(entry) is not None:
                where = f"recorded in {relative(self.record.path)}"
            else:
                where, left = "not measured yet", left + 1
            print(f"sweep: {entry.name}: {where}")
        print(f"sweep: {len(todo) - left} of {len(todo)} runs measured; the auditor's "
              f"fingerprint is {self.fingerprint[:16]}")
        return 0


if __name__ == "__main__":
    sys.exit(sweep(sys.argv[1]))
