"""Stopping `clicooper run`: a signal to it alone stops every process of the run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from clicooper_bus.config import load_config
from tests.busrun import write_config


def _command_lines() -> dict[str, str]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[p.name] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace")
            except OSError:  # gone meanwhile
                pass
    return out


def test_sigterm_to_clicooper_run_stops_every_process_of_the_run(tmp_path):
    """`clicooper run` starts each process in its own session; SIGTERM to it alone must still
    stop them all (nothing orphaned), and say so."""
    path = write_config(tmp_path, run_id="term", trainers=2, run={"epochs": 50})
    cfg = load_config(path)
    proc = subprocess.Popen([sys.executable, "-m", "clicooper_bus.tools.cli", "run", "--config",
                             str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    out = cfg.run_dir / "telemetry" / "owner.out"
    while not (out.exists() and "trainers joined" in out.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "stopped by SIGTERM" in err, err[-500:]
    left = [pid for pid, cmd in _command_lines().items() if str(cfg.run_dir) in cmd]
    assert not left, f"orphaned processes: {left}"
