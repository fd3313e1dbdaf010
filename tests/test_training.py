"""The training run over real processes on 127.0.0.1: equivalence with the in-process
reference, summary and log contents."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from clicooper_bus.config import load_config
from clicooper_bus.ml.data import load_dataset
from clicooper_bus.ml.models import default_cuts, model_spec, state_dict_with_prefix
from clicooper_bus.ml.reference import train_reference
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tools.run import run
from tests.busrun import write_config


def _reference(cfg, steps=None, in_flight=1):
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed).limit(
        cfg.data.train_limit or None, cfg.data.test_limit or None)
    spec = model_spec(cfg.model.name, data.input_shape, data.classes)
    cuts = default_cuts(spec, len(cfg.participants.trainers))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.run.threads)
    try:
        return train_reference(data, spec, cuts, seed=cfg.run.seed, epochs=cfg.run.epochs,
                               batch_size=cfg.run.batch_size, lr=cfg.run.lr, max_steps=steps,
                               evaluate_each_epoch=False, in_flight=in_flight)
    finally:
        torch.set_num_threads(threads)


def _worst_difference(got: dict, segments) -> float:
    want = state_dict_with_prefix(segments)
    assert set(got) == set(want)
    return max(float((got[k] - want[k]).abs().max()) for k in want)


STEPS = 50


@pytest.fixture(scope="module")
def bus_run(tmp_path_factory):
    """`bus_run(trainers, in_flight)`: the config of a finished run of 50 steps over the bus,
    made once per (trainers, in_flight) and shared by the tests that read it (a run costs the
    suite 8 to 15 s, most of it starting its processes). Three epochs asked, evaluation every
    second one, cut by max_steps inside the first: the run ends on its step limit, not at an
    epoch's end, and evaluates only because it ends there."""
    made: dict[tuple[int, int], object] = {}

    def get(trainers: int, in_flight: int):
        if (trainers, in_flight) not in made:
            tmp = tmp_path_factory.mktemp(f"eq{trainers}-{in_flight}")
            path = write_config(tmp, run_id=f"eq{trainers}-{in_flight}", trainers=trainers,
                                run={"max_steps": STEPS, "in_flight": in_flight, "epochs": 3,
                                     "eval_every": 2},
                                log={"retention": "all"})  # for the replay test below
            assert run(str(path), echo=False, timeout_s=240, free_ports=False) == 0
            made[trainers, in_flight] = path
        return made[trainers, in_flight]

    return get


@pytest.mark.parametrize("trainers,in_flight", [(1, 1), (3, 1), (3, 3)])
def test_bus_training_matches_the_reference(bus_run, trainers, in_flight):
    """50 steps over the bus give the reference's weights (max abs difference <= 1e-5), also
    pipelined: the reference follows the pipelined owner's schedule."""
    path = bus_run(trainers, in_flight)
    cfg = load_config(path)
    ref = _reference(cfg, steps=STEPS, in_flight=in_flight)
    got = load_file(cfg.run_dir / "model.safetensors")
    worst = _worst_difference(got, ref.segments)
    assert worst <= 1e-5, f"max abs weight difference {worst}"
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["in_flight"] == in_flight
    assert summary["schedule"].startswith("pipelined" if in_flight > 1 else "synchronous")
    if in_flight > 1:  # pipelining is a different schedule, not the synchronous one
        sync = _reference(cfg, steps=STEPS)
        assert _worst_difference(got, sync.segments) > 1e-4
    assert summary["steps"] == STEPS and summary["stages"] == cfg.participants.trainers
    assert abs(summary["test_accuracy"] - ref.test_accuracy) <= 0.005


@pytest.mark.parametrize("trainers,in_flight", [(1, 1), (3, 1), (3, 3)])
def test_every_stage_replays_bit_for_bit_from_the_log(bus_run, trainers, in_flight):
    """Issue 19: each trainer's stage re-executed from the log (initial weights from the plan,
    the logged inputs in log order) computes every `fwd`, `bwd` and `metrics` it sent and every
    weights commitment, bit for bit, pipelined too: 100 % coverage, no divergence."""
    from clicooper_bus.audit.training_replay import verify_training
    from clicooper_bus.tools.cli import main

    cfg = load_config(bus_run(trainers, in_flight))
    verdicts = verify_training(cfg.run_dir)
    assert [v.trainer for v in verdicts] == cfg.participants.trainers
    for v in verdicts:
        assert v.ok and not v.stopped, v.line()
        assert v.checked == v.sent > 2 * STEPS and v.coverage == 1.0, v.line()
        assert v.steps == set(range(STEPS)), v.line()
    assert main(["audit", "--verify-training", str(cfg.run_dir)]) == 0


def test_summary_and_log_agree(bus_run):
    path = bus_run(3, 1)  # the reference test's run: 3 trainers, 50 steps
    cfg = load_config(path)
    trainers = len(cfg.participants.trainers)
    s = json.loads((cfg.run_dir / "summary.json").read_text())
    for key in ("run_id", "dataset", "model", "stages", "epochs", "test_accuracy", "per_epoch",
                "messages", "wall_s", "final_checkpoint"):
        assert key in s, key
    assert 0 <= s["test_accuracy"] <= 1 and s["per_epoch"][0]["wall_s"] > 0
    r = verify_log(cfg.run_dir / "log", witnessed=[(cfg.run_dir / "checkpoint.txt").read_text()])
    assert r.ok, r.failure
    # every activation, gradient and label message the run sent is in the log
    for kind in ("fwd", "bwd", "labels", "eval_fwd", "eval_out", "metrics", "segment", "roster"):
        assert r.per_kind.get(kind, 0) == s["messages"].get(kind, 0), kind
    # owner -> trainer-1 -> ... -> the last trainer, and the gradients back the same way
    assert trainers == 3
    assert s["messages"]["fwd"] == STEPS * trainers and s["messages"]["bwd"] == STEPS * trainers
    assert s["final_checkpoint"]["size"] <= r.entries
    # who computed what: the owner's share is the head's FLOPs over everyone's
    parts = {p["participant"]: p["train_flops"] for p in s["compute"]["participants"]}
    assert set(parts) >= {"trainer-1", "trainer-2", "trainer-3"}
    assert all(v > 0 for v in parts.values())
    owner = sum(v for name, v in parts.items() if name.startswith("owner"))
    assert s["owner_flops_share"] == pytest.approx(owner / sum(parts.values()))


FASHION = load_config(None).data  # the default dataset
needs_fashion = pytest.mark.skipif(
    not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)")


@needs_fashion
def test_quick_run_matches_reference_accuracy(tmp_path):
    """`clicooper run --quick` (Fashion-MNIST subset, one epoch) reaches the reference's test
    accuracy within half a point."""
    from clicooper_bus.tools.run import QUICK

    path = write_config(tmp_path, run_id="quick", data={"name": "fashion-mnist", **QUICK["data"]},
                        run={"batch_size": 128, **QUICK["run"]})
    assert run(str(path), echo=False, timeout_s=300, free_ports=False) == 0
    cfg = load_config(path)
    s = json.loads((cfg.run_dir / "summary.json").read_text())
    ref = _reference(cfg)
    assert abs(s["test_accuracy"] - ref.test_accuracy) <= 0.005, (s["test_accuracy"],
                                                                  ref.test_accuracy)
    assert s["test_accuracy"] > 0.6


def test_a_run_cut_short_by_max_steps_still_reports_its_accuracy(bus_run):
    # one trainer, 3 epochs asked, evaluation every 2nd, cut at 50 of the first epoch's 63 steps
    # (the reference test's run): no epoch asked for an evaluation, the cut did
    cfg = load_config(bus_run(1, 1))
    assert (cfg.run.epochs, cfg.run.eval_every, cfg.run.max_steps) == (3, 2, STEPS)
    text = (cfg.run_dir / "summary.json").read_text()
    s = json.loads(text)
    assert "NaN" not in text and 0 <= s["test_accuracy"] <= 1 and s["steps"] == STEPS
    assert len(s["per_epoch"]) == 1 and "accuracy" in s["per_epoch"][0]


def test_pipelined_run_with_owner_tail_and_watermarks(tmp_path):
    """Pipelining beside the other features that touch the step: the owner's tail (the last
    stage's output comes back to the owner, whose tail steps in order), per-step noise, and the
    stages' watermarks (rounds start and end with nothing in flight); each stage replays from
    the log."""
    steps = 30
    path = write_config(tmp_path, run_id="pipe", trainers=2,
                        run={"max_steps": steps, "in_flight": 3},
                        privacy={"mechanism": "gaussian", "noise_multiplier": 0.1,
                                 "owner_tail": True},
                        watermark={"enabled": True}, log={"retention": "all"})
    assert run(str(path), echo=False, timeout_s=240, free_ports=False) == 0  # log verified
    cfg = load_config(path)
    s = json.loads((cfg.run_dir / "summary.json").read_text())
    assert s["steps"] == steps and s["schedule"].startswith("pipelined (3 batches")
    from clicooper_bus.audit.training_replay import verify_training

    for v in verify_training(cfg.run_dir):  # issue 19: marked and pipelined, bit for bit
        assert v.ok and not v.stopped and v.coverage == 1.0 and len(v.steps) == steps, v.line()
    # owner -> trainer-1 -> trainer-2 -> owner, gradients back the same way, no labels sent
    r = verify_log(cfg.run_dir / "log")
    assert r.per_kind["fwd"] == r.per_kind["bwd"] == 3 * steps == s["messages"]["fwd"]
    assert "labels" not in r.per_kind
    assert list((cfg.run_dir / "provenance" / "certificates").glob("*.cert"))
