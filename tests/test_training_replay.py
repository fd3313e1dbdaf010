"""Issue 19: a roster member that computes wrongly is named by replay verification, with the
first step it got wrong; the run itself completes and its log verifies (nothing else caught
them). Each cheat is signed and logged as any honest message: only re-executing the stage
from its logged inputs shows it (`audit.training_replay`). The honest replays are in
tests/test_training.py, on its shared runs."""

from __future__ import annotations

import json

import pytest

from clicooper_bus.audit.model_replay import verify_model_replayed
from clicooper_bus.audit.report import replay_and_mark
from clicooper_bus.audit.training_replay import verify_training
from clicooper_bus.ml.watermark.verify import verify_model
from clicooper_bus.tools.cli import main
from clicooper_bus.tools.run import EXIT_STOPPED
from tests.busrun import processes, write_config
from tests.replay_logs import Forged, assert_same_verdicts_in_any_sender_order

FROM = 5  # the first step each cheater gets wrong


@pytest.mark.parametrize("cheats", [
    # trainer-1 negates its gradients to the owner; trainer-2 perturbs its evaluation logits
    {"trainer-1": ("flip", "bwd", FROM), "trainer-2": ("eval", "eval_out", 0)},
    # trainer-1 adds noise to its activations; trainer-2 skips its optimiser step (so its next
    # step's gradients are wrong)
    {"trainer-1": ("noise", "fwd", FROM), "trainer-2": ("skip", "bwd", FROM + 1)},
], ids=["flip-eval", "noise-skip"])
def test_a_member_that_computes_wrongly_is_named_with_its_first_wrong_step(tmp_path, cheats):
    """Two cheaters in one run, one a stage: each stage is replayed from what the log holds
    of its own inputs, so each is named with its own first wrong message, independently."""
    name = "-".join(how for how, _, _ in cheats.values())
    path = write_config(tmp_path, run_id=f"cheat-{name}", trainers=2,
                        run={"max_steps": 16}, log={"retention": "all"},
                        watermark={"enabled": True})
    modes = {who: f"cheat:{how}:{FROM}" for who, (how, _, _) in cheats.items()}
    with processes(path, evils=modes) as (cfg, tel, procs):
        codes = {n: p.wait(timeout=120) for n, p in procs.items() if n != "broker"}
    assert set(codes.values()) == {0}, codes  # the run completes: nothing else saw it
    verdicts = {v.trainer: v for v in verify_training(cfg.run_dir)}
    for who, (_, kind, step) in cheats.items():
        bad = verdicts[who]
        assert not bad.ok and (bad.first.kind, bad.first.step) == (kind, step), bad.line()
        assert f"DIVERGES at step {step}" in bad.line()
    assert main(["audit", "--verify-training", str(cfg.run_dir)]) == 1
    # the delivered model fails with the log (replayed), and without it once an audit recorded
    # the verdicts in the bundle; the chain, certificates and proofs alone all hold
    model, bundle = str(cfg.run_dir / "model.safetensors"), str(cfg.run_dir / "provenance")
    assert verify_model(model, bundle, log_dir=cfg.run_dir / "log").ok
    v = verify_model_replayed(model, bundle, log_dir=cfg.run_dir / "log")
    assert not v.ok and v.failure["stage"] == 1, v.failure  # the first stage that diverged
    assert f"DIVERGES at step {cheats['trainer-1'][2]}" in v.failure["reason"]
    assert verify_model_replayed(model, bundle).ok  # nothing recorded yet
    replay_and_mark(cfg.run_dir)
    v = verify_model_replayed(model, bundle)
    assert not v.ok and "as the audit recorded" in v.failure["reason"], v.failure
    assert main(["model", "verify", model, "--bundle", bundle]) == 1


def test_a_sampled_log_is_verified_span_by_span_from_the_stages_sealed_states(tmp_path):
    """The log keeps the first 3 activations and gradients of each sender and epoch: each stage
    is re-executed until an input was not kept, then again from its next round boundary's
    state (sealed to the owner, checked against its commitment) until the next gap. A member
    adding noise to its activations from step 5 on is named at the first step the replay
    re-executes after that (10); the honest stage replays what it can and says what it
    skipped. Without the owner's key each replay stops at its first gap, saying so."""
    from pathlib import Path

    from clicooper_bus.audit.training_replay import replay_log
    from clicooper_bus.net.identity import load_identity
    from clicooper_bus.tlog.log import ProvenanceLog

    path = write_config(tmp_path, run_id="spans", trainers=2, run={"epochs": 2, "eval_every": 1},
                        data={"train_limit": 320, "test_limit": 64},
                        log={"retention": "fwd=sample:3,bwd=sample:3,*=all"},
                        watermark={"enabled": True})
    with processes(path, evils={"trainer-1": f"cheat:noise:{FROM}"}) as (cfg, tel, procs):
        codes = {n: p.wait(timeout=120) for n, p in procs.items() if n != "broker"}
    assert set(codes.values()) == {0}, codes
    one, two = verify_training(cfg.run_dir)
    assert (one.first.kind, one.first.step) == ("fwd", 10) and one.resumed == 1, one.line()
    assert two.ok and not two.complete and two.steps == {0, 1, 2, 10, 11, 12}, two.line()
    assert (two.resumed, two.skipped) == (2, 14) and two.stopped is None, two.line()
    assert "14 not (inputs not kept), started again from 2 committed states" in two.line()
    with ProvenanceLog.open(cfg.run_dir / "log") as plog:
        one, two = replay_log(plog)
        assert one.ok and two.ok and two.steps == {0, 1, 2}, two.line()
        assert "would start the replay again with the owner's key" in two.stopped
        # a state whose body the log did not keep is passed over for the next, accusing
        # nobody: the cheater's steps 3 to 19 are then all skipped (not verified, not ok'd)
        keys = Path(cfg.participants.keys)
        unseal = load_identity(keys / f"{cfg.participants.owner}.key").unseal
        gone = Forged(plog, edit=lambda i, h, b: (h, None if h.kind == "stage_state" and
                                                  h.step == 10 else b))
        for v in replay_log(gone, unseal=unseal):
            assert v.ok and not v.complete and v.steps == {0, 1, 2}, v.line()
    # `model verify --log` replays the same spans with the owner's private key (and fails
    # the model for the cheater)
    model, bundle, log = (str(cfg.run_dir / p) for p in ("model.safetensors", "provenance",
                                                          "log"))
    assert main(["model", "verify", model, "--bundle", bundle, "--owner-secret",
                 str(keys / f"{cfg.participants.owner}.key")]) == 2  # needs --log
    v = verify_model_replayed(model, bundle, log_dir=log, unseal=unseal)
    assert not v.ok and "DIVERGES at step 10" in v.failure["reason"], v.failure


def test_a_last_stage_reporting_a_perfect_batch_is_stopped_by_the_owner(tmp_path):
    """The owner recomputes each step's loss and accuracy from the logits the last stage sends
    beside its claim (`services/owner/own_metrics.py`): a made-up claim stops the run at once,
    naming the stage and the step; the replay names the same message."""
    path = write_config(tmp_path, run_id="cheat-metrics", trainers=2,
                        run={"max_steps": 16}, log={"retention": "all"})
    with processes(path, evil=f"cheat:metrics:{FROM}", evil_as="trainer-2") as (cfg, tel, procs):
        codes = {n: p.wait(timeout=120) for n, p in procs.items() if n != "broker"}
    assert codes["owner"] == EXIT_STOPPED, codes
    stopped = json.loads((cfg.run_dir / "summary.json").read_text())["stopped"]
    assert (stopped["sender"], stopped["kind"], stopped["step"]) == ("trainer-2", "metrics", FROM)
    assert f"claims {cfg.run.batch_size} correct, its logits give" in stopped["problem"], stopped
    bad = verify_training(cfg.run_dir)[1]
    assert (bad.first.kind, bad.first.step) == ("metrics", FROM), bad.line()


def test_an_honest_run_with_watermarks_a_codec_and_evaluation_replays_in_full(tmp_path):
    """Two rounds of chained watermarks (each round's mark keyed by its logged commitment),
    int8 on the wire, and evaluation after each epoch: every `fwd`, `bwd`, `metrics`,
    snapshot, watermark claim and evaluation output is recomputed bit for bit."""
    from clicooper_bus.tools.run import run

    path = write_config(tmp_path, run_id="honest", trainers=2,
                        run={"epochs": 2, "eval_every": 1}, bus={"codec": "int8"},
                        data={"train_limit": 320, "test_limit": 64},
                        watermark={"enabled": True}, log={"retention": "all"})
    assert run(str(path), echo=False, timeout_s=240, free_ports=False) == 0
    from clicooper_bus.audit.training_replay import replay_log
    from clicooper_bus.config import load_config
    from clicooper_bus.tlog.log import ProvenanceLog

    run_dir = load_config(path).run_dir
    for v in verify_training(run_dir):
        assert v.ok and not v.stopped and v.coverage == 1.0 and v.largest == 0.0, v.line()
        assert v.steps == set(range(20)), v.line()
        # per step a fwd (or metrics) and a bwd; 2 claims; 2 x 2 evaluation batches; snapshots
        assert v.checked >= 2 * 20 + 2 + 4, v.line()
    # each stage computes with the threads its trainer said in its hello (1 here), not the
    # fallback: 2 threads against 1 change the first activations in their last bits
    with ProvenanceLog.open(run_dir / "log") as plog:
        assert all(v.ok and v.coverage == 1.0 for v in replay_log(plog, threads=2))
        _replays_in_any_order_that_keeps_each_senders(plog)
        _what_a_sender_signs_cannot_make_an_honest_stage_diverge(plog)
    model, bundle = run_dir / "model.safetensors", run_dir / "provenance"
    v = verify_model_replayed(model, bundle, log_dir=run_dir / "log", full_replay=True)
    assert v.ok and all(s.replay and "no divergence" in s.replay for s in v.stages), v
    v = verify_model_replayed(model, bundle, full_replay=True)
    assert not v.ok and "needs the run's log" in v.failure["reason"]
    _a_recorded_verdict_is_read_only_for_its_own_run(run_dir, model, bundle)


def _a_recorded_verdict_is_read_only_for_its_own_run(run_dir, model, bundle) -> None:
    """`replay.json` (unsigned) is bound to its run and final checkpoint: one copied from
    another run, or malformed, is not read, and the verdict says so."""
    replay_and_mark(run_dir)
    path = bundle / "replay.json"
    doc = json.loads(path.read_text())
    assert doc["run_id"] == "honest" and len(doc["stages"]) == 2
    v = verify_model_replayed(model, bundle)
    assert v.ok and all("unsigned" in s.replay and "no divergence" in s.replay
                        for s in v.stages), v
    forged = [{**doc, "run_id": "another"}, {**doc, "checkpoint_sha256": "00" * 32},
              {**doc, "stages": [{**r, "ok": "false"} for r in doc["stages"]]}, []]
    for bad in forged:
        path.write_text(json.dumps(bad))
        v = verify_model_replayed(model, bundle)
        assert v.ok and all(s.replay.startswith("not verified:") for s in v.stages), (bad, v)


def _replays_in_any_order_that_keeps_each_senders(plog) -> None:
    """The notary orders each sender's messages, not messages across senders: a resend after a
    notary restart, or a message a sender held back, is logged after what was computed from
    it. Replaying the log grouped by sender, each stage's outputs before its inputs or after
    them, gives the same verdicts; an evaluation output whose input the log does not hold
    diverges (it was not computed from anything the stage received)."""
    from clicooper_bus.audit.training_replay import replay_log
    from clicooper_bus.net.roster import Roster

    base = assert_same_verdicts_in_any_sender_order(plog)
    heads = [plog.header(i) for i in range(plog.size)]
    owner, first = Roster.open(plog.roster_bytes).owner.key_id, base[0]["trainer"]
    no_eval_in = [i for i, h in enumerate(heads)
                  if not (h.kind == "eval_fwd" and h.sender == owner and h.to == first)]
    one, two = replay_log(plog, order=no_eval_in)
    assert not one.ok and (one.first.kind, one.first.step) == ("eval_fwd", 0), one.line()
    assert "sent without the input" in one.line() and not one.complete
    assert two.ok and two.complete, two.line()


def _what_a_sender_signs_cannot_make_an_honest_stage_diverge(plog) -> None:
    """A member signs what it likes (each message below passes the notary and `verify_log`):
    - a second, different `bwd` of one step: its sender diverges there, the stage that
      received both stops (which one it used is not logged) and is not accused;
    - an evaluation under another epoch's number, echoed down the stages as honest trainers
      echo it: evaluated at the state its place in the sender's chain says, all ok;
    - an output whose body the log did not keep: not compared, and the replay not complete."""
    from dataclasses import replace

    from clicooper_bus.audit.training_replay import replay_log
    from clicooper_bus.net.roster import Roster

    names = {m.key_id: m.name for m in Roster.open(plog.roster_bytes).members}
    heads = [plog.header(i) for i in range(plog.size)]
    k = next(i for i, h in enumerate(heads) if h.kind == "bwd" and h.step == 7
             and names[h.sender] == "trainer-2")
    h, sig, body = plog.entry(k)
    other = bytearray(body)
    other[-1] ^= 1
    order = [*range(k + 1), plog.size, *range(k + 1, plog.size)]
    one, two = replay_log(Forged(plog, extra=[(h, sig, bytes(other))]), order=order)
    assert one.first is None and "came 2 times" in one.stopped and not one.complete, one.line()
    assert not two.ok and (two.first.kind, two.first.step) == ("bwd", 7), two.line()

    def relabel(i, h, body):
        if h.kind in ("eval_fwd", "eval_out") and h.epoch == 0:
            h = replace(h, epoch=5)
        return h, body

    for v in replay_log(Forged(plog, edit=relabel)):
        assert v.ok and v.complete and v.coverage == 1.0, v.line()
    k = next(i for i, h in enumerate(heads) if h.kind == "bwd" and h.step == 3
             and names[h.sender] == "trainer-1")
    one, two = replay_log(Forged(plog, edit=lambda i, h, b: (h, None if i == k else b)))
    assert one.ok and not one.complete and "did not keep the bodies of 1" in one.stopped
    assert two.ok and two.complete, two.line()


def test_a_restored_moves_its_sender_past_the_rollback_it_answers_only():
    """Spans follow each trainer's own `restored`, matched to a rollback by its header's
    digest and step: one that was gone during the first rollback and answers the second (to
    the same step) is moved past both; a `restored` of another step, or naming a digest no
    rollback has, or none, moves nothing; only in a log from before `restored` named its
    rollback does it answer the next rollback's step."""
    from clicooper_bus.audit.replay_timeline import Break, _answered
    from clicooper_bus.protocol.recovery import Restored

    one, two, state = "11" * 32, "22" * 32, "ab" * 32
    twice = [Break(100, 10, "first", one), Break(200, 10, "second", two)]
    assert _answered(Restored(10, state, two), twice, 0) == 2
    assert _answered(Restored(10, state, one), twice, 0) == 1
    assert _answered(Restored(11, state, one), twice, 0) == 0
    assert _answered(Restored(10, state, "33" * 32), twice, 0) == 0
    assert _answered(Restored(10, state, one), twice, 1) == 1  # answered already
    assert _answered(Restored(10, state), twice, 0) == 0  # names none: sent ahead, ignored
    old = [Break(100, 10, "first"), Break(200, 20, "second")]
    assert _answered(Restored(10, state), old, 0, legacy=True) == 1
    assert _answered(Restored(20, state), old, 0, legacy=True) == 0  # not the next one's step
