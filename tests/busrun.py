"""Helpers for tests that start real processes: a config on free ports in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from clicooper_bus.config import load_config
from clicooper_bus.tools.launch import _commands
from clicooper_bus.tools.run import free_port, prepare


def write_config(tmp: Path, *, run_id: str = "t", trainers: int = 3, **sections) -> Path:
    """A run config under `tmp` (keys in tmp/keys, output in tmp/runs) on free loopback ports,
    for the synthetic dataset, one thread per process; `sections` override any key."""
    over = {
        "run": {"id": run_id, "out_dir": str(tmp / "runs"), "epochs": 1, "batch_size": 32,
                "threads": 1, "trainer_threads": 1},
        "data": {"name": "synthetic"},
        "participants": {"keys": str(tmp / "keys"),
                         "trainers": [f"trainer-{i}" for i in range(1, trainers + 1)]},
        "bus": {"pub": f"tcp://127.0.0.1:{free_port()}", "sub": f"tcp://127.0.0.1:{free_port()}",
                "witness": f"tcp://127.0.0.1:{free_port()}",
                "timeout_s": 5.0, "join_timeout_s": 60.0},
        "log": {"checkpoint_every": 200},
        # off unless a test asks: a mark makes the bus differ from the in-process reference
        "watermark": {"enabled": False},
    }
    for section, values in sections.items():
        over.setdefault(section, {}).update(values)
    cfg = load_config(None, over)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{run_id}.toml"
    path.write_text(cfg.to_toml())
    return path


@contextmanager
def processes(path: Path, evil: str | None = None, evil_as: str = "trainer-1",
              evils: dict[str, str] | None = None):
    """Start every process of the run configured at `path` (`evil_as` replaced by
    tests/evil_trainer.py, or tests/evil_owner.py for the owner, in mode `evil`, if given;
    `evils`: several, {name: mode}); yields (config, telemetry dir, processes) and kills
    whatever is still running on the way out."""
    evils = dict(evils or {}, **({evil_as: evil} if evil is not None else {}))
    cfg, cfg_path = prepare(str(path), {}, None, free_ports=False)
    tel = cfg.run_dir / "telemetry"
    tel.mkdir(parents=True)
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd in _commands(cfg, cfg_path):
            env = None
            if name in evils:
                evil_module = "tests.evil_owner" if name == "owner" else "tests.evil_trainer"
                cmd = [sys.executable, "-m", evil_module, *cmd[3:]]
                env = dict(os.environ, EVIL_MODE=evils[name])
            procs[name] = subprocess.Popen(cmd, stdout=open(tel / f"{name}.out", "w"),
                                           stderr=open(tel / f"{name}.jsonl", "w"), env=env)
        yield cfg, tel, procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
