"""Pause and rejoin (issue 17 item 1): a silent peer is suspected after `[bus] timeout_s` and
gone only after `rejoin_timeout_s`. A pause of any role shorter than that ends in a completed
run whose log and model verify; a longer one stops the run cleanly, naming who is gone."""

from __future__ import annotations

import json
import time

import pytest

from clicooper_bus.config import load_config
from clicooper_bus.errors import ConfigError
from clicooper_bus.ml.watermark.verify import verify_model
from clicooper_bus.net.bus import Bus, BusAddress
from clicooper_bus.net.forwarder import Forwarder
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.liveness import PeersGone
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tools.faults import Injector, Pause, plan_pauses
from clicooper_bus.tools.run import run
from tests.busrun import write_config

STEPS = 63  # training batches of the synthetic set at batch size 32 (one epoch)
# suspected after 1 s, gone after 20 s: pauses of 2 s (twice the timeout, 8 missed beats) are
# well inside, beats 4 a second
BUS = {"timeout_s": 1.0, "rejoin_timeout_s": 20.0, "beat_s": 0.25}


def test_rejoin_timeout_below_timeout_is_refused():
    with pytest.raises(ConfigError, match="rejoin_timeout_s .* shorter than timeout_s"):
        load_config(None, {"bus": {"timeout_s": 5.0, "rejoin_timeout_s": 2.0}})
    assert load_config(None).bus.rejoin_timeout_s == 60.0


def test_a_silent_peer_is_suspected_then_back_then_gone():
    """The bus's verdicts on a watched peer by how long it has been silent (set directly, no
    waiting): under timeout_s nothing; past it suspected (said once), heard again back (said
    once); past rejoin_timeout_s gone, naming it; and a stretch in which this process itself
    did not listen does not count as the peer's silence."""
    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()
    said: list[str] = []
    bus = Bus(Identity.generate("owner"), "r", BusAddress(fwd.pub_addr, fwd.sub_addr),
              Verifier({}, "r", partial=True), timeout_s=1.0, rejoin_timeout_s=10.0,
              notice=said.append)
    try:
        bus.watch({"k1": "trainer-1", "k2": "notary"})
        now = time.monotonic()
        bus.last_seen.update(k1=now, k2=now)
        bus.check_watched()
        assert bus.suspects() == [] and said == []
        bus.last_seen["k1"] = now - 3.0
        bus.check_watched()
        bus.check_watched()
        assert bus.suspects() == ["trainer-1"]
        assert len(said) == 1 and said[0].startswith("trainer-1 silent for 3.0 s: suspected")
        bus.last_seen["k1"] = time.monotonic()
        bus.check_watched()
        assert bus.suspects() == [] and said[1].startswith("trainer-1 is back after")
        bus.last_seen["k2"] = time.monotonic() - 11.0
        with pytest.raises(PeersGone, match="no message from notary for 10 s") as gone:
            bus.check_watched()
        assert gone.value.names == ["notary"]
        bus.unwatch(["notary"])
        bus.check_watched()
        assert bus.suspects() == []
        # this process was the one stopped (5 s since it last listened): that is not
        # trainer-1's silence, which counts only from when we listened last
        now = time.monotonic()
        bus.last_check, bus.last_seen["k1"] = now - 5.0, now - 5.5
        bus.check_watched()
        assert bus.suspects() == [] and bus.away_s >= 5.0
    finally:
        bus.close()
        fwd.close()


def _console(cfg) -> str:
    tel = cfg.run_dir / "telemetry"
    return "".join(p.read_text() for p in sorted(tel.glob("*.out")))


def _events(cfg, name: str) -> list[dict]:
    lines = (cfg.run_dir / "telemetry" / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_each_role_paused_in_turn_and_the_run_completes(tmp_path):
    """Trainer, owner, notary and broker each stopped (SIGSTOP) for 2 s in turn, at seeded
    random steps of one run, with timeout_s 1 s: everyone suspects the silent one and says so,
    nobody gives up, and the run completes with nothing lost: the log verifies (a lost message
    would be a gap in its sender's chain), the delivered model verifies against its
    provenance, and the accuracy is within 1 point of an unfaulted run of the same seed."""
    sections = dict(run={"seed": 5}, bus=BUS, watermark={"enabled": True})
    clean = write_config(tmp_path / "clean", run_id="clean", trainers=2, **sections)
    assert run(str(clean), echo=False, timeout_s=300, free_ports=False) == 0
    path = write_config(tmp_path / "paused", run_id="paused", trainers=2, **sections)
    cfg = load_config(path)
    pauses = plan_pauses(5, ["trainer-2", "owner", "notary", "broker"], STEPS, (2.0, 2.0))
    inj = Injector(cfg.run_dir, pauses, STEPS).start()
    try:
        code = run(str(path), echo=False, timeout_s=300, free_ports=False)
    finally:
        inj.stop()
    assert not inj.errors, inj.errors
    assert [d["role"] for d in inj.done] == ["trainer-2", "owner", "notary", "broker"], inj.done
    assert code == 0, _console(cfg)[-2000:]
    r = verify_log(cfg.run_dir / "log")
    assert r.ok, r.failure
    v = verify_model(cfg.run_dir / "model.safetensors", cfg.run_dir / "provenance",
                     log_dir=cfg.run_dir / "log")
    assert v.ok, v.failure
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    reference = json.loads((load_config(clean).run_dir / "summary.json").read_text())
    assert summary["steps"] == reference["steps"] == STEPS
    assert abs(summary["test_accuracy"] - reference["test_accuracy"]) <= 0.01
    console = _console(cfg)
    for silent, watchers in (("trainer-2", ("owner", "notary", "trainer-1")),
                             ("owner", ("notary", "trainer-1", "trainer-2")),
                             ("notary", ("owner",))):
        for w in watchers:
            assert f"{w}: {silent} silent for" in console, (w, silent)
            assert f"{w}: {silent} is back after" in console, (w, silent)
            assert any(e["event"] == "peer suspected" and e["peer"] == silent
                       for e in _events(cfg, w)), (w, silent)
    # the broker's pause silences everyone for everyone: the owner suspects all its peers
    assert "owner: trainer-1 silent for" in console
    broker = next(e for e in _events(cfg, "broker") if e["event"] == "broker stopped")
    assert broker["lossy_sends"] == 0, broker


def test_a_peer_gone_past_the_rejoin_timeout_stops_the_run_cleanly(tmp_path, capsys,
                                                                    monkeypatch):
    """Trainer 2 stopped and never continued: past rejoin_timeout_s (3 s) the owner stops the
    run, naming it on the console and in summary.json under 'stopped'; the notary signs a
    final checkpoint, the log verifies, no model is saved; clicooper run stops the process that
    never returned (after 2 s here, 10 s by default) and exits 3."""
    import clicooper_bus.tools.launch as tr

    monkeypatch.setattr(tr, "GONE_GRACE_S", 2.0)  # 8 s of the suite's time less
    path = write_config(tmp_path, run_id="gone", trainers=2,
                        bus={"timeout_s": 1.0, "rejoin_timeout_s": 3.0, "beat_s": 0.25})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Pause("trainer-2", 10, 600.0)], STEPS).start()
    try:
        code = run(str(path), echo=False, timeout_s=300, free_ports=False)
    finally:
        inj.stop()
    assert not inj.errors, inj.errors
    assert code == 3, _console(cfg)[-2000:]
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["stopped"]["gone"] == ["trainer-2"], summary["stopped"]
    assert summary["model_file"] is None and summary["final_checkpoint"] is not None
    assert not (cfg.run_dir / "model.safetensors").exists()
    err = capsys.readouterr().err
    assert "run gone STOPPED: trainer-2 gone (silent past [bus] rejoin_timeout_s, 3 s)" in err
    assert "trainer-2 still running 2 s after the run was stopped" in err
    assert "owner: error: no message from trainer-2 for 3 s" in \
        (cfg.run_dir / "telemetry" / "owner.jsonl").read_text()
    r = verify_log(cfg.run_dir / "log")
    assert r.ok, r.failure
