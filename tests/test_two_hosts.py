"""Two hosts, as two network namespaces joined by a veth pair: the join kit's integration test.

The owner side (broker, notary, owner, one local trainer: `clicooper run`) lives in one
namespace at 10.77.0.1, a remote trainer (`clicooper join`) in the other at 10.77.0.2, with
its own key directory and nothing of the owner's but the join file. The device's processes
run with the auditor's libraries refused at import, as a lean `[trainer]` install has them
not. On the device's link, a keyless client and a client whose CURVE key the roster does not
list subscribe to everything and publish junk for the whole run: they must receive nothing and
change nothing (the run completes and its log verifies).

Needs root, `ip` and permission to make network namespaces (CI runs as root); skips otherwise,
naming what is missing.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from clicooper_bus.config import load_config
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tools import netns
from clicooper_bus.tools.cli import main as cli
from tests.busrun import write_config
from tests.test_join import BLOCKER

ROOT = Path(__file__).resolve().parents[1]
OWNER_IP, DEVICE_IP = "10.77.0.1", "10.77.0.2"


@pytest.fixture
def link():
    """Two namespaces (owner, device) joined by a veth pair; yields their names. Deletes both,
    and the pair, however the test ends (`tools/netns.py`)."""
    reason = netns.missing()
    if reason:
        pytest.skip(reason)
    with netns.pair(OWNER_IP, DEVICE_IP) as made:
        yield made.owner, made.device
    assert not netns.leftovers(made.tag), f"namespace or link {made.tag} left behind"


class Proc:
    """A process in a namespace, its stdout read line by line on a thread."""

    def __init__(self, ns: str, args: list[str], log: Path, env: dict | None = None):
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, *args], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                                  env=env, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.out.append(line)
            self.lines.put(line)

    def line_starting(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line.strip()
        raise AssertionError(f"no line starting {prefix!r}; got {''.join(self.out)!r}")

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()


def test_a_trainer_joins_from_another_host_and_strangers_get_nothing(link, tmp_path):
    owner_ns, device_ns = link
    run_id = f"two-{uuid.uuid4().hex[:6]}"
    owner_dir, device_keys = tmp_path / "owner", tmp_path / "device" / "keys"
    cfg_path = write_config(
        owner_dir, run_id=run_id, trainers=2, run={"max_steps": 20},
        participants={"trainers": ["trainer-1", "edge"], "remote": ["edge"]},
        bus={"pub": "tcp://0.0.0.0:7101", "sub": "tcp://0.0.0.0:7102", "join_timeout_s": 60.0})
    join_file = tmp_path / "device" / "edge.join"
    assert cli(["invite", "edge", "--config", str(cfg_path), "--host", OWNER_IP,
                "--out", str(join_file)]) == 0
    lean = tmp_path / "lean"  # the device's interpreters refuse the auditor's libraries
    lean.mkdir()
    (lean / "sitecustomize.py").write_text(BLOCKER)
    device_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(lean), str(ROOT)]),
                      PYTHONUNBUFFERED="1")
    procs: list[Proc] = []
    try:
        device = Proc(device_ns, ["-m", "clicooper_bus.tools.cli", "join", str(join_file),
                                  "--name", "edge", "--keys", str(device_keys)],
                      tmp_path / "join.err", device_env)
        procs.append(device)
        line = device.line_starting("clicooper keys add ", timeout_s=60)
        assert cli(["keys", "add", line.split()[-1], "--dir", str(owner_dir / "keys")]) == 0
        peers_out = tmp_path / "strangers.json"
        strangers = Proc(device_ns, ["-m", "tests.netns_peer", f"tcp://{OWNER_IP}:7101",
                                     f"tcp://{OWNER_IP}:7102", str(device_keys / "broker.pub"),
                                     run_id, str(peers_out)], tmp_path / "strangers.err")
        procs.append(strangers)
        owner = Proc(owner_ns, ["-m", "clicooper_bus.tools.cli", "run", "--config",
                                str(cfg_path)], tmp_path / "run.err",
                     dict(os.environ, PYTHONUNBUFFERED="1"))
        procs.append(owner)
        assert owner.p.wait(timeout=180) == 0, "".join(owner.out) + (tmp_path / "run.err").read_text()
        assert device.p.wait(timeout=60) == 0, "".join(device.out) + (tmp_path / "join.err").read_text()
        strangers.stop()
    finally:
        for p in procs:
            p.stop()

    said = "".join(device.out)
    assert "clicooper run: not starting remote trainer(s) edge" in "".join(owner.out)
    assert f"joined run '{run_id}' as stage 2" in said and "the trainer finished" in said
    cfg = load_config(cfg_path)
    log = verify_log(cfg.run_dir / "log", witnessed=[(cfg.run_dir / "checkpoint.txt").read_text()])
    assert log.ok, log.failure
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["stages"] == ["trainer-1", "edge"]
    for kind in ("fwd", "bwd", "labels", "segment"):  # nothing of the strangers' in the log
        assert log.per_kind.get(kind, 0) == summary["messages"].get(kind, 0), kind
    # the device needed nothing of the owner's but the join file
    device_cfg = (device_keys / f"edge.{run_id}.toml").read_text()
    assert str(owner_dir) not in device_cfg and "10.77.0.1:7101" in device_cfg
    counts = json.loads(peers_out.read_text())
    for who in ("keyless", "wrong_key"):
        c = counts[who]
        assert c.get("connected", 0) >= 2, (who, c)  # they did reach the broker over the link
        assert c.get("received", 0) == 0 and c.get("handshake_succeeded", 0) == 0, (who, c)
    assert counts["wrong_key"].get("handshake_failed_auth", 0) >= 2, counts


def test_the_skip_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert netns.missing().startswith("not root")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert netns.missing() == "no `ip` command (iproute2) on PATH"
