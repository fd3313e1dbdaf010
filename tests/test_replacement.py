"""A standby takes over a gone trainer's stage (issue 17 item 2): trainer-1 killed in round 1
of 2 and not restarted is gone after rejoin_timeout_s; the owner hands its stage to standby-1
with the state trainer-1 committed at the round boundary, sealed to standby-1's key; round 1
starts again, every stage committing anew, standby-1's first commitment linking to trainer-1's
claim of round 0. The run completes, the log verifies with the handover in it, and `model
verify` passes against the log and names both trainers of stage 1 with their rounds."""

from __future__ import annotations

import json
import shutil

import pytest

from clicooper_bus.config import load_config
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.watermark.verify import verify_model
from clicooper_bus.tools.faults import Injector, Kill, launch
from tests.busrun import write_config
from tests.test_restart import _console, _verified

PER = 10  # 320 samples at batch size 32


@pytest.fixture(scope="module")
def replaced(tmp_path_factory):
    """The run, trainer-1 killed in round 1 and never restarted: (config, exit code,
    injector)."""
    tmp_path = tmp_path_factory.mktemp("replaced")
    path = write_config(tmp_path, run_id="replaced", trainers=2,
                        participants={"standby": ["standby-1"]},
                        run={"seed": 3, "epochs": 2, "snapshot_every": 5},
                        data={"train_limit": PER * 32, "test_limit": 64},
                        bus={"timeout_s": 1.0, "beat_s": 0.25, "rejoin_timeout_s": 4.0},
                        watermark={"enabled": True}, log={"retention": "all"})
    cfg = load_config(path)
    inj = Injector(cfg.run_dir, [Kill("trainer-1", PER + 3, None)], PER)
    return cfg, launch(path, timeout_s=300, inject=inj), inj


def test_a_standby_takes_over_a_gone_trainers_stage_and_the_chain_records_it(replaced):
    cfg, code, inj = replaced
    assert not inj.errors, inj.errors
    assert code == 0, _console(cfg)
    layout = RunLayout(cfg.run_dir)
    r, v = _verified(cfg)
    assert r.per_kind.get("handover") == 1 and r.per_kind.get("rollback") == 1, r.per_kind
    assert [(s.stage, s.trainer, s.trainers) for s in v.stages] == [
        (1, "standby-1", {"trainer-1": [0], "standby-1": [1]}),
        (2, "trainer-2", {"trainer-2": [0, 1]})]
    summary = json.loads(layout.summary.read_text())
    assert summary["stages"] == ["standby-1", "trainer-2"] and summary["steps"] == 2 * PER
    console = _console(cfg)
    assert "owner: trainer-1 gone: stage 1 handed over to standby-1 from step 10" in console
    assert "standby-1: took over stage 1 from trainer-1 at step 10" in console
    # replay verification follows the stage to the standby (issue 19): trainer-1's steps, then
    # from the rollback on the standby's, with its own commitments' marks, bit for bit
    from clicooper_bus.audit.model_replay import verify_model_replayed

    v = verify_model_replayed(layout.model, layout.provenance.root, log_dir=layout.log,
                              full_replay=True)
    assert v.ok, v.failure
    assert "stage 1 (trainer-1, then standby-1)" in v.stages[0].replay, v.stages[0].replay
    assert all("across 1 rollback; no divergence" in s.replay for s in v.stages), v
    from clicooper_bus.tlog.log import ProvenanceLog
    from tests.replay_logs import assert_same_verdicts_in_any_sender_order

    with ProvenanceLog.open(layout.log) as plog:  # a standby's span is its own chain's
        assert_same_verdicts_in_any_sender_order(plog)


def test_a_handover_the_owner_did_not_sign_or_to_no_standby_fails_verification(replaced,
                                                                               tmp_path):
    """The bundle's handover is checked: its body changed (another standby, say) or its
    signature broken, the verdict names it; without the handover, standby-1's certificates are
    not the roster's trainer's and the chain breaks."""
    from clicooper_bus.net import codec

    cfg, code, _ = replaced
    assert code == 0
    layout = RunLayout(cfg.run_dir)
    cases = {"body": lambda h: [h[0], h[1][:-1] + bytes([h[1][-1] ^ 1])],
             "signature": lambda h: [h[0][:-1] + bytes([h[0][-1] ^ 1]), h[1]]}
    for what, change in cases.items():
        bundle = tmp_path / what
        shutil.copytree(layout.provenance.root, bundle)
        handovers = codec.unpack((bundle / "handovers.msgpack").read_bytes())
        (bundle / "handovers.msgpack").write_bytes(codec.pack([change(handovers[0])]))
        v = verify_model(layout.model, bundle)
        assert not v.ok and "handover 0 of the bundle does not hold" in v.failure["reason"], \
            (what, v.failure)
    bundle = tmp_path / "none"
    shutil.copytree(layout.provenance.root, bundle)
    (bundle / "handovers.msgpack").unlink()
    v = verify_model(layout.model, bundle)
    assert not v.ok and "not sent by trainer-1" in v.failure["reason"], v.failure
