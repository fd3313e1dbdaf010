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


def _portable(made_with: dict[str, Any]) -> dict[str, Any]:
    """`made_with` as the record keeps it: the config path relative to the working directory
    (the repository root), so that another checkout compares equal."""
    return {**made_with, "config": relative(Path(made_with["config"]))}


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
        "epochs": summary["epochs"], **accuracies(summary), **measured,
        "epsilon": eps.get("epsilon"), "delta": eps.get("delta"),
        "label_epsilon": (eps.get("labels") or {}).get("epsilon"),
        "epsilon_covers": "the run" if (st.get("privacy_settings") or {}).get("release") == "once"
        else "own releases only (head trained without DP)",
        "adjacency": eps.get("adjacency"), "sensitivity": eps.get("sensitivity"),
        "wall_s": summary["wall_s"], "audit_s": report.get("wall_s"),
    }
    out.update(label_inference(report["attacks"]))
    if out["ssim"]:
        _inversion_margins(out)
    return out


def accuracies(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's accuracies and the owner's share of the training FLOPs: `accuracy` is what the
    owner ends with (the fine-tuned model's when it fine-tuned), `split_accuracy` the split-
    trained model's, `control_accuracy` the fine-tune's control arm's (None without one);
    `owner_share` counts the fine-tune's FLOPs as the owner's."""
    ft = summary.get("finetune") or {}
    return {"accuracy": ft.get("accuracy", summary["test_accuracy"]),
            "split_accuracy": summary["test_accuracy"],
            "control_accuracy": (ft.get("control") or {}).get("accuracy"),
            "owner_share": ft.get("owner_flops_share", summary.get("owner_flops_share"))}


# the families whose rows infer training labels, each from a channel a party received
LABEL_FAMILIES = ("clustering", "channels", "completion")


def colluding(attack: dict[str, Any]) -> bool:
    """Whether an audit row's party is all trainers colluding (its threat model says so)."""
    party = (attack.get("threat_model") or {}).get("party", "")
    return "colluding" in party and "non-colluding" not in party


def label_inference(attacks: list[dict[str, Any]]) -> dict[str, Any]:
    """The strongest label inference of an audit, per threat model (`label_alone`: one trainer
    by itself, what the CliCooper paper assumes; `label_colluding`: all trainers together, who
    can also do whatever one of them can): the largest ARI and the largest matched accuracy over
    chance, each over every channel and variant of the clustering, channel and completion
    attacks, and where the largest ARI came from (`..._where`: party, channel, attack). Values
    None where no such row was scored."""
    out: dict[str, Any] = {}
    scored = [a for a in attacks if a.get("family") in LABEL_FAMILIES and a.get("ari") is not None]
    for key, rows in (("label_alone", [a for a in scored if not colluding(a)]),
                      ("label_colluding", scored)):
        top = max(rows, key=lambda a: a["ari"], default=None)
        over = [a["matched_accuracy"] - a["matched_accuracy_chance"] for a in rows
                if a.get("matched_accuracy") is not None]
        out[key] = {"ari": top["ari"] if top else None,
                    "matched_over_chance": max(over, default=None)}
        out[f"{key}_where"] = _where(top) if top else None
    return out


def _where(attack: dict[str, Any]) -> str:
    party = attack.get("trainer") or (attack.get("threat_model") or {}).get("party", "?")
    return f"{party.split(',')[0]}: {attack.get('channel') or 'fwd'} ({attack['name']})"


def aggregate(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's row from its seeds' rows: every number (also inside the per-attack
    maps) is the mean, its range is in `spread` ("key" or "key.attack" -> [min, max]); the
    rest (names, settings) is the first seed's. One row is returned as it is, with seeds 1."""
    if len(rows) == 1:
        return {**rows[0], "seeds": 1}
    out: dict[str, Any] = {**rows[0], "name": name, "seeds": len(rows)}
    spread: dict[str, list[float]] = {}
    for key, first in rows[0].items():
        if isinstance(first, dict):
            out[key] = {k: _mean(rows, key, k, spread) for k in first}
        elif _number(first):
            out[key] = _mean(rows, None, key, spread)
    out["spread"] = spread
    if out.get("ssim"):
        _inversion_margins(out)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _mean(rows: list[dict[str, Any]], outer: str | None, key: str,
          spread: dict[str, list[float]]) -> Any:
    """The mean over rows of row[outer][key] (or row[key]); the first value if not numbers."""
    values = [(r.get(outer) or {}).get(key) if outer else r.get(key) for r in rows]
    if not all(_number(v) for v in values) or len(set(values)) == 1:
        return values[0]
    spread[f"{outer}.{key}" if outer else key] = [min(values), max(values)]
    return sum(values) / len(values)


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
    words = describe(PrivacySection(**{**known, "name": ""}))
    # `describe` (ml/privacy, under the auditor's fingerprint) does not name the secret order
    # yet: it moves there with the next change to the auditor, which remeasures every row
    if known.get("secret_order"):
        words = "secret batch order" if words == "undefended" else words + " + secret batch order"
    return words



def sweep(grid_path: str, *, only: list[str] | None = None, fresh: bool = False,
          doc: str | None = None, status: bool = False) -> int:
    grid = load_grid(grid_path)
    if doc:
        grid.doc = Path(doc)
    entries = [e for e in grid.runs if not only or e.name in only]
    if only and len(entries) != len(set(only)):
        raise ConfigError(f"--only names runs the grid does not have: "
                          f"{sorted(set(only) - {e.name for e in grid.runs})}")
    t0 = time.perf_counter()
    measured = Measured(grid, Record.load(record_path(grid.doc)), auditor_fingerprint())
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
        return self.record.row(entry.name, self._made_with(entry), self.fingerprint)

    def row(self, entry: Entry) -> dict[str, Any] | None:
        """Its row: from its run directory when finished, else from the record; None when it
        has not been measured."""
        run_dir = self.grid.out / entry.name
        return row(run_dir) if _finished(run_dir) else self.recorded(entry)

    def record_finished(self) -> None:
        """Put into the record the row of every finished run made with the grid's current
        settings (its `sweep-entry.json`), with the auditor of the run (`sweep-auditor.txt`,
        written beside it; the current one for a run from before the record)."""
        changed = False
        for entry in (r for e in self.grid.runs for r in e.replicas()):
            layout = RunLayout(self.grid.out / entry.name)
            try:
                made = json.loads(layout.sweep_entry.read_text())
            except (OSError, ValueError):
                continue
            if not _finished(layout.root) or made != _made_with(entry, self.grid.attacks):
                continue
            auditor = layout.sweep_auditor
            if not auditor.exists():
                write_atomic(auditor, self.fingerprint + "\n")
            fp = auditor.read_text().strip()
            new = row(layout.root)
            if self.record.row(entry.name, self._made_with(entry), fp) != new:
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
