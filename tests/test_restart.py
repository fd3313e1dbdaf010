"""A killed trainer comes back (issue 17 items 1 and 6): trainer-1 is killed with SIGKILL in
the middle of a run and its command line started again; the restarted process finds its
snapshots, continues its signed chain after the last message its dead process signed (its
outbox; what the log missed of them it sends again after its rejoin), and the owner rolls
everyone back to the last step every stage committed. The run completes with its log verifying, the model
the log's ack names, and the weights of an unfaulted run (the in-process reference, which the
bus matches weight for weight)."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from clicooper_bus.config import load_config
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.data import load_dataset
from clicooper_bus.ml.models import default_cuts, model_spec, state_dict_with_prefix
from clicooper_bus.ml.reference import train_reference
from clicooper_bus.ml.watermark.verify import verify_model
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tools.faults import Injector, Kill, launch
from tests.busrun import write_config

STEPS = 63  # training batches of the synthetic set at batch size 32 (one epoch)
BUS = {"timeout_s": 1.0, "rejoin_timeout_s": 30.0, "beat_s": 0.25}
RUN = {"seed": 3, "snapshot_every": 10}


def _console(cfg) -> str:
    tel = cfg.run_dir / "telemetry"
    return "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tel.glob("*.out")))


def _verified(cfg):
    """(log verdict, model verdict with the log, exact) of a finished run, both asserted ok."""
    layout = RunLayout(cfg.run_dir)
    r = verify_log(layout.log)
    assert r.ok, r.failure
    v = verify_model(layout.model, layout.provenance.root, log_dir=layout.log, exact=True)
    assert v.ok, v.failure
    return r, v


def _reference(cfg):
    """The uninterrupted run, in process (on the config's data, limited as the run's is)."""
    data = load_dataset(cfg.data.name, None, cfg.run.seed).limit(
        cfg.data.train_limit or None, cfg.data.test_limit or None)
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


def test_a_killed_trainer_restarts_and_the_run_completes(tmp_path):
    """Killed at step 25 (snapshots every 10 steps), restarted 1 s later: the run rolls back to
    step 20 (or 10, if the kill fell between a snapshot and its commitment), says so in the
    log (the owner's rollback, the rejoined trainer's rejoin, every trainer's restored), and
    ends with exit 0, a verifying log and the unfaulted weights."""
    path = write_config(tmp_path, run_id="killed", trainers=2, run=RUN, bus=BUS,
                        log={"retention": "all"})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Kill("trainer-1", 25, 1.0)], STEPS)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert [(d["role"], d["killed"]) for d in inj.done] == [("trainer-1", True)], inj.done
    assert code == 0, _console(cfg)
    r = verify_log(cfg.run_dir / "log")
    assert r.ok, r.failure
    assert r.per_kind.get("rollback") == 1 and r.per_kind.get("rejoin") == 1, r.per_kind
    assert r.per_kind.get("restored") == 2 and r.per_kind.get("tip", 0) >= 1, r.per_kind
    # replayed steps are in the log twice: more activations than steps
    assert r.per_kind["fwd"] > STEPS * 2, r.per_kind
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    model = cfg.run_dir / "model.safetensors"
    assert summary["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert summary["steps"] == STEPS
    # the steps trained again (how many depends on when the owner noticed) gave the owner the
    # very gradients they gave it the first time (the comparison itself: test_equivocation.py)
    replays = summary["replays"]
    assert replays["rollbacks"] == 1 and 1 <= replays["steps_trained_again"] <= 16, replays
    assert replays["messages_differing"] == 0, replays
    ref = _reference(cfg)
    got, want = load_file(model), state_dict_with_prefix(ref.segments)
    assert set(got) == set(want)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-5, f"max abs weight difference {worst} from the unfaulted reference"
    assert abs(summary["test_accuracy"] - ref.test_accuracy) <= 0.01
    console = _console(cfg)
    assert "owner: rolling back to step" in console and "trainer-1: rejoined at seq" in console
    # replay verification re-executes both spans: to the kill, then from the rollback's step
    # on the state the replay itself held there (issue 19)
    from clicooper_bus.audit.training_replay import verify_training

    for s in verify_training(cfg.run_dir):
        assert s.ok and s.complete and s.rollbacks == 1 and s.steps == set(range(STEPS)), \
            s.line()
        assert "across 1 rollback; no divergence" in s.line()
    # each message is replayed in the span of its sender's own chain, not where the log put it:
    # a trainer's activations logged after the owner's rollback are of the span before
    from clicooper_bus.tlog.log import ProvenanceLog
    from tests.replay_logs import assert_same_verdicts_in_any_sender_order

    with ProvenanceLog.open(cfg.run_dir / "log") as plog:
        assert_same_verdicts_in_any_sender_order(plog)
        _a_gap_in_steps_a_rollback_discarded_stops_nothing(plog)


def test_a_killed_trainer_rejoins_a_watermarked_run(tmp_path):
    """Watermarks on (each epoch a round), trainer-1 killed in round 1 and restarted: it takes
    its watermark chain up from the notary's tip (its round-1 commitment, hence its key and
    mark, and its round-0 claim), the run rolls back no further than the end of round 0 and
    completes; the log verifies and `model verify` passes against the log, naming trainer-1
    for stage 1 in both rounds."""
    path = write_config(tmp_path, run_id="wm-killed", trainers=2, bus=BUS,
                        run={"seed": 3, "snapshot_every": 5, "epochs": 2},
                        data={"train_limit": 320, "test_limit": 64},
                        watermark={"enabled": True}, log={"retention": "all"})
    cfg = load_config(path)
    per = 10  # 320 samples at batch size 32
    inj = Injector(cfg.run_dir, [Kill("trainer-1", per + 3, 1.0)], per)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert code == 0, _console(cfg)
    r, v = _verified(cfg)
    assert r.per_kind.get("rollback") == 1 and r.per_kind.get("rejoin") == 1, r.per_kind
    assert r.per_kind.get("wm_commit") == 4 and r.per_kind.get("wm_claim") == 4, r.per_kind
    assert [(s.stage, s.trainer, s.rounds) for s in v.stages] == [(1, "trainer-1", 2),
                                                                  (2, "trainer-2", 2)]
    console = _console(cfg)
    assert "trainer-1: rejoined at seq" in console and "owner: rolling back to step" in console
    # every stage replays in full across the rollback, marks included (issue 19)
    from clicooper_bus.audit.model_replay import verify_model_replayed

    layout = RunLayout(cfg.run_dir)
    v = verify_model_replayed(layout.model, layout.provenance.root, log_dir=layout.log,
                              full_replay=True)
    assert v.ok and all("across 1 rollback; no divergence" in s.replay for s in v.stages), v


def _a_gap_in_steps_a_rollback_discarded_stops_nothing(plog) -> None:
    """A body the log did not keep of a step the rollback trains again (the last input
    trainer-1 had before the rollback) ends trainer-1's first span early, as running out of
    inputs there does; its replay goes on from the rollback, complete."""
    from clicooper_bus.audit.replay_timeline import timeline
    from clicooper_bus.audit.training_replay import replay_log
    from clicooper_bus.net.roster import Roster
    from tests.replay_logs import Forged

    tl = timeline(plog, Roster.open(plog.roster_bytes))
    late = max(p.entry for p in tl.entries if p.header.to == "trainer-1" and p.span == 0
               and p.header.kind in ("fwd", "bwd") and p.header.step >= tl.breaks[0].step)
    one, _ = replay_log(Forged(plog, edit=lambda i, h, b: (h, None if i == late else b)))
    assert one.ok and one.complete and one.rollbacks == 1, one.line()


@pytest.mark.parametrize("role", ["trainer-1", "owner"])
def test_a_member_killed_while_the_notary_is_down_goes_on_after_what_it_signed(tmp_path, role):
    """The notary killed, and 1.5 s later (while it is down) a trainer or the owner killed and
    started again (the owner with --resume); the notary is started again with --resume 6 s
    after its kill. The messages the dead member signed meanwhile reached the others, never the
    log. Its restarted process goes on after the last of them (its outbox, `net.outbox`) and
    sends them again for the log, so that what receivers show the notary is what the log
    holds: no honest member is accused of equivocation (before the outbox it was, and the run
    stopped), the run completes with the unfaulted weights and every stage's replay
    verifies."""
    # two epochs, the notary killed at step 10: training cannot end in the second the owner
    # takes to hold for the notary, so the member is killed while the run holds
    path = write_config(tmp_path, run_id="notary-down-restart", trainers=2,
                        run={**RUN, "epochs": 2}, bus=BUS, log={"retention": "all"})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Kill("notary", 10, 6.0, overlap=True),
                                 Kill(role, 10, 1.0, after_s=1.5)], STEPS)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert [(d["role"], "new_pid" in d) for d in inj.done] == [("notary", True),
                                                              (role, True)], inj.done
    assert code == 0, _console(cfg)
    layout = RunLayout(cfg.run_dir)
    r = verify_log(layout.log, witnessed=[layout.checkpoint.read_text()])
    assert r.ok, r.failure
    assert "equivocation" not in r.per_kind, r.per_kind
    assert r.per_kind.get("rollback") == 1, r.per_kind
    assert r.per_kind.get("rejoin", 0) == (role != "owner"), r.per_kind
    assert r.per_kind.get("witnessed", 0) >= 1, r.per_kind  # receivers showed what they took
    console = _console(cfg)
    sent_again = re.search(rf"{role}: sent again (\d+) message\(s\) our dead process signed",
                           console)
    assert sent_again and int(sent_again.group(1)) >= 1, console
    assert "notary: resuming run 'notary-down-restart' on its log" in console
    ref = _reference(cfg)
    got, want = load_file(layout.model), state_dict_with_prefix(ref.segments)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-5, f"max abs weight difference {worst} from the unfaulted reference"
    from clicooper_bus.audit.training_replay import verify_training

    for s in verify_training(cfg.run_dir):
        assert s.ok and s.complete and s.rollbacks == 1, s.line()


def test_a_claim_the_dead_process_wrote_but_never_sent_reaches_everyone(tmp_path, monkeypatch):
    """Review: watermarks on, trainer-1's round-0 claim written to its outbox and never sent
    (`tests/fault_site/sitecustomize.py`: the process hangs there until it is killed). Its
    restarted process sends the claim again before anything new, so the owner takes it (when
    the rejoin went first, the owner refused it as a replay, waited for a claim that never came
    and the run failed); the notary certifies it, the run completes and replays."""
    _fault(monkeypatch, "trainer-1:lose:wm_claim", tmp_path / "lost.seq")
    path = write_config(tmp_path, run_id="lost-claim", trainers=2, bus=BUS,
                        run={"seed": 3, "snapshot_every": 10, "epochs": 2},
                        watermark={"enabled": True}, log={"retention": "all"})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Kill("trainer-1", STEPS - 9, 1.0, after_s=4.0)], STEPS)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert (tmp_path / "lost.seq").exists(), _console(cfg)  # the claim was held back
    assert code == 0, _console(cfg)
    r, v = _verified(cfg)
    assert r.per_kind.get("wm_claim") == 4 and r.per_kind.get("wm_cert") == 4, r.per_kind
    assert "trainer-1: sent again 1 message(s)" in _console(cfg)
    from clicooper_bus.audit.training_replay import verify_training

    for s in verify_training(cfg.run_dir):
        assert s.ok and s.complete, s.line()


def test_a_trainer_killed_during_the_resumed_owners_rollback_gets_one_of_its_own(tmp_path,
                                                                               monkeypatch):
    """Review: the owner killed and resumed; trainer-1 dies between receiving the resumed
    owner's rollback and handling it (`tests/fault_site/sitecustomize.py` hangs it there; the
    injector kills it) and comes back. Its rejoin interrupts the resumed owner's rollback, which
    no longer waits for a `restored` that cannot come: a rollback of its own follows, and the
    run completes with the unfaulted weights (it hung until step_timeout_s, and exited 1)."""
    _fault(monkeypatch, "trainer-1:hang:rollback", tmp_path / "hung.step")
    path = write_config(tmp_path, run_id="killed-in-resume", trainers=2,
                        run={**RUN, "epochs": 2}, log={"retention": "all"},
                        bus={**BUS, "step_timeout_s": 60.0})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Kill("owner", 10, 1.0, overlap=True),
                                 Kill("trainer-1", 10, 1.0, after_s=10.0)], STEPS)
    code = launch(path, timeout_s=300, inject=inj)
    assert not inj.errors, inj.errors
    assert (tmp_path / "hung.step").exists(), _console(cfg)  # it died in the rollback
    assert code == 0, _console(cfg)
    r = verify_log(RunLayout(cfg.run_dir).log)
    assert r.ok, r.failure
    assert r.per_kind.get("rollback") == 2 and r.per_kind.get("rejoin") == 1, r.per_kind
    ref = _reference(cfg)
    got, want = load_file(RunLayout(cfg.run_dir).model), state_dict_with_prefix(ref.segments)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst <= 1e-5, f"max abs weight difference {worst} from the unfaulted reference"


def _fault(monkeypatch, fault: str, mark) -> None:
    """Start the run's processes with `tests/fault_site/sitecustomize.py` on their path, set
    to inject `fault` (NAME:WHAT) once, recorded in the file `mark`."""
    from pathlib import Path

    site = Path(__file__).parent / "fault_site"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("CLICOOPER_TEST_FAULT", fault)
    monkeypatch.setenv("CLICOOPER_TEST_MARK", str(mark))
