"""Shared fixtures: identities, a roster, and small real logs written by the demo writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from clicooper_bus.net.identity import Identity
from clicooper_bus.net.roster import Roster
from clicooper_bus.tools.log_demo import write_demo

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MERKLE_VECTORS = SHARED / "testdata" / "merkle"


@pytest.fixture(scope="session")
def ids() -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in ("owner", "trainer-1", "trainer-2", "notary")}


@pytest.fixture(scope="session")
def roster(ids: dict[str, Identity]) -> Roster:
    return Roster.build("run-1", owner=ids["owner"].public,
                        trainers=[ids["trainer-1"].public, ids["trainer-2"].public],
                        notary=ids["notary"].public)


def make_log(directory: Path, messages: int = 200, **kw) -> Path:
    """A real demo log of `messages` entries; returns the log directory (closed)."""
    kw.setdefault("shape", (4, 8))
    kw.setdefault("checkpoint_every", 50)
    kw.setdefault("fsync", "never")
    log_dir = directory / "log"
    write_demo(log_dir, messages=messages, keys_dir=directory / "keys", **kw).close()
    return log_dir


@pytest.fixture
def small_log(tmp_path: Path) -> Path:
    return make_log(tmp_path)


def ci() -> bool:
    return bool(os.environ.get("CI"))
