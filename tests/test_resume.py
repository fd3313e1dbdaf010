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
from tests.test_restart import _console

PER = 20  # 640 samples at batch size 32


def _reference(cfg):
    """The uninterrupted run, in process (on the config's limited data)."""
    import torch

    from clicooper_bus.ml.data import load_dataset
    from clicooper_bus.ml.models import default_cuts, model_spec
    from clicooper_bus.ml.reference import train_reference

    data = load_dataset(cfg.data.name, None, cfg.run.seed).limit(cfg.data.train_limit,
                                                                 cfg.data.test_limit)
    spec = model_spec(cfg.model.name, data.input_shape, data.classes)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.run.threads)
    try:
        return train_reference(data, spec, default_cuts(spec, len(cfg.participants.trainers)),
                               seed=cfg.run.seed, epochs=cfg.run.epochs,
                               batch_size=cfg.run.batch_size, lr=cfg.run.lr,
                               evaluate_each_epoch=False)
    finally:
        torch.set_num_threads(threads)


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


def test_a_killed_owner_restarts_and_the_run_completes(tmp_path):
    """The owner alone killed in its second round (watermarks on) and started again with
    --resume while the trainers and the notary wait for it (suspected, within
    rejoin_timeout_s): it continues its chain from the notary's tip, takes its books (the
    watermark chain and certificates included) from the log, and rolls the live trainers back
    to its last round snapshot; the run completes, the log verifies and `model verify` passes
    against it. (Bit for bit: the interrupted run's test; marks make a run's weights depend on
    its checkpoints' roots.)"""
    from clicooper_bus.ml.watermark.verify import verify_model
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
    assert [(d["role"], "new_pid" in d) for d in inj.done] == [("owner", True)], inj.done
    assert code == 0, _console(cfg)
    layout = RunLayout(cfg.run_dir)
    r = verify_log(layout.log)
    assert r.ok, r.failure
    assert r.per_kind.get("rollback") == 1 and r.per_kind.get("restored") == 2, r.per_kind
    v = verify_model(layout.model, layout.provenance.root, log_dir=layout.log, exact=True)
    assert v.ok, v.failure
    assert [s.rounds for s in v.stages] == [2, 2]


def test_a_killed_notary_restarts_on_its_log_and_the_run_completes(tmp_path):
    """The notary killed mid-run and started again with --resume: it goes on with the same log
    (same tree: every checkpoint before is consistent with the final one), tells every member
    where its chain stands, and each sends again what it published while the notary was down,
    so the log has no gap. The owner held meanwhile: the model is the unfaulted one."""
    from clicooper_bus.tools.faults import Injector, Kill, launch

    path = write_config(tmp_path, run_id="notary-killed", trainers=2,
                        run={"seed": 3, "epochs": 2, "snapshot_every": 5},
                        data={"train_limit": PER * 32, "test_limit": 64},
                        bus={"timeout_s": 1.0, "beat_s": 0.25, "rejoin_timeout_s": 30.0})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Kill("notary", PER + 3, 1.0)], PER)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert code == 0, _console(cfg)
    layout = RunLayout(cfg.run_dir)
    r = verify_log(layout.log, witnessed=[layout.checkpoint.read_text()])
    assert r.ok, r.failure
    assert r.per_kind.get("tip", 0) >= 3, r.per_kind  # the owner's and both trainers'
    console = _console(cfg)
    assert "notary: resuming run 'notary-killed' on its log" in console
    assert "message(s) again for the notary" in console
    ref = _reference(cfg)
    got, want = load_file(layout.model), state_dict_with_prefix(ref.segments)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst == 0.0, f"max abs weight difference {worst} from the unfaulted reference"


def test_a_killed_broker_restarts_on_its_addresses_and_the_run_completes(tmp_path):
    """The broker killed mid-run and started again on the same addresses: every participant's
    connection comes back by itself (same CURVE keys); what was in flight is lost, so the notary
    tips every sender whose chain has a gap (each sends again what it missed: the log has no
    hole) and the owner rolls everyone back to a step all committed. The model is the unfaulted
    run's, bit for bit."""
    from clicooper_bus.tools.faults import Injector, Kill, launch

    path = write_config(tmp_path, run_id="broker-killed", trainers=2,
                        run={"seed": 3, "epochs": 2, "snapshot_every": 5},
                        data={"train_limit": PER * 32, "test_limit": 64},
                        bus={"timeout_s": 1.0, "beat_s": 0.25, "rejoin_timeout_s": 30.0})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Kill("broker", PER + 3, 1.0)], PER)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert code == 0, _console(cfg)
    layout = RunLayout(cfg.run_dir)
    r = verify_log(layout.log, witnessed=[layout.checkpoint.read_text()])
    assert r.ok, r.failure
    assert r.per_kind.get("rollback") == 1, r.per_kind
    console = _console(cfg)
    assert "owner: the broker connection came back" in console
    ref = _reference(cfg)
    got, want = load_file(layout.model), state_dict_with_prefix(ref.segments)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst == 0.0, f"max abs weight difference {worst} from the unfaulted reference"
