"""`make demo` starts the Procfile's processes itself, so it must make every key they load:
with CURVE that includes the broker's own and the following auditor's."""

from __future__ import annotations

import re
from pathlib import Path

from clicooper_bus.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_make_demo_makes_every_key_the_demo_config_needs():
    line = next(li for li in (ROOT / "Makefile").read_text().splitlines()
                if "keys ensure" in li and "runs/keys" in li)
    made = set(re.split(r"\s+", line.split("--dir runs/keys", 1)[1].strip()))
    p = load_config(ROOT / "configs" / "demo.toml").participants
    needed = {p.owner, p.notary, p.broker, *p.trainers, *p.observers}
    assert needed <= made, f"make demo does not make the keys of {sorted(needed - made)}"
    assert Path(p.keys) == Path("runs/keys")
    procfile = (ROOT / "Procfile").read_text()
    assert all(f"--name {t}" in procfile for t in p.trainers)
