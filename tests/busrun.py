"""Helpers for tests that start real processes: a config on free ports in a temp dir."""

from __future__ import annotations

from pathlib import Path

from clicooper_bus.config import load_config
from tools.run import free_port


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
                "timeout_s": 5.0, "join_timeout_s": 60.0},
        "log": {"checkpoint_every": 200},
    }
    for section, values in sections.items():
        over.setdefault(section, {}).update(values)
    cfg = load_config(None, over)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{run_id}.toml"
    path.write_text(cfg.to_toml())
    return path
