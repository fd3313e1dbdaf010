"""The attack-family registry: every attack of the suite has its family, registered once with
its scorer, its headline and its sweep fields; the auditor, the report and the sweep look
families up there, and an unknown family is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from clicooper_bus.audit import families, report
from clicooper_bus.audit.auditor import Audit, score_attack
from clicooper_bus.audit.families import Family, UnknownFamily
from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.attacks import default_attacks, select
from clicooper_bus.ml.attacks.base import Attack, ThreatModel
from clicooper_bus.tlog.logverify import VerifyResult

ROWS = {
    "clustering": {"ari": 0.5, "ami": 0.4, "matched_accuracy": 0.6, "success_rate": 0.5,
                   "strongest": "pca10", "matched_accuracy_chance": 0.2,
                   "reference_raw_pixels": {"ari": 0.3},
                   "variants": {"pca10": {"ari": 0.5, "ami": 0.4, "matched_accuracy": 0.6,
                                          "success_rate": 0.5}}},
    "inversion": {"ssim": 0.4, "floors": {"mean_image": 0.1, "black": 0.01, "class_mean": 0.3}},
    "extraction": {"accuracy": 0.5, "mapping": "soft vote of labelled samples", "chance": 0.1,
                   "owner_accuracy": 0.9, "baseline": 0.6, "baseline_name": "label-spreading",
                   "gain": -0.1},
    "channels": {"trainer": "trainer-2", "channel": "bwd", "strongest": "cosine", "ari": 0.9,
                 "matched_accuracy": 0.95, "matched_accuracy_chance": 0.12, "samples": 500,
                 "seen": 4000, "channels": {"bwd": {"strongest": "cosine", "ari": 0.9,
                                                    "matched_accuracy": 0.95,
                                                    "matched_accuracy_chance": 0.12,
                                                    "samples": 500, "seen": 4000}}},
    "completion": {"trainer": "trainer-2", "channel": "fwd", "accuracy": 0.7, "chance": 0.11,
                   "ari": 0.5, "matched_accuracy": 0.7, "matched_accuracy_chance": 0.12,
                   "samples": 4096, "seen": 6000, "labelled": 50, "baseline": 0.635,
                   "baseline_name": "label-spreading", "gain": 0.065, "how": "known plaintext",
                   "channels": {"fwd": {"accuracy": 0.7, "chance": 0.11, "ari": 0.5,
                                        "samples": 4096, "seen": 6000}}},
}


def _row(fam: str, name: str | None = None) -> dict:
    return {"name": name or fam, "family": fam, **ROWS[fam]}


def _fake(family: str, name: str = "fake") -> Attack:
    class Fake(Attack):
        title = "a fake attack"
        threat = ThreatModel("nobody", frozenset({"plan"}), "none")

    fake = Fake()
    fake.name, fake.family = name, family
    return fake


def test_every_attack_of_the_suite_has_a_registered_family():
    suite = default_attacks()
    assert {a.family for a in suite} == {f.name for f in families.families()}
    for attack in suite + select("clustering,sdar,extraction-50"):
        assert families.of(attack) is families.family(attack.family)
        assert families.of(attack).name == attack.family


def test_an_unknown_family_is_a_clear_error():
    with pytest.raises(UnknownFamily, match="unknown attack family 'telepathy'; the families "
                                            "are clustering, inversion, extraction"):
        families.family("telepathy")
    assert issubclass(UnknownFamily, ClicooperError)
    with pytest.raises(UnknownFamily, match="attack mind-reader has unknown family 'telepathy'"):
        families.of(_fake("telepathy", "mind-reader"))
    audit = Audit(Path("."), VerifyResult(log="in-process", ok=True))
    with pytest.raises(UnknownFamily, match="mind-reader"):
        score_attack(_fake("telepathy", "mind-reader"), None, None, audit)
    with pytest.raises(UnknownFamily, match="telepathy"):
        report.headline({"name": "x", "family": "telepathy"})


def test_a_family_is_registered_once():
    with pytest.raises(ValueError, match="registered already"):
        families.register(families.CLUSTERING)
    with pytest.raises(ValueError, match="panel"):
        families.register(Family("other", families.CLUSTERING.score, families.CLUSTERING.headline,
                                 "x", "X", families.CLUSTERING.panel, families.CLUSTERING.plot,
                                 families.CLUSTERING.frontier))
    assert "other" not in {f.name for f in families.families()}


def test_the_headline_comes_from_the_registry(monkeypatch):
    for fam in families.families():
        row = _row(fam.name)
        assert report.headline(row) == fam.headline(row)
        assert isinstance(row[fam.metric], float)
        assert fam.direction == "lower is better"
    assert report.headline(_row("extraction")) == (
        "accuracy 0.500 (soft vote of labelled samples)",
        "chance 0.100; own-data baseline 0.600 (label-spreading); owner 0.900",
        "-0.100 over the own-data baseline")
    assert families.EXTRACTION.verdict(_row("extraction"))[0] == families.NO_GAIN
    assert report.headline(_row("completion")) == (
        "accuracy 0.700, ARI 0.500 on fwd (4096 of 6000 rows trainer-2 received)",
        "chance 0.110; own-data baseline 0.635 (label-spreading, 50 labels, on images)",
        "+0.590 over chance, +0.065 over the own-data baseline")
    assert families.family("completion").verdict(_row("completion"))[0] == families.LEAKS
    assert report.headline(_row("inversion")) == (
        "SSIM 0.400", "mean image 0.100, black 0.010, true class mean 0.300",
        "+0.300 over the mean image, +0.100 over the class mean")
    # a family registered later is looked up the same way: no name is switched on
    odd = Family("odd", lambda *a: {"odd_score": 1.0}, lambda row: ("S", "F", "M"), "odd_score",
                 "odd", 3, lambda ax, rows: None, lambda rows: {})
    monkeypatch.setitem(families._REGISTRY, "odd", odd)
    assert report.headline({"family": "odd"}) == ("S", "F", "M")
    assert score_attack(_fake("odd"), None, None, None) == {"odd_score": 1.0}


def test_the_report_table_and_details_come_from_the_families():
    doc = {"forced": False, "run_id": "r", "generated": "now", "wall_s": 1.0, "settings": {},
           "integrity": {"entries": 1, "checkpoints": 1, "root": "00" * 32, "body_records": 0,
                         "uncovered": 0, "per_sender": {}},
           "attacks": [dict(_row(f), title=f"{f} title", wall_s=0.1,
                            threat_model={"party": "p", "sees": ["plan"], "aux": "none"})
                       for f in ROWS]}
    md = report.to_markdown(doc)
    for f in ROWS:
        score, floor, margin = families.family(f).headline(_row(f))
        assert f"| {f} title | p | {score} | {floor} | {margin} |" in md
    assert "### Clustering variants (ARI)" in md and "| pca10 | 0.500 | 0.400 | 0.600 | 50% |" in md
    # each attack says how many rows it used of how many its party received
    assert "- **channels** (0.1 s): p; sees plan; aux: none; used 500 of the 4000 rows that " \
           "party received" in md
    doc["attacks"] = [a for a in doc["attacks"] if a["family"] != "clustering"]
    assert "Clustering variants" not in report.to_markdown(doc)


def test_the_sweep_fields_of_each_family_are_fixed():
    """Every family gives the same sweep fields whether or not its attacks ran, in order."""
    assert [f.label for f in families.families()] == ["ARI", "SSIM", "accuracy", "ARI",
                                                      "accuracy"]
    for fam in families.families():
        rows = [_row(fam.name, n) for n in (["extraction-10", "extraction-50"]
                                            if fam.name == "extraction" else [fam.name])]
        assert list(fam.frontier([])) == list(fam.frontier(rows))
    ext = families.EXTRACTION.frontier([_row("extraction", "extraction-10"),
                                        _row("extraction", "extraction-50")])
    assert ext == {"extraction": {"extraction-10": 0.5, "extraction-50": 0.5},
                   "extraction_chance": 0.1,
                   "extraction_baseline": {"extraction-10": 0.6, "extraction-50": 0.6}}
    assert families.family("completion").frontier([_row("completion")]) == {
        "completion_accuracy": 0.7, "completion_channel": "trainer-2:fwd"}
    assert families.CLUSTERING.frontier([]) == {"ari": None, "ari_variant": None,
                                                "success": None, "ari_raw_pixels": None}


def test_the_report_file_is_where_the_layout_says():
    run = RunLayout("runs/demo")
    assert run.audit_report == run.audit / report.REPORT_JSON
