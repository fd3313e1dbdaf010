"""The run directory's layout and its one atomic writer: a reader or a crash sees the old file
or the new one, never a part, with the mode it asked for from the first byte."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from clicooper_bus.layout import ProvenanceLayout, RunLayout, write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_writes_and_replaces_leaving_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_atomic(path, "first\n")
    assert path.read_text() == "first\n"
    write_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    assert _mode(path) == 0o644


def test_write_atomic_text_is_utf8(tmp_path):
    path = tmp_path / "report.md"
    write_atomic(path, "épsilon ≤ 1\n")
    assert path.read_bytes() == "épsilon ≤ 1\n".encode()


def test_mode_applies_from_creation(tmp_path, monkeypatch):
    """The temporary file is already 0600 while its content is written, and stays so."""
    path = tmp_path / "label_groups.json"
    seen: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomic(path, '{"groups": [0, 1]}', mode=0o600)
    assert seen == [0o600]
    assert _mode(path) == 0o600


def test_a_stale_temporary_does_not_keep_its_mode(tmp_path):
    """A .tmp a crash left behind, readable by all, is narrowed before anything is written."""
    path = tmp_path / "label_groups.json"
    stale = tmp_path / "label_groups.json.tmp"
    stale.write_text("old secret")
    stale.chmod(0o666)
    write_atomic(path, "new secret", mode=0o600)
    assert path.read_text() == "new secret" and _mode(path) == 0o600
    assert not stale.exists()


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_a_failure_leaves_the_old_file_intact(tmp_path, monkeypatch, fail):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def boom(*args: object) -> None:
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(os, fail, boom)
    with pytest.raises(OSError, match="simulated"):
        write_atomic(path, "new, longer content")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_symlink_in_place_of_the_temporary_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    (tmp_path / "x.json.tmp").symlink_to(target)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "x.json", "data")
    assert target.read_text() == "untouched"
    assert not (tmp_path / "x.json").exists()


def test_run_layout_paths(tmp_path):
    run = RunLayout(str(tmp_path / "demo"))
    root = tmp_path / "demo"
    assert run.root == root and isinstance(run.root, Path)
    assert RunLayout(root) == run
    assert run.config == root / "config.toml"
    assert run.log == root / "log"
    assert run.checkpoint == root / "checkpoint.txt"
    assert run.model == root / "model.safetensors"
    assert run.label_groups == root / "label_groups.json"
    assert run.summary == root / "summary.json"
    assert run.audit == root / "audit"
    assert run.audit_report == root / "audit" / "report.json"
    assert run.telemetry == root / "telemetry"
    assert run.sweep_entry == root / "sweep-entry.json"
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.root = tmp_path  # type: ignore[misc]


def test_provenance_layout_paths(tmp_path):
    bundle = RunLayout(tmp_path).provenance
    root = tmp_path / "provenance"
    assert bundle == ProvenanceLayout(root)
    assert bundle.manifest == root / "manifest.json"
    assert bundle.roster == root / "roster.msgpack"
    assert bundle.checkpoint == root / "checkpoint.txt"
    assert bundle.checkpoints == root / "checkpoints.json"
    assert bundle.certificates == root / "certificates"
    assert bundle.certificate(2, 7) == root / "certificates" / "stage-2-round-7.cert"


def test_made_names_what_marks_a_run(tmp_path):
    run = RunLayout(tmp_path / "demo")
    assert run.made() == []  # not even the directory
    run.root.mkdir()
    run.config.write_text("")  # a config alone is a run being prepared, not one made
    run.telemetry.mkdir()
    assert run.made() == []
    write_atomic(run.summary, "{}")
    assert run.made() == [run.summary]
    run.log.mkdir()
    assert run.made() == [run.summary, run.log]
