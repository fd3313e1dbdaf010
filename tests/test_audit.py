"""The auditor on real runs: following a live run to its end, auditing offline, refusing a log
with one flipped bit (and saying where it broke), `--force`, `--compare`, and a config that is
not the run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clicooper_bus.audit.auditor import audit_run
from clicooper_bus.tools import cli
from clicooper_bus.tools.run import run
from tests.busrun import write_config

QUICK_ATTACKS = "clustering,class-mean"


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    """A synthetic run with an auditor following it (two cheap attacks)."""
    tmp = tmp_path_factory.mktemp("audit")
    # two epochs: the attacked releases (the first 16 batches of the last epoch) then come from
    # a head close to the final one the white-box attackers are given
    cfg = write_config(tmp, run_id="aud", trainers=2, run={"epochs": 2},
                       data={"name": "synthetic"})  # the launcher adds the auditor as observer
    assert run(str(cfg), echo=False, free_ports=False, timeout_s=240,
               audit=QUICK_ATTACKS) == 0
    return tmp / "runs" / "aud"


def test_follow_mode_writes_the_report(audited):
    report = audited / "audit"
    doc = json.loads((report / "report.json").read_text())
    assert doc["forced"] is False and doc["integrity"]["ok"] is True
    assert [a["name"] for a in doc["attacks"]] == ["clustering", "class-mean"]
    # it audited the closed log: the latest checkpoint covers every entry, and nothing was
    # appended after the audit
    assert doc["integrity"]["uncovered"] == 0
    from clicooper_bus.tlog.log import ProvenanceLog

    with ProvenanceLog.open(audited / "log") as plog:
        assert plog.size == doc["integrity"]["entries"]
        assert plog.checkpoint_at(plog.checkpoint_count - 1).size == plog.size
    # the replay put the right images behind the released activations: a classifier on them
    # reaches the true class-mean line (a misaligned replay would fall far below it)
    cm = next(a for a in doc["attacks"] if a["name"] == "class-mean")
    assert abs(cm["ssim"] - cm["floors"]["class_mean"]) < 0.05, cm
    md = (report / "report.md").read_text()
    assert md.splitlines()[0].startswith("Integrity: the log verified")
    assert "| Label inference by clustering" in md and "chance" in md
    assert "synchronous (one batch in flight)" in md  # the roster's training schedule
    # the compute share, recomputed from the signed plan, is the owner's own count
    summary = json.loads((audited / "summary.json").read_text())
    assert doc["settings"]["owner_flops_share"] == summary["owner_flops_share"]
    assert f"the owner did {summary['owner_flops_share']:.1%} of the training FLOPs" in md
    assert (report / "reconstructions.png").stat().st_size > 1000
    assert (report / "scores.png").stat().st_size > 1000
    out = (audited / "telemetry" / "auditor.out").read_text()
    assert "the notary closed the log" in out
    # issue 19: the report has each stage's replay
    rows = doc["training_replay"]
    assert [r["trainer"] for r in rows] == ["trainer-1", "trainer-2"]
    for row in rows:  # the default retention keeps 4 gradients a sender and epoch: in part
        assert row["ok"] and 4 <= row["steps"] < row["trained"] and 0 < row["coverage"] < 1, row
        assert f"{row['steps']} of {row['trained']} steps re-executed" in row["line"]
        assert "[log] retention" in row["stopped"] and f"- ok: {row['line']}" in md
    # watermarks off: no provenance bundle, so nothing is recorded beside one (the bundle's
    # replay.json is tested in tests/test_training_replay.py)
    assert not (audited / "provenance").exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("audit", "telemetry"))
    return dst


def _flip_one_bit(log: Path) -> None:
    path = log / "leaves.dat"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_one_flipped_bit_refuses_the_attack(audited, tmp_path, capsys):
    run_dir = _copy(audited, tmp_path / "aud")
    _flip_one_bit(run_dir / "log")
    code = cli.main(["audit", str(run_dir), "--attacks", "clustering"])
    out = capsys.readouterr().out
    assert code == 1
    assert "REFUSED" in out and "leaves.dat" in out and "--force" in out
    doc = json.loads((run_dir / "audit" / "report.json").read_text())
    assert doc["refused"] is True and doc["integrity"]["failure"]["file"] == "leaves.dat"
    assert "attacks" not in doc
    assert (run_dir / "audit" / "report.md").read_text().startswith("**REFUSED")


def _forge_signature(log: Path, index: int) -> None:
    """Flip a bit of one entry's signature and re-frame the file with valid checksums, as
    someone who knows the format would: the files read, the signature does not verify."""
    from clicooper_bus.tlog.records import frame, scan

    path = log / "leaves.dat"
    s, data = scan(path, 1 << 40), path.read_bytes()
    records = [bytearray(data[o:o + n]) for o, n in zip(s.offsets, s.lengths, strict=True)]
    records[index][-1] ^= 0x01
    path.write_bytes(b"".join(frame(bytes(r)) for r in records))


def test_force_attacks_and_says_so_first(audited, tmp_path, capsys):
    run_dir = _copy(audited, tmp_path / "aud")
    _forge_signature(run_dir / "log", 100)
    # the cheapest attack: this is about --force and the warning, not about any attack's score
    code = cli.main(["audit", str(run_dir), "--force", "--attacks", "class-mean"])
    out = capsys.readouterr().out
    assert code == 0, out
    md = (run_dir / "audit" / "report.md").read_text()
    assert md.splitlines()[0].startswith("**WARNING: this log did NOT verify")
    doc = json.loads((run_dir / "audit" / "report.json").read_text())
    assert doc["forced"] is True and doc["integrity"]["failure"]["index"] == 100
    assert "WARNING: the log did NOT verify" in out


def test_force_cannot_read_a_damaged_file(audited, tmp_path, capsys):
    run_dir = _copy(audited, tmp_path / "aud")
    _flip_one_bit(run_dir / "log")  # breaks a record checksum: the file itself is damaged
    assert cli.main(["audit", str(run_dir), "--force", "--attacks", "clustering"]) == 1
    assert "cannot be read even with --force" in capsys.readouterr().err


def test_offline_audit_matches_and_compare(audited, tmp_path, capsys):
    run_dir = _copy(audited, tmp_path / "aud")
    # offline, the cheaper of the followed audit's two attacks (class-mean; clustering costs
    # 15 s more CPU), so the comparison has one attack of both audits and one of one
    assert cli.main(["audit", str(run_dir), "--attacks", "class-mean"]) == 0
    out = capsys.readouterr().out
    assert "class-mean" in out and "SSIM" in out and "true class mean" in out
    assert cli.main(["audit", "--compare", str(run_dir), str(audited), "--out",
                     str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("| class-mean |") == 1 and "clustering" in table
    assert "not run" in table  # the offline audit ran class-mean only
    assert (tmp_path / "cmp" / "compare.png").exists()


def test_compare_needs_audited_runs(tmp_path, capsys):
    assert cli.main(["audit", "--compare", str(tmp_path)]) == 1
    assert "audit the run first" in capsys.readouterr().err


def test_a_config_that_is_not_the_runs_is_refused(audited, tmp_path):
    run_dir = _copy(audited, tmp_path / "aud")
    cfg = run_dir / "config.toml"
    cfg.write_text(cfg.read_text().replace("train_limit = 0", "train_limit = 100"))
    with pytest.raises(Exception, match="not the configuration the roster commits to"):
        audit_run(run_dir, attacks=[])


def test_replay_aligns_releases_with_their_samples(audited):
    """The labels the last stage received for each released batch are the true labels of the
    samples the auditor recomputes for it: batch order, epoch and step line up."""
    from clicooper_bus.audit.auditor import gather, load_model, run_config
    from clicooper_bus.audit.order import Order
    from clicooper_bus.audit.replay import replay
    from clicooper_bus.ml.data import load_dataset

    r = replay(audited / "log")
    cfg, defaulted = run_config(audited, r)
    assert defaulted == []  # the owner writes every key
    data = load_dataset(cfg.data.name, None, cfg.run.seed)
    order = Order(len(data.x_train), r.plan.batch_size, r.plan.seed)  # the public order
    knowledge, truth, info = gather(r, data, load_model(audited, r.plan, r.ack)[0], cfg, None,
                                    order)
    # fwd=sample:16 at batch 32, both epochs (the latest first), fewer than the 2,000 wanted
    assert info["released_samples"] == len(truth.labels) == 2 * 16 * 32
    assert info["released_epochs"] == [0, 1]
    assert (knowledge.values["released_labels"] == truth.labels).all()
    aux = knowledge.view(attack_threat("aux_labels")).aux_labels
    assert aux.base is None and not aux.flags.writeable  # no way back to the test split


def attack_threat(*fields):
    from clicooper_bus.ml.attacks.base import ThreatModel

    return ThreatModel("test", frozenset(fields), "", aux_labels=None)


def test_a_replaced_model_is_refused(audited, tmp_path):
    run_dir = _copy(audited, tmp_path / "aud")
    model = run_dir / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1] + b" ")
    with pytest.raises(Exception, match="not the model the owner acknowledged"):
        audit_run(run_dir, attacks=[])


def test_unknown_attack_is_a_clear_error(audited, capsys):
    assert cli.main(["audit", str(audited), "--attacks", "telepathy"]) == 1
    assert "unknown attack" in capsys.readouterr().err


def test_the_measured_cpu_is_in_the_summary_the_log_and_the_report(audited):
    """Every process measured its own CPU: the owner's summary has a row per computing process
    with the run's steps, the trainers' and notary's signed usage messages are in the verified
    log, and the report's share, read from the log, is the summary's."""
    from clicooper_bus.tlog.logverify import verify_log

    s = json.loads((audited / "summary.json").read_text())
    cpu = s["cpu"]
    rows = {r["name"]: r for r in cpu["processes"]}
    assert cpu["missing"] == [] and set(rows) == {"owner", *s["stages"], "notary"}
    assert rows["owner"]["role"] == "owner" and rows["notary"]["role"] == "notary"
    for name in ("owner", *s["stages"], "notary"):
        r = rows[name]
        assert r["cpu_s"] > 0 and 0 < r["train_cpu_s"] <= r["cpu_s"], r
        assert r["steps"] == s["steps"] > 0, r
        assert r["cpu_s_per_step"] == pytest.approx(r["train_cpu_s"] / r["steps"], rel=1e-3)
    share = rows["owner"]["train_cpu_s"] / sum(rows[n]["train_cpu_s"]
                                               for n in ("owner", *s["stages"]))
    assert 0 < s["owner_cpu_share"] < 1 and s["owner_cpu_share"] == pytest.approx(share, rel=1e-3)
    assert "broker stopped" in cpu["clock"]  # where the broker's CPU is
    # one usage message per process, each signed by its sender, in a log that verifies
    r = verify_log(audited / "log")
    assert r.ok, r.failure
    assert r.per_kind["usage"] == 2 + len(s["stages"]) == s["messages"]["usage"] + 1  # + notary
    # the auditor's numbers come from those messages, and agree with the owner's summary
    doc = json.loads((audited / "audit" / "report.json").read_text())
    got = doc["settings"]["cpu"]
    assert got["processes"] == cpu["processes"] and got["missing"] == []
    assert doc["settings"]["owner_cpu_share"] == pytest.approx(s["owner_cpu_share"])
    md = (audited / "audit" / "report.md").read_text()
    assert f"and {s['owner_cpu_share']:.1%} of the training CPU, as self-reported" in md
    assert "cannot check" in md  # the report says whose word the CPU numbers are
    out = (audited / "telemetry" / "owner.out").read_text()
    assert f"{s['owner_cpu_share']:.1%} of the training CPU as self-reported" in out


def test_a_run_from_before_a_config_field_was_added_still_audits(audited, tmp_path):
    """The roster's config digest is checked on the file's own keys: equal to the owner's
    `RunConfig.digest` for every config, and a run written before a field existed (its
    config.toml lacks it) matches what its roster signed and loads with the default."""
    import dataclasses

    from clicooper_bus.audit.auditor import file_digest, run_config
    from clicooper_bus.audit.replay import replay
    from clicooper_bus.config import load_config

    for path in ("configs/demo.toml", "configs/defended.toml", audited / "config.toml"):
        cfg = load_config(path)
        assert file_digest(cfg.to_toml()) == cfg.digest(), path
    run_dir = _copy(audited, tmp_path / "aud")
    text = (run_dir / "config.toml").read_text()
    older = "\n".join(line for line in text.splitlines()
                      if not line.startswith("trainer_memory_mb"))
    assert older != text
    (run_dir / "config.toml").write_text(older)
    r = replay(run_dir / "log")
    with pytest.raises(Exception, match="not the configuration the roster commits to"):
        run_config(run_dir, r)  # this run's roster signed the whole file
    old_roster = dataclasses.replace(r.roster, meta={**r.roster.meta,
                                                     "config": file_digest(older)})
    cfg, defaulted = run_config(run_dir, dataclasses.replace(r, roster=old_roster))
    assert cfg.run.trainer_memory_mb == load_config(None).run.trainer_memory_mb
    assert defaulted == ["run.trainer_memory_mb"]  # and the report will say so


def test_a_sampled_fwd_stream_is_simulated_white_box_and_said_so(audited, tmp_path, monkeypatch):
    """The run keeps 16 fwd and 2 eval_fwd batches an epoch (none of the private half): the
    trainers' channels also get the white-box simulation of their fwd for the followed samples
    and of their eval_fwd for private evaluation images, one epoch each (the run is
    undefended: every epoch's release would be the same), and the report names them and never
    counts them as received rows. (Trainer 1's channels only: the simulation is the same for
    every stage, and the attack costs seconds per channel.)"""
    from clicooper_bus.audit.auditor import audit_run
    from clicooper_bus.audit.report import to_json, to_markdown
    from clicooper_bus.ml.attacks.channels import ChannelInference

    monkeypatch.setattr("clicooper_bus.audit.channels.TARGETS", 300)  # followed: 300, not 2,000
    attack = ChannelInference().for_trainer("trainer-1", 1, False)
    attack.per_trainer = False  # this trainer's attack alone, not one per trainer
    audit = audit_run(_copy(audited, tmp_path / "sim"), attacks=[attack])
    (row,) = audit.results
    ch = row["channels"]
    assert ch["fwd (simulated)"]["samples"] == 300 and "fwd (simulated)+linked" not in ch
    assert ch["fwd (simulated)"]["rows_of"].startswith("simulated white-box")
    assert ch["eval_fwd (simulated)"]["rows_of"] == ("simulated white-box (final weights), "
                                                    "private evaluation images: not rows received")
    assert ch["eval_fwd"]["rows_of"].startswith("public aux images only")
    assert row["channel"] != "eval_fwd"  # public images never head the row
    sims = {c["channel"]: c for c in audit.references["simulated"]["channels"]}
    assert sims["fwd (simulated)"]["epochs"] == [1] and sims["fwd (simulated)"]["released_in"] == [0, 1]
    assert "sample:16" in audit.references["simulated"]["why"]
    md = to_markdown(to_json(audit))
    assert "- simulated, in every trainer's channels: `fwd (simulated)` (300 samples" in md
