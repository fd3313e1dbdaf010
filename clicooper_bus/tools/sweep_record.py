"""The measurements of a sweep, committed beside the document they produce
(`docs/PRIVACY.runs.json` for `docs/PRIVACY.md`).

A full sweep takes hours on 2 cores, and its run directories (`runs/sweep`, gigabytes of logs)
stay on the machine that made them. The record keeps what the document is written from: each
finished run's row (`sweep_rows.row`: its summary's and audit report's numbers), the settings it was
made with (`sweep._made_with`: the config path relative to the working directory, the digest
of the config's settings, comments and layout aside, the grid's overrides and attacks) and the
auditor's fingerprint. A sweep on another checkout or machine reuses a recorded row instead of
running the configuration again, and finishes the grid in parts.

The fingerprint is SHA-256 over the sources that decide a row's measurements: the privacy
mechanisms (`ml/privacy`), the attacks (`ml/attacks`) and the auditor (`audit/`, less replay
verification, which no row reads), each as its syntax tree without docstrings (`ast.dump`;
comments are not in the tree), so that a corrected docstring or comment keeps the rows while
any change to what the code does, an error message's text included, drops them. A row
recorded with another fingerprint is not reused: the run is made again. Training code is not
in it; its changes are held to the in-process reference by the tests
(`tests/test_training.py`), bit for bit where they can be.

Format (JSON): `{"format": "clicooper-sweep-record/1", "runs": {NAME: {"made_with": {...},
"auditor": HEX, "row": {...}}}}`.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clicooper_bus.errors import ConfigError
from clicooper_bus.layout import write_atomic

__all__ = ["FORMAT", "Record", "auditor_fingerprint", "behaviour", "record_path"]

FORMAT = "clicooper-sweep-record/1"
PACKAGE = Path(__file__).resolve().parents[1]
# what decides a row's numbers, relative to the package
FINGERPRINTED = ("ml/privacy", "ml/attacks", "audit")
NOT_FINGERPRINTED = ("audit/training_replay.py", "audit/replay_timeline.py",
                     "audit/replay_verdict.py", "audit/replay_compare.py",
                     "audit/replay_spans.py", "audit/model_replay.py")


def auditor_fingerprint(package: Path = PACKAGE) -> str:
    """SHA-256 (hex) over the path and the behaviour (`behaviour`) of every source in
    `FINGERPRINTED`. Raises SyntaxError for a source that does not parse."""
    h = hashlib.sha256()
    files: list[Path] = []
    for part in FINGERPRINTED:
        p = package / part
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    for f in files:
        rel = f.relative_to(package).as_posix()
        if rel in NOT_FINGERPRINTED:
            continue
        data = behaviour(f.read_bytes())
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def behaviour(source: bytes) -> bytes:
    """A Python source's syntax tree without its docstrings (module, class and function), as
    `ast.dump` text: what the code does, not what its prose says."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) \
                and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def record_path(doc: Path) -> Path:
    """Where the record of the document `doc` is: `PRIVACY.md` -> `PRIVACY.runs.json`."""
    return doc.with_name(doc.stem + ".runs.json")


@dataclass
class Record:
    path: Path
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Record:
        """The record at `path` (empty if there is none). Raises ConfigError for a file that
        is not a record: delete or restore it."""
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the sweep record {path} is unreadable ({exc}); restore it "
                              f"from git or delete it") from None
        if type(doc) is not dict or doc.get("format") != FORMAT or type(doc.get("runs")) is not dict:
            raise ConfigError(f"{path} is not a sweep record ({FORMAT}); restore it from git "
                              f"or delete it")
        return cls(path, doc["runs"])

    def row(self, name: str, made_with: list[dict[str, Any]], auditor: str
            ) -> dict[str, Any] | None:
        """The recorded row of run `name` if it was made with one of these settings (the
        `made_with` forms that name the entry) and this auditor, else None."""
        got = self.runs.get(name)
        if type(got) is not dict or got.get("made_with") not in made_with:
            return None
        return got.get("row") if got.get("auditor") == auditor else None

    def put(self, name: str, made_with: dict[str, Any], auditor: str,
            row: dict[str, Any]) -> None:
        self.runs[name] = {"made_with": made_with, "auditor": auditor, "row": row}

    def save(self) -> None:
        doc = {"format": FORMAT, "runs": dict(sorted(self.runs.items()))}
        write_atomic(self.path, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
