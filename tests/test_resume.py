"""`clicooper run --resume RUN_DIR` (issue 17 item 3): a run interrupted in its second round
(SIGTERM to `clicooper run`, which stops every process and marks the directory) is taken up
again from its last round snapshot: the notary goes on with the same log (same tree, one more
checkpoint), the owner from its round snapshot with its chain continued from the notary's tip,
the trainers from theirs; everyone rolls back to that round boundary. With deterministic
settings (in_flight 1, no privacy filter) the final model is the uninterrupted run's, bit for
bit (the in-process reference, which the bus matches weight for weight)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from clicooper_bus.config import load_config
from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.models import state_dict_with_prefix
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tools.faults import owner_step
from clicooper_bus.tools.run import resume
from tests.busrun import write_config
from tests.test_restart import _console, _reference, _verified

PER = 20  # 640 samples at batch size 32


def _interrupt(path, cfg, at_step: int) -> None:
    """Start `clicooper run` and SIGTERM it once the owner reports `at_step`."""
    proc = subprocess.Popen([sys.executable, "-m", "clicooper_bus.tools.cli", "run", "--config",
                             str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while owner_step(cfg.run_dir, PER) < at_step:
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got there"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-800:]


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path):
    path = write_config(tmp_path, run_id="resumed", trainers=2,
                        run={"seed": 3, "epochs": 3, "snapshot_every": 5},
                        data={"train_limit": PER * 32, "test_limit": 64},
                        bus={"timeout_s": 1.0, "beat_s": 0.25, "rejoin_timeout_s": 30.0})
    cfg = load_config(path)
    _interrupt(path, cfg, PER + 3)
    layout = RunLayout(cfg.run_dir)
    assert layout.interrupted.exists() and not layout.summary.exists()
    entries = verify_log(layout.log).entries
    assert resume(str(cfg.run_dir), echo=False, timeout_s=240) == 0, _console(cfg)
    assert not layout.interrupted.exists()
    r = verify_log(layout.log)
    assert r.ok, r.failure
    # one rollback: the resume's, with each restarted trainer's rejoin (which comes right
    # behind what it sends again from its outbox); a rejoin later still gets one of its own
    assert r.entries > entries and r.per_kind.get("rollback") == 1, r.per_kind
    summary = json.loads(layout.summary.read_text())
    assert summary["steps"] == 3 * PER and len(summary["per_epoch"]) == 3
    ref = _reference(cfg)
    got, want = load_file(layout.model), state_dict_with_prefix(ref.segments)
    assert set(got) == set(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst == 0.0, f"max abs weight difference {worst} from the uninterrupted reference"
    assert summary["test_accuracy"] == ref.test_accuracy
    console = _console(cfg)
    assert "owner: resuming run 'resumed'" in console
    assert "owner: rolling back to step" in console


def test_resume_refuses_what_it_cannot_take_up(tmp_path):
    with pytest.raises(ClicooperError, match="holds no run to resume"):
        resume(str(tmp_path))
    path = write_config(tmp_path, run_id="private", trainers=2,
                        privacy={"mechanism": "gaussian", "noise_multiplier": 0.1})
    cfg = load_config(path)
    layout = RunLayout(cfg.run_dir)
    (layout.log).mkdir(parents=True)
    (layout.log / "log.json").write_text("{}")
    layout.config.write_text(path.read_text())
    with pytest.raises(ClicooperError, match="privacy defences cannot be resumed"):
        resume(str(cfg.run_dir))
    layout.summary.write_text("{}")
    with pytest.raises(ClicooperError, match="finished"):
        resume(str(cfg.run_dir))


def test_the_owner_notary_and_broker_killed_in_turn_and_restarted_the_run_completes(tmp_path):
    """One run, its owner, notary and broker each killed (SIGKILL) in turn and started again
    1 s later (the owner and the notary with --resume; the broker on the same addresses), as
    tests/test_pause.py pauses them in turn. The owner continues its chain from the notary's
    tip and rolls the live trainers back to its last round snapshot; the restarted notary goes
    on with the same log and every member sends again what it missed; after the broker, what
    was in flight is sent again to the notary and the owner rolls everyone back. The run
    completes, the log verifies against the final checkpoint with no gap, and the model is the
    unfaulted run's, bit for bit."""
    from clicooper_bus.tools.faults import Injector, Kill, launch

    path = write_config(tmp_path, run_id="killed-in-turn", trainers=2,
                        run={"seed": 3, "epochs": 3, "snapshot_every": 5},
                        data={"train_limit": PER * 32, "test_limit": 64},
                        bus={"timeout_s": 1.0, "beat_s": 0.25, "rejoin_timeout_s": 30.0})
    cfg = load_config(path)
    kills = [Kill("owner", PER + 3, 1.0), Kill("notary", PER + 13, 1.0),
             Kill("broker", 2 * PER + 5, 1.0)]
    inj = Injector(cfg.run_dir, kills, PER)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert [(d["role"], "new_pid" in d) for d in inj.done] == [
        ("owner", True), ("notary", True), ("broker", True)], inj.done
    assert code == 0, _console(cfg)
    layout = RunLayout(cfg.run_dir)
    r = verify_log(layout.log, witnessed=[layout.checkpoint.read_text()])
    assert r.ok, r.failure
    # the owner's resume rolls back; the broker's return does while training goes on (on a
    # loaded machine the run may have ended its training by then: the kill still lands)
    assert r.per_kind.get("rollback", 0) >= 1, r.per_kind
    console = _console(cfg)
    assert "owner: resuming run 'killed-in-turn'" in console
    assert "notary: resuming run 'killed-in-turn' on its log" in console
    assert "message(s) again for the notary" in console
    assert "owner: the broker connection was lost" in console
    ref = _reference(cfg)
    got, want = load_file(layout.model), state_dict_with_prefix(ref.segments)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst == 0.0, f"max abs weight difference {worst} from the unfaulted reference"


def test_a_killed_owner_restarts_in_a_watermarked_run_and_the_model_verifies(tmp_path):
    """The owner alone killed in its second round of a run with watermarks on and started
    again with --resume: its books (the watermark chain and the round-0 certificates) come
    from the log; the run completes and `model verify --exact` passes against the log."""
    from clicooper_bus.tools.faults import Injector, Kill, launch

    path = write_config(tmp_path, run_id="owner-killed", trainers=2,
                        run={"seed": 3, "epochs": 2, "snapshot_every": 5},
                        data={"train_limit": PER * 32, "test_limit": 64},
                        bus={"timeout_s": 1.0, "beat_s": 0.25, "rejoin_timeout_s": 30.0},
                        watermark={"enabled": True})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Kill("owner", PER + 3, 1.0)], PER)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert code == 0, _console(cfg)
    r, v = _verified(cfg)
    assert r.per_kind.get("rollback") == 1 and r.per_kind.get("restored") == 2, r.per_kind
    assert [s.rounds for s in v.stages] == [2, 2]
