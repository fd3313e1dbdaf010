"""A report that judges: report.md opens with its findings (after the integrity line or a
forced audit's warning), one verdict per family and attacking party, each score beside the line
it must beat; a degenerate inversion is a broken attack, not a low score; the figures, the
training curve among them, are written beside the report and embedded in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clicooper_bus.audit import families, figures, report
from clicooper_bus.audit.auditor import Audit
from clicooper_bus.audit.truth import Truth
from clicooper_bus.ml.attacks.base import Attack, ThreatModel
from clicooper_bus.tlog.logverify import Failure, VerifyResult

FLOORS = {"mean_image": 0.10, "black": 0.01, "class_mean": 0.30}
LABEL_TITLE = "Label inference on every channel a trainer receives, single and linked"


def _tm(party: str) -> dict:
    return {"party": party, "sees": ["plan"], "aux": "none"}


def _row(name: str, family: str, party: str, **scores) -> dict:
    return {"name": name, "family": family, "title": f"{name} title", "wall_s": 0.1,
            "threat_model": _tm(party), **scores}


def _label_scores(ari: float, acc: float, chance: float = 0.1, samples: int = 1000) -> dict:
    return {"ari": ari, "ami": ari, "nmi": ari, "matched_accuracy": acc,
            "matched_accuracy_chance": chance, "success_rate": 0.5, "samples": samples,
            "strongest": "pca10"}


def _channel(trainer: str, ari: float, acc: float, channel: str | None = "fwd") -> dict:
    row = _row(f"channels-{trainer}", "channels", f"{trainer}, alone (non-colluding)",
               trainer=trainer, channel=channel, seen=4000, channels={},
               **(_label_scores(ari, acc, samples=512) if channel else
                  {"samples": 0, "ari": 0.0, "matched_accuracy": 0.0,
                   "matched_accuracy_chance": 0.0, "success_rate": 0.0}))
    return dict(row, title=LABEL_TITLE)


def _attacks() -> list[dict]:
    """One or more rows of every registered family: leaks, the floor, a broken inversion."""
    return [
        _row("clustering", "clustering", "trainer-1 (first stage), alone",
             reference_raw_pixels={"ari": 0.3}, variants={}, **_label_scores(0.45, 0.62)),
        _row("whitebox-decoder", "inversion", "any trainer holding the owner's head weights",
             samples=500, ssim=0.52, floors=FLOORS, degenerate=False),
        _row("class-mean", "inversion", "any trainer holding the owner's head weights",
             samples=500, ssim=0.30, floors=FLOORS, degenerate=False),
        _row("unsplit", "inversion", "trainer-1 (first stage), alone", samples=500,
             ssim=0.01, floors=FLOORS, degenerate=True,
             degenerate_reason="100% of the reconstructions are constant images"),
        _row("sdar", "inversion", "all trainers, colluding", samples=500, ssim=0.105,
             floors=FLOORS, degenerate=False),
        _row("extraction-50", "extraction", "all trainers, colluding", samples=2500,
             accuracy=0.105, chance=0.1, owner_accuracy=0.9,
             mapping="soft vote of labelled samples"),
        _channel("trainer-1", 0.2, 0.4),
        _channel("trainer-2", 0.0, 0.0, channel=None),
        _row("completion-trainer-2", "completion", "trainer-2, alone (non-colluding)",
             trainer="trainer-2", channel="fwd", accuracy=0.7, chance=0.11, ari=0.5,
             samples=4096, seen=6000, labelled=50, baseline=0.635,
             baseline_name="label-spreading", gain=0.065, how="known plaintext", channels={}),
    ]


def _doc(attacks: list[dict], forced: bool = False) -> dict:
    integ = VerifyResult(log="in-process", ok=not forced, entries=10, checkpoints=2,
                         root="ab" * 32,
                         failure=Failure("bad signature", "leaves.dat", 3) if forced else None)
    return {"forced": forced, "run_id": "r", "generated": "now", "wall_s": 1.0,
            "settings": {}, "integrity": integ.to_json(), "attacks": attacks}


def _findings_block(md: str) -> list[str]:
    """The finding lines: the list items between '## Findings' and the next heading."""
    lines = md.splitlines()
    start = lines.index("## Findings")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("#"))
    return [x for x in lines[start:end] if x.startswith("- ")]


def _line(block: list[str], attack: str) -> str:
    (line,) = [x for x in block if f"`{attack}`" in x]
    return line


def test_the_findings_come_first_and_judge_every_family_and_party():
    md = report.to_markdown(_doc(_attacks()))
    lines = md.splitlines()
    assert lines[0].startswith("Integrity: the log verified")
    headings = [x for x in lines if x.startswith("#")]
    assert headings[:3] == ["# Audit of run `r`", "## Findings", "## Run"]
    block = _findings_block(md)
    for fam in ("clustering", "inversion", "extraction", "channels", "completion"):
        assert any(f"({fam}, `" in x for x in block), fam
    # one line per (family, party), the strongest working attack; the broken one on its own
    assert len(block) == 8
    assert _line(block, "clustering").startswith("- **leaks**: trainer-1 (first stage), alone; "
                                                 "target: the private labels")
    wb = _line(block, "whitebox-decoder")
    assert wb.startswith("- **leaks**") and "SSIM 0.520 against mean image 0.100" in wb
    assert not any("`class-mean`" in x for x in block)  # weaker, same party: in the table
    assert _line(block, "sdar").startswith("- **at the floor**")
    assert _line(block, "extraction-50").startswith("- **at chance**")
    # channels: one line per trainer row, naming the channel that leaks
    t1 = _line(block, "channels-trainer-1")
    assert t1.startswith("- **leaks**: trainer-1, alone") and "on fwd" in t1
    assert _line(block, "channels-trainer-2").startswith("- **nothing attacked**")
    # model completion: its own line per party, naming the channel it labelled, beside chance
    # and the own-data line
    mc = _line(block, "completion-trainer-2")
    assert mc.startswith("- **leaks**: trainer-2, alone (non-colluding); target: the private "
                         "labels (completion, `completion-trainer-2`): accuracy 0.700")
    assert "on fwd (4096 of 6000 rows trainer-2 received)" in mc and "own-data baseline" in mc
    # every row of the attack table carries its verdict too
    assert "| class-mean title | any trainer holding the owner's head weights | SSIM 0.300 |" in md
    assert "+0.000 over the class mean | leaks the class only |" in md


def test_a_degenerate_inversion_is_a_broken_attack_not_a_low_score():
    block = _findings_block(report.to_markdown(_doc(_attacks())))
    broken = _line(block, "unsplit")
    assert broken.startswith("- **broken attack**: trainer-1 (first stage), alone")
    assert "constant images" in broken
    assert families.INVERSION.verdict(_attacks()[3]) == (
        families.BROKEN, "100% of the reconstructions are constant images")


def test_a_forced_audit_warns_first_then_finds():
    md = report.to_markdown(_doc(_attacks()[:1], forced=True))
    lines = md.splitlines()
    assert lines[0].startswith("**WARNING: this log did NOT verify (leaves.dat index 3")
    assert lines.index("## Findings") < lines.index("## Run")
    assert "These findings describe a log that did NOT verify" in md
    assert len(_findings_block(md)) == 1


def test_a_stage_that_did_not_replay_is_the_first_finding():
    """Issue 19: a divergence heads the findings (the stage's numbers are not what its
    trainer should have computed); the section lists every stage."""
    line = "stage 2 (trainer-2): 9 of 9 ...; DIVERGES at step 5: its metrics (log entry 40) ..."
    doc = _doc(_attacks()[:1])
    doc["training_replay"] = [{"stage": 1, "ok": True, "line": "stage 1 (trainer-1): fine"},
                              {"stage": 2, "ok": False, "line": line}]
    md = report.to_markdown(doc)
    block = _findings_block(md)
    assert block[0] == f"- **DIVERGES**: {line}" and len(block) == 2
    section = md.split("## Training replay")[1]
    assert "- ok: stage 1 (trainer-1): fine" in section and f"- **DIVERGES**: {line}" in section
    assert "## Training replay" not in report.to_markdown(_doc(_attacks()[:1]))  # not run


def test_no_attack_no_finding():
    assert _findings_block(report.to_markdown(_doc([]))) == ["- no attack was run."]


class _Inverter(Attack):
    name, family, title = "blank", "inversion", "a blank decoder"
    threat = ThreatModel("trainer-1 (first stage), alone", frozenset({"plan"}), "none")


def _truth(n: int = 40) -> Truth:
    rng = np.random.default_rng(0)
    images = rng.random((n, 1, 12, 12)).astype(np.float32)
    labels = rng.integers(0, 4, n)
    return Truth(np.arange(n), images, labels, None, labels, images, labels)


def _score(recon: np.ndarray, truth: Truth) -> dict:
    audit = Audit(Path("."), VerifyResult(log="in-process", ok=True))
    return families.INVERSION.score(_Inverter(), recon, truth, audit, None)


@pytest.mark.parametrize("make, why", [
    (lambda t: np.zeros_like(t.images), "constant images"),
    (lambda t: np.full_like(t.images, 0.5), "constant images"),
    (lambda t: np.broadcast_to(t.aux.mean(0), t.images.shape).copy(), "the same image"),
])
def test_the_inversion_scorer_flags_degenerate_reconstructions(make, why):
    truth = _truth()
    row = _score(make(truth), truth)
    assert row["degenerate"] is True and why in row["degenerate_reason"]
    # the existing keys are all there, with the values they always had
    assert set(row) >= {"samples", "ssim", "floors", "above_mean_image", "warning"}
    assert row["above_mean_image"] == row["ssim"] - row["floors"]["mean_image"]
    assert families.INVERSION.verdict(row)[0] == families.BROKEN


def test_a_real_reconstruction_is_judged_on_its_score():
    truth = _truth()
    row = _score(truth.images + 0.01, truth)  # near-perfect
    assert row["degenerate"] is False and "degenerate_reason" not in row
    assert families.INVERSION.verdict(row)[0] == families.LEAKS


def _audit(tmp_path: Path, summary: dict) -> Audit:
    truth = _truth(12)
    audit = Audit(tmp_path / "run", VerifyResult(log="in-process", ok=True, root="cd" * 32),
                  summary=summary, settings={"owner_accuracy_eval_half": 0.8})
    for recon, name in ((np.zeros_like(truth.images), "blank"), (truth.images, "copy")):
        attack = _Inverter()
        attack.name = name
        audit.results.append({"name": name, "family": "inversion", "title": name,
                              "threat_model": attack.threat.to_json(), "wall_s": 0.1,
                              **families.INVERSION.score(attack, recon, truth, audit, None)})
    return audit


def test_the_report_embeds_its_figures_and_the_training_curve(tmp_path):
    summary = {"per_epoch": [{"epoch": 0, "loss": 2.1, "train_accuracy": 0.3, "wall_s": 1.0},
                             {"epoch": 1, "loss": 1.2, "train_accuracy": 0.6, "accuracy": 0.55,
                              "wall_s": 1.0}]}
    out = report.write_report(_audit(tmp_path, summary), tmp_path / "audit")
    for name in ("training.png", "scores.png", "reconstructions.png"):
        assert (out / name).stat().st_size > 1000, name
    md = (out / "report.md").read_text()
    for name in ("training.png", "scores.png", "reconstructions.png"):
        assert f"![{name}]({name})" in md
    assert md.index("## Findings") < md.index("## Run") < md.index("## Figures")
    block = _findings_block(md)
    assert _line(block, "blank").startswith("- **broken attack**")
    assert _line(block, "copy").startswith("- **leaks**")
    doc = json.loads((out / "report.json").read_text())
    blank = next(r for r in doc["attacks"] if r["name"] == "blank")
    assert blank["degenerate"] is True
    assert [(f["attack"], f["verdict"]) for f in doc["findings"]] == [
        ("copy", families.LEAKS), ("blank", families.BROKEN)]


def test_without_a_summary_there_is_no_training_curve(tmp_path):
    out = report.write_report(_audit(tmp_path, {}), tmp_path / "audit")
    assert not (out / "training.png").exists()
    md = (out / "report.md").read_text()
    assert "training.png" not in md and "![scores.png](scores.png)" in md
    assert figures.training_curve({"per_epoch": []}, tmp_path / "t.png") is False
    # an earlier audit's training curve does not survive a report without one
    (out / "training.png").write_bytes(b"old")
    report.write_report(_audit(tmp_path, {}), out)
    assert not (out / "training.png").exists()


def test_a_family_without_a_rule_of_its_own_is_not_judged(monkeypatch):
    odd = families.Family("odd", lambda *a: {}, lambda row: ("S 1", "F 0", "M +1"), "odd_score",
                          "odd", 9, lambda ax, rows: None, lambda rows: {})
    monkeypatch.setitem(families._REGISTRY, "odd", odd)
    block = _findings_block(report.to_markdown(_doc([_row("odd-1", "odd", "p", odd_score=1.0)])))
    assert block == ["- **not judged**: p; target: odd-1 title (odd, `odd-1`): S 1 against F 0 "
                     "(M +1). Why: its family has no verdict rule for these scores."]


def test_a_run_of_an_older_version_is_said_to_be_audited_under_today_s_defaults():
    doc = _doc(_attacks())
    assert "older version" not in report.to_markdown(doc)
    doc["settings"]["config_defaulted"] = ["bus.codec", "participants.standby"]
    line = next(x for x in report.to_markdown(doc).splitlines() if "older version" in x)
    assert "bus.codec, participants.standby" in line and "today's defaults" in line
