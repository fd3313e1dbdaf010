"""The run directory: one place that knows every path in `<out_dir>/<run id>/`, and the one
atomic writer every artefact goes through.

    <run>/
      config.toml          the run's config, as the owner loaded it (the roster commits to it)
      log/                 the provenance log (the notary's; `clicooper_bus.tlog.log`)
      checkpoint.txt       the notary's final checkpoint, as the owner saw it
      model.safetensors    the assembled model
      label_groups.json    pseudo-class -> true class (owner-only: mode 0600)
      order.secret         the key of the secret batch order (owner-only: mode 0600; the
                           auditor's truth side reads it; `[privacy] secret_order`)
      summary.json         the owner's summary of the run
      provenance/          the watermark bundle `clicooper model verify` reads
        manifest.json  roster.msgpack  checkpoint.txt  checkpoints.json  [handovers.msgpack]
        certificates/stage-K-round-T.cert
      audit/               the auditor's report.json, report.md and figures
      telemetry/           each process's structlog JSON lines (`clicooper run`)
      sweep-entry.json     what `clicooper sweep` ran here
      INTERRUPTED          `clicooper run` was stopped by a signal (which, when)
      snapshots/NAME/      a trainer's own snapshots (`SnapshotLayout`): what it resumes from;
                           the owner's round snapshots under its own name
        roster.msgpack  step-000000050.safetensors ...
        outbox/000000000001.out ...  what NAME sent, kept to go on after it (`net.outbox`)

In the spirit of Tessera's layout module: paths are computed here and nowhere else, so a
change of layout is one change. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new one,
    never a part: write a temporary file beside it, fsync it, rename it over `path`, fsync the
    directory (POSIX rename(2) is atomic within one file system). `mode` applies from creation
    (0o600 for owner-only files), so the content is never readable more widely. A failure
    leaves `path` as it was and removes the temporary file (a symbolic link in its place is
    refused, not followed). Raises OSError as the file system does."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:  # closes fd, whatever happens next
            os.fchmod(f.fileno(), mode)  # an older .tmp left by a crash keeps its mode otherwise
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def non_finite(doc: Any, where: str = "") -> str | None:
    """The path (`per_epoch[0].loss`) of the first NaN or infinity in a JSON-like document, or
    None when every number is finite."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return where or "(the document)"
    if isinstance(doc, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in doc.items())
    elif isinstance(doc, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(doc))
    else:
        return None
    for path, value in items:
        found = non_finite(value, path)
        if found is not None:
            return found
    return None


def json_text(doc: Any, *, what: str, indent: int | None = 2) -> str:
    """`doc` as strict JSON text (ending in a newline): never NaN or Infinity, which are not
    JSON. Raises ValueError naming `what` (the file) and the key whose number is not finite."""
    bad = non_finite(doc)
    if bad is not None:
        raise ValueError(f"{what} would hold a non-finite number at {bad}; refusing to write "
                         f"invalid JSON (a diverged or poisoned value reached it)")
    return json.dumps(doc, indent=indent, allow_nan=False) + "\n"


@dataclass(frozen=True)
class ProvenanceLayout:
    """`<run>/provenance/`: the bundle a delivered model is verified against."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def roster(self) -> Path:
        return self.root / "roster.msgpack"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.txt"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints.json"

    @property
    def certificates(self) -> Path:
        return self.root / "certificates"

    def certificate(self, stage: int, round_: int) -> Path:
        return self.certificates / f"stage-{stage}-round-{round_}.cert"

    @property
    def replay(self) -> Path:
        """`replay.json`: each stage's replay verdict (`audit.training_replay`), written by
        the audit; absent until a run is audited. Not signed: `model verify --log` replays
        the stages itself."""
        return self.root / "replay.json"

    @property
    def handovers(self) -> Path:
        """`handovers.msgpack`: each handover of a stage to a standby, as logged ([leaf, body]
        pairs); absent when there was none."""
        return self.root / "handovers.msgpack"


@dataclass(frozen=True)
class SnapshotLayout:
    """`<run>/snapshots/<trainer name>/`: one trainer's snapshots of its stage, each a
    safetensors file named by its step (`step-000000050.safetensors`, zero-padded so names sort
    by step), and the owner's signed roster it joined with (`roster.msgpack`), which a process
    restarted after a crash rejoins with."""

    root: Path
    PREFIX = "step-"
    SUFFIX = ".safetensors"

    @property
    def roster(self) -> Path:
        return self.root / "roster.msgpack"

    @property
    def outbox(self) -> Path:
        """The messages this member sent, each written before it was sent (`net.outbox`)."""
        return self.root / "outbox"

    def state(self, step: int) -> Path:
        return self.root / f"{self.PREFIX}{step:09d}{self.SUFFIX}"

    def steps(self) -> list[int]:
        """The steps of the snapshots on disk, ascending (a `.tmp` left by a crash is not
        one: `write_atomic` renames only a whole file into place)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            name = p.name
            if name.startswith(self.PREFIX) and name.endswith(self.SUFFIX):
                digits = name[len(self.PREFIX):-len(self.SUFFIX)]
                if digits.isdigit():
                    out.append(int(digits))
        return sorted(out)


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory. `RunLayout(cfg.run_dir)` or `RunLayout("runs/demo")`."""

    root: Path

    def __init__(self, root: Path | str):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.txt"

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def finetuned_model(self) -> Path:
        """The owner's fine-tuned model (`[privacy] finetune_epochs`): not the run's model, not
        in the log, not certified."""
        return self.root / "model.finetuned.safetensors"

    @property
    def label_groups(self) -> Path:
        return self.root / "label_groups.json"

    @property
    def order_key(self) -> Path:
        return self.root / "order.secret"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def provenance(self) -> ProvenanceLayout:
        return ProvenanceLayout(self.root / "provenance")

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def audit_report(self) -> Path:
        """`audit/report.json`: the auditor's report (or refusal) for machines."""
        return self.audit / "report.json"

    @property
    def telemetry(self) -> Path:
        return self.root / "telemetry"

    @property
    def sweep_entry(self) -> Path:
        return self.root / "sweep-entry.json"

    @property
    def sweep_auditor(self) -> Path:
        """The fingerprint of the auditor that measured a sweep's run (`tools/sweep_record.py`)."""
        return self.root / "sweep-auditor.txt"

    @property
    def interrupted(self) -> Path:
        """`INTERRUPTED`: `clicooper run` was stopped by a signal (JSON: signal, time); a run
        directory holding it is not reused without `--force`."""
        return self.root / "INTERRUPTED"

    def snapshots(self, name: str) -> SnapshotLayout:
        """`snapshots/<name>/`: trainer `name`'s own snapshots."""
        return SnapshotLayout(self.root / "snapshots" / name)

    def made(self) -> list[Path]:
        """The artefacts that mark a directory as holding a run already (its id is taken)."""
        return [p for p in (self.summary, self.log) if p.exists()]
