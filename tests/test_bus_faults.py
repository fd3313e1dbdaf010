"""Faults on a live bus: forged, replayed and foreign messages are rejected while training
completes; a killed broker makes every process say so and exit non-zero; two runs at once do
not interfere; a taken port is a clear error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clicooper_bus.config import load_config
from clicooper_bus.errors import ConfigError
from clicooper_bus.net.bus import Bus, BusAddress
from clicooper_bus.net.forwarder import Forwarder
from clicooper_bus.net.identity import Identity, load_identity
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Sender
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tools.run import ensure_keys, prepare, run
from clicooper_bus.tools.siege import siege
from tests.busrun import processes, write_config


def _telemetry(cfg, name: str) -> list[dict]:
    lines = (cfg.run_dir / "telemetry" / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _rogue(cfg, stop: threading.Event, done: dict) -> None:
    """Joins the broker, captures a real activation, then sends a replay of it, a copy with a
    broken signature, and a message signed by a key the roster does not list."""
    stranger = Identity.generate("mallory")
    bus = Bus(stranger, cfg.run.id, BusAddress(cfg.bus.pub, cfg.bus.sub),
              Verifier({}, cfg.run.id, partial=True))  # a plaintext bus: no broker key
    bus.subscribe(bus.topics.to("fwd", "trainer-1"))
    grabbed = None
    try:
        while not stop.is_set() and grabbed is None:
            if bus.sub.poll(100):
                grabbed = bus.sub.recv_multipart()
        if grabbed is None:
            return
        time.sleep(0.2)  # let the real message be consumed first
        replay = grabbed
        forged = list(grabbed)
        forged[2] = bytes([grabbed[2][0] ^ 1]) + grabbed[2][1:]
        foreign = Sender(stranger, cfg.run.id).seal("fwd", "trainer-1", b"\0" * 4,
                                                    dtype="float32", shape=[1], step=0)
        for frames in (replay, forged, foreign.frames()):
            bus.pub.send_multipart(frames)
        done["sent"] = True
        time.sleep(0.5)
    finally:
        bus.close()


def test_hostile_messages_are_rejected_while_training_completes(tmp_path):
    """On a plaintext bus, where the broker applies no rules and anyone can read and publish,
    the receivers themselves refuse what a stranger replays, forges or signs (the CURVE broker
    refuses the same before it reaches them: see the next test)."""
    path = write_config(tmp_path, run_id="hostile", trainers=2,
                        run={"max_steps": 150, "epochs": 3}, bus={"security": "none"})
    cfg = load_config(path)
    stop, done = threading.Event(), {}
    rogue = threading.Thread(target=_rogue, args=(cfg, stop, done), daemon=True)
    rogue.start()
    try:
        assert run(str(path), echo=False, timeout_s=240, free_ports=False) == 0
    finally:
        stop.set()
        rogue.join(5)
    assert done.get("sent"), "the rogue never saw the run's traffic"
    reasons = {e.get("reason") for e in _telemetry(cfg, "trainer-1")
               if e["event"] == "message rejected"}
    assert {"replayed_seq", "bad_signature", "unknown_key"} <= reasons, reasons
    reasons = {e.get("reason") for e in _telemetry(cfg, "notary")
               if e["event"] == "message rejected"}
    assert {"replayed_seq", "bad_signature", "unknown_key"} <= reasons, reasons
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["steps"] == 150
    r = verify_log(cfg.run_dir / "log")
    assert r.ok and r.per_kind["fwd"] == summary["messages"]["fwd"], r.failure


def test_strangers_and_a_rogue_member_change_nothing_on_a_curve_bus(tmp_path):
    """Issue 16, items 1 to 7 against a live run on the default (CURVE) bus: the run
    completes, its log verifies, the broker stays up; strangers receive nothing; what the
    rogue member tries is refused at the broker, each for its named reason."""
    path = write_config(tmp_path, run_id="siege", trainers=2, run={"max_steps": 120, "epochs": 3},
                        participants={"observers": ["spy"]})
    cfg = load_config(path)
    ensure_keys(Path(cfg.participants.keys), ["broker", "spy"])  # run() keeps existing keys
    with siege(cfg) as seen:  # the attackers, until the run is over
        assert run(str(path), echo=False, timeout_s=240, free_ports=False) == 0
    assert seen.get("received") == 0, "a stranger received a message"
    assert seen.get("kinds") == {"beat"}, seen  # the rogue read only what observers may
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["steps"] == 120
    stats = next(e for e in _telemetry(cfg, "broker") if e["event"] == "broker stopped")
    refused = stats["refused"]
    for reason in ("connection with a key the roster does not list",
                   "topic of another member's inbox", "presence signal of another member",
                   "signed by another key than the connection's"):
        assert refused.get(reason, 0) >= 1, (reason, refused)
    assert not any(e["event"] == "message rejected" for name in ("trainer-1", "trainer-2",
                                                                 "notary", "owner")
                   for e in _telemetry(cfg, name)), "something reached a receiver"


@pytest.mark.parametrize("victim", ["broker", "trainer-2", "notary", "owner"])
def test_a_killed_process_stops_everyone_with_an_error(tmp_path, victim):
    """SIGKILL one process mid-run: every other process (the broker aside) says who is gone
    within the rejoin timeout (here equal to the liveness timeout), even while other peers
    keep beating. A gone trainer stops the run cleanly (the owner and the other trainers exit 3,
    the notary closes the log, summary.json names it); a gone owner, notary or broker makes
    every other process exit non-zero."""
    timeout = 2.0
    # a gone trainer-2 has a trainer on each side of it (three trainers); for a gone owner,
    # notary or broker, two trainers prove the same (one process less to start: 2.5 s of CPU)
    path = write_config(tmp_path, run_id="kill", trainers=3 if victim == "trainer-2" else 2,
                        run={"epochs": 50},
                        bus={"timeout_s": timeout, "rejoin_timeout_s": timeout, "beat_s": 0.2})
    with processes(path) as (cfg, tel, procs):
        deadline = time.monotonic() + 90
        while "trainers joined" not in (tel / "owner.out").read_text():
            assert time.monotonic() < deadline, "the run never started"
            assert all(p.poll() is None for p in procs.values()), "a process died early"
            time.sleep(0.2)
        time.sleep(0.5)
        procs[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        codes = {}
        for name, p in procs.items():
            if name not in ("broker", victim):
                codes[name] = p.wait(timeout=timeout * 3 + 10)
        elapsed = time.monotonic() - killed
    if victim == "trainer-2":
        assert codes == {"notary": 0, "owner": 3, "trainer-1": 3, "trainer-3": 3}, codes
        stopped = json.loads((cfg.run_dir / "summary.json").read_text())["stopped"]
        assert stopped["gone"] == ["trainer-2"], stopped
    else:
        assert all(c != 0 for c in codes.values()), codes
    assert elapsed <= timeout * 3 + 5, f"took {elapsed:.1f} s to notice"
    for name in codes:
        err = (tel / f"{name}.jsonl").read_text()
        assert "gone" in err, (name, err[-500:])
    if victim != "notary":  # the notary kept what it logged, up to where the run died
        assert verify_log(cfg.run_dir / "log").ok
    else:  # killed, it still left a signed checkpoint: its first comes right after the roster
        with ProvenanceLog.open(cfg.run_dir / "log") as plog:
            assert plog.checkpoint_count >= 1 and plog.checkpoint_at(0).size == 1


def test_a_misbehaving_roster_member_cannot_derail_the_run(tmp_path):
    """Trainer 1 (authenticated, listed) sends forged metrics, unexpected outputs and bogus
    checkpoints: the owner and the other trainer ignore them and the run completes honestly."""
    path = write_config(tmp_path, run_id="evil", trainers=2, run={"max_steps": 40})
    with processes(path, evil="noise") as (cfg, tel, procs):
        codes = {n: p.wait(timeout=180) for n, p in procs.items() if n != "broker"}
    assert "evil messages sent" in (tel / "trainer-1.jsonl").read_text()
    assert codes == {n: 0 for n in codes}, codes
    s = json.loads((cfg.run_dir / "summary.json").read_text())
    assert s["steps"] == 40 and s["per_epoch"][0]["train_accuracy"] <= 1.0
    assert verify_log(cfg.run_dir / "log").ok


def test_a_step_that_never_comes_back_times_out(tmp_path):
    """A trainer that loses a step's activations but keeps beating cannot hang the owner."""
    path = write_config(tmp_path, run_id="lost", trainers=2, run={"max_steps": 40},
                        bus={"step_timeout_s": 3.0})
    with processes(path, evil="swallow") as (cfg, tel, procs):
        code = procs["owner"].wait(timeout=120)
    assert code == 1
    assert "waited 3 s for gradients of step 5" in (tel / "owner.jsonl").read_text()


def test_a_trainer_that_cannot_pipeline_is_refused(tmp_path):
    """A trainer from before pipelining would join a pipelined run and fail mid-run; the
    owner refuses it at the start, saying why."""
    path = write_config(tmp_path, run_id="old", trainers=2, run={"max_steps": 20, "in_flight": 2})
    with processes(path, evil="old") as (cfg, tel, procs):
        code = procs["owner"].wait(timeout=120)
    assert code == 1
    err = (tel / "owner.jsonl").read_text()
    assert "trainer-1 follows a schedule of 1 batch(es) in flight, the roster asks for 2" in err


def test_two_runs_at_once_do_not_interfere(tmp_path):
    paths = [write_config(tmp_path / n, run_id=n, trainers=1, run={"max_steps": 60, "seed": i})
             for i, n in enumerate(("left", "right"))]
    codes = {}

    def go(p):
        codes[p] = run(str(p), echo=False, timeout_s=240, free_ports=False)

    threads = [threading.Thread(target=go, args=(p,)) for p in paths]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert list(codes.values()) == [0, 0]
    roots = set()
    for p in paths:
        cfg = load_config(p)
        r = verify_log(cfg.run_dir / "log")
        assert r.ok and r.run_id == cfg.run.id and r.per_kind["fwd"] == 60, r.failure
        roots.add(r.root)
    assert len(roots) == 2


def test_trainer_refuses_a_roster_from_another_owner(tmp_path):
    """A trainer given the real owner's key ignores a roster signed by anyone else (on a
    plaintext bus, where the broker does not check who publishes)."""
    path = write_config(tmp_path, run_id="imp", trainers=1,
                        bus={"join_timeout_s": 4.0, "security": "none"})
    cfg, cfg_path = prepare(str(path), {}, None, free_ports=False)
    fwd = Forwarder(cfg.bus.pub, cfg.bus.sub).start()
    try:
        trainer = subprocess.Popen([sys.executable, "-m", "clicooper_bus.services.trainer", "--config",
                                    str(cfg_path), "--name", "trainer-1"],
                                   stderr=subprocess.PIPE, text=True)
        from clicooper_bus.net.roster import Roster
        impostor = Identity.generate("owner")
        keys = tmp_path / "keys"
        roster = Roster.build(cfg.run.id, owner=impostor.public,
                              trainers=[load_identity(keys / "trainer-1.key").public])
        bus = Bus(impostor, cfg.run.id, BusAddress(cfg.bus.pub, cfg.bus.sub),
                  Verifier({}, cfg.run.id))
        bus.wait_for_subscribers("hello", ["trainer-1"], 30)
        bus.send_bytes("roster", "all", roster.sign(impostor))
        _, err = trainer.communicate(timeout=30)
        bus.close()
    finally:
        fwd.close()
    assert trainer.returncode == 1
    assert "unknown_key" in err or "roster refused" in err
    assert "no roster naming 'trainer-1'" in err


def test_a_taken_port_is_a_clear_error(tmp_path):
    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()
    try:
        with pytest.raises(ConfigError, match="already in use"):
            Forwarder(fwd.pub_addr, "tcp://127.0.0.1:0")
        path = write_config(tmp_path, run_id="port", bus={"pub": fwd.pub_addr})
        prepare(str(path), {}, None, free_ports=False)  # the broker's key and the members'
        proc = subprocess.run([sys.executable, "-m", "clicooper_bus.services.broker", "--config", str(path)],
                              capture_output=True, text=True, timeout=60)
    finally:
        fwd.close()
    assert proc.returncode == 1 and "already in use" in proc.stderr
