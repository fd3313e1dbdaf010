"""Chained watermarks end to end: two real runs with marks, then `clicooper model verify` and
`dispute` against intact, swapped, skipped, reordered, foreign, late and bit-flipped evidence,
and null models that must never verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clicooper_bus.chain import key as wk
from clicooper_bus.chain.certificate import CertificateError, issue, open_certificate
from clicooper_bus.chain.documents import Commit
from clicooper_bus.ml.data import synthetic
from clicooper_bus.ml.models import plan_spec, state_dict_with_prefix
from clicooper_bus.ml.reference import train_reference
from clicooper_bus.ml.watermark import mark as wm
from clicooper_bus.ml.watermark.verify import dispute, load_bundle, verify_model
from clicooper_bus.net.identity import load_identity
from clicooper_bus.net.roster import Roster
from clicooper_bus.plan import Plan
from clicooper_bus.tlog.log import default_origin
from clicooper_bus.tools import cli
from clicooper_bus.tools.run import run
from tests.busrun import write_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two marked runs with the same keys and plan (synthetic data, two trainers, 2 epochs)."""
    tmp = tmp_path_factory.mktemp("wm")
    out = {}
    for rid in ("wa", "wb"):
        cfg = write_config(tmp, run_id=rid, trainers=2, run={"epochs": 2},
                           watermark={"enabled": True})
        assert run(str(cfg), echo=False, free_ports=False, timeout_s=240) == 0
        out[rid] = tmp / "runs" / rid
    out["keys"] = tmp / "keys"
    return out


def _verify(model: Path, bundle: Path, **kw):
    return verify_model(model, bundle, **kw)


def test_the_run_verifies_with_zero_bit_errors(runs, capsys):
    a = runs["wa"]
    for log in (None, a / "log"):
        v = _verify(a / "model.safetensors", a / "provenance", log_dir=log)
        assert v.ok, v.failure
        assert [s.bit_errors for s in v.stages] == [0, 0] and v.certificates == 4
        assert all(s.weights_as_claimed for s in v.stages)
    assert cli.main(["model", "verify", str(a / "model.safetensors"), "--bundle",
                     str(a / "provenance"), "--log", str(a / "log")]) == 0
    assert "OK: run wa: 4 certificates" in capsys.readouterr().out
    assert cli.main(["model", "verify", str(a / "model.safetensors"), "--bundle",
                     str(a / "provenance"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def _failure(v) -> tuple:
    assert not v.ok
    return v.failure["stage"], v.failure["round"], v.failure["reason"]


def test_a_stage_swapped_for_another_runs_fails(runs, tmp_path):
    wa, wb = load_file(runs["wa"] / "model.safetensors"), load_file(runs["wb"] / "model.safetensors")
    mixed = {k: (wb[k] if k.startswith("seg2.") else v) for k, v in wa.items()}
    save_file(mixed, tmp_path / "mixed.safetensors")
    stage, round_, reason = _failure(_verify(tmp_path / "mixed.safetensors",
                                             runs["wa"] / "provenance"))
    assert (stage, round_) == (2, 1) and "wrong bits" in reason


def _bundle_copy(runs, tmp_path) -> Path:
    return Path(shutil.copytree(runs["wa"] / "provenance", tmp_path / "bundle"))


def test_a_skipped_round_fails(runs, tmp_path):
    b = _bundle_copy(runs, tmp_path)
    (b / "certificates" / "stage-1-round-0.cert").unlink()
    stage, round_, reason = _failure(_verify(runs["wa"] / "model.safetensors", b))
    assert (stage, round_) == (1, 0) and "skipped round" in reason


def test_reordered_stages_fail(runs, tmp_path):
    """The owner re-signs a roster with the two trainers swapped: the certified messages were
    signed by the other trainer."""
    b = _bundle_copy(runs, tmp_path)
    roster = Roster.open((b / "roster.msgpack").read_bytes())
    owner = load_identity(runs["keys"] / "owner.key")
    members = {m.name: m.identity for m in roster.members}
    swapped = Roster.build(roster.run_id, owner=owner.public,
                           trainers=[members["trainer-2"], members["trainer-1"]],
                           notary=roster.notary.identity, meta=dict(roster.meta))
    (b / "roster.msgpack").write_bytes(swapped.sign(owner))
    stage, _, reason = _failure(_verify(runs["wa"] / "model.safetensors", b))
    assert stage is not None and "was not sent by" in reason


def test_a_certificate_from_another_run_fails(runs, tmp_path):
    b = _bundle_copy(runs, tmp_path)
    shutil.copy(runs["wb"] / "provenance" / "certificates" / "stage-1-round-1.cert",
                b / "certificates" / "stage-1-round-1.cert")
    _, _, reason = _failure(_verify(runs["wa"] / "model.safetensors", b))
    assert "stage-1-round-1.cert" in reason and "run/wb" in reason  # another run's log


def test_a_commitment_logged_after_the_round_began_fails(runs, tmp_path):
    """Even signed by the notary's own key, a certificate whose commitment comes after the
    round's first activation does not verify."""
    b = _bundle_copy(runs, tmp_path)
    path = b / "certificates" / "stage-2-round-1.cert"
    notary = load_identity(runs["keys"] / "notary.key")
    cert, _ = open_certificate(path.read_bytes(), notary.public, default_origin("wa"))
    from dataclasses import replace

    late = replace(cert, round_start=cert.commit.index - 1)
    path.write_bytes(issue(notary, late))
    stage, round_, reason = _failure(_verify(runs["wa"] / "model.safetensors", b))
    assert (stage, round_) == (2, 1) and "before the round began" in reason


def test_a_bundle_missing_the_checkpoint_a_commitment_keys_to_still_verifies(runs, tmp_path):
    """The owner collects published checkpoints on a lossy channel and can miss the one a
    commitment keys to (the first, right after the roster: once a flaky "broken chain"). Each
    certificate proves its commitment's log root by a consistency proof to its own checkpoint,
    so the bundle needs no other; a forged proof, or a forged root, is refused."""
    b = _bundle_copy(runs, tmp_path)
    notary = load_identity(runs["keys"] / "notary.key")
    keyed = set()
    for path in (b / "certificates").glob("*.cert"):
        cert, _ = open_certificate(path.read_bytes(), notary.public, default_origin("wa"))
        keyed.add(Commit.from_doc(cert.commit.document()).log_size)
    notes = json.loads((b / "checkpoints.json").read_text())
    kept = [n for n in notes if int(n.split("\n")[1]) not in keyed]
    assert len(kept) < len(notes)
    (b / "checkpoints.json").write_text(json.dumps(kept))
    v = _verify(runs["wa"] / "model.safetensors", b)
    assert v.ok, v.failure
    path = b / "certificates" / "stage-1-round-1.cert"
    cert, _ = open_certificate(path.read_bytes(), notary.public, default_origin("wa"))
    assert cert.log_root_proof  # the notary proves it
    from dataclasses import replace

    bad = replace(cert, log_root_proof=tuple(bytes(32) for _ in cert.log_root_proof))
    with pytest.raises(CertificateError, match="log root is not the log's root"):
        open_certificate(issue(notary, bad), notary.public, default_origin("wa"))


def test_every_single_bit_flip_of_a_certificate_fails(runs):
    raw = (runs["wa"] / "provenance" / "certificates" / "stage-1-round-0.cert").read_bytes()
    bundle = load_bundle(runs["wa"] / "provenance")
    notary, origin = bundle.roster.notary.identity, default_origin("wa")
    open_certificate(raw, notary, origin)  # intact: holds
    for i in range(len(raw)):
        for bit in (0, 3, 7):  # three bits of every byte
            flipped = bytearray(raw)
            flipped[i] ^= 1 << bit
            with pytest.raises(Exception) as info:
                open_certificate(bytes(flipped), notary, origin)
            assert isinstance(info.value, CertificateError | ValueError), info.value


def test_chain_rules_name_each_broken_link(runs):
    """The rule the notary applies on arrival and verify applies to a bundle: each link of a
    real commitment, changed alone, is named as the reason."""
    from dataclasses import replace

    from clicooper_bus.chain.documents import check_commit

    bundle = load_bundle(runs["wa"] / "provenance")
    notary, origin = bundle.roster.notary.identity, default_origin("wa")
    certs = {n: open_certificate(raw, notary, origin)[0] for n, raw in bundle.certificates}
    c21 = Commit.from_doc(certs["stage-2-round-1.cert"].commit.document())
    prev = Commit.from_doc(certs["stage-1-round-1.cert"].commit.document()).commitment
    prev_claim = certs["stage-2-round-0.cert"].claim.digest
    trainer = bundle.roster.by_name("trainer-2").identity.public_key
    roots = {}
    for note in bundle.checkpoints:
        from clicooper_bus.tlog.checkpoint import open_checkpoint

        cp = open_checkpoint(note, notary, origin)
        roots[cp.size] = cp.root
    kw = dict(run_id="wa", trainer_key=trainer, roster=bundle.roster_bytes,
              prev_commitment=prev, prev_claim=prev_claim, root_at=roots.get)
    assert check_commit(c21, **kw) is None
    assert "prev_link" in check_commit(replace(c21, prev_link=bytes(32)), **kw)
    assert "prev_round" in check_commit(replace(c21, prev_round=bytes(32)), **kw)
    assert "log_root" in check_commit(replace(c21, log_root=bytes(32)), **kw)
    assert "not to the key" in check_commit(replace(c21, commitment=bytes(32)), **kw)
    assert "skipped round" in check_commit(c21, **dict(kw, prev_claim=None))
    assert "no commitment" in check_commit(c21, **dict(kw, prev_commitment=None))
    assert "not to the key" in check_commit(c21, **dict(kw, trainer_key=bytes(32)))


def _plan(bundle: Path) -> Plan:
    return Plan.from_meta(Roster.open((bundle / "roster.msgpack").read_bytes()).meta["plan"])


def test_null_models_never_verify(runs, tmp_path):
    """Twenty models trained the same way from other seeds, without the run's marks."""
    plan = _plan(runs["wa"] / "provenance")
    data = synthetic(seed=0)
    bers = []
    for seed in range(1, 21):
        r = train_reference(data, plan_spec(plan), plan.cuts, seed=seed, epochs=1,
                            batch_size=plan.batch_size, lr=plan.lr, max_steps=30,
                            evaluate_each_epoch=False)
        path = tmp_path / f"null{seed}.safetensors"
        save_file(state_dict_with_prefix(r.segments), path)
        v = _verify(path, runs["wa"] / "provenance")
        assert not v.ok and "wrong bits" in v.failure["reason"]
        bers.append(v.stages[-1].bit_error_rate)
    assert min(bers) > wk.DEFAULT_THRESHOLD


def _write_marks(model: Path, marks_from: Path, run_id: str, out: Path) -> Path:
    """`model` with the last-round marks of the run whose bundle is `marks_from` written into
    it (200 Adam steps on the regulariser alone: enough to write them, and the marks beneath
    stay readable, the case the dispute is about; with 300 the marks beneath once read 13 of
    64 bits wrong, over the threshold): anyone can, the keys are public."""
    from clicooper_bus.ml.watermark.verify import load_model

    plan = _plan(marks_from)
    segments = load_model(model, plan)
    bundle = load_bundle(marks_from)
    notary = bundle.roster.notary.identity
    for k in (1, 2):
        cert, _ = open_certificate((marks_from / "certificates" /
                                    f"stage-{k}-round-1.cert").read_bytes(), notary,
                                   default_origin(run_id))
        trainer = bundle.roster.by_name(bundle.roster.stages[k - 1]).identity.public_key
        key = Commit.from_doc(cert.commit.document()).link(run_id, trainer).key()
        mark = wm.Watermark(key, segments[k], strength=1.0)
        opt = torch.optim.Adam(segments[k].parameters(), lr=1e-3)
        for _ in range(200):
            opt.zero_grad()
            mark.loss().backward()
            opt.step()
    save_file(state_dict_with_prefix(segments), out)
    return out


def test_dispute_gives_an_overwritten_model_to_its_run(runs, tmp_path, capsys):
    """Marks alone cannot decide (both read after an overwrite) and neither can clocks: A's
    model with B's marks written over it goes to A, and B's model with A's marks goes to B,
    by which run's own certified model it is."""
    a, b = runs["wa"], runs["wb"]
    stolen = _write_marks(a / "model.safetensors", b / "provenance", "wb", tmp_path / "s1")
    assert _verify(stolen, a / "provenance").ok and _verify(stolen, b / "provenance").ok
    winner, _, reason = dispute(stolen, [b / "provenance", a / "provenance"])
    assert winner == 1 and "closest to run 'wa'" in reason, reason
    framed = _write_marks(b / "model.safetensors", a / "provenance", "wa", tmp_path / "s2")
    assert _verify(framed, a / "provenance").ok  # a's marks, though a never trained it
    winner, _, reason = dispute(framed, [a / "provenance", b / "provenance"])
    assert winner == 1 and "closest to run 'wb'" in reason, reason
    assert cli.main(["model", "dispute", str(stolen), "--bundle", str(b / "provenance"),
                     "--bundle", str(a / "provenance")]) == 0
    assert "belongs to bundle 2" in capsys.readouterr().out
    # the untouched model of A: B's bundle does not verify at all
    winner, _, reason = dispute(a / "model.safetensors", [b / "provenance", a / "provenance"])
    assert winner == 1 and "only bundle 2 verifies" in reason


def test_exact_requires_the_certified_weights(runs, tmp_path, capsys):
    forged = _write_marks(runs["wb"] / "model.safetensors", runs["wa"] / "provenance", "wa",
                          tmp_path / "forged")
    args = ["model", "verify", str(forged), "--bundle", str(runs["wa"] / "provenance")]
    assert cli.main(args) == 0  # the marks are there: anyone can write them
    out = capsys.readouterr().out
    assert "changed since the claim" in out
    assert cli.main(args + ["--exact"]) == 1
    assert "not the weights" in capsys.readouterr().out


def test_a_corrupt_model_is_a_clear_failure(runs, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    assert cli.main(["model", "verify", str(bad), "--bundle",
                     str(runs["wa"] / "provenance")]) == 1
    assert "not a model of this run's plan" in capsys.readouterr().out


def _log_envelopes(log_dir: Path):
    """(envelope, index) for every entry of a log, bodies where retained."""
    from clicooper_bus.net.wire import Envelope, parse_header, split_leaf
    from clicooper_bus.tlog.log import ProvenanceLog

    with ProvenanceLog.open(log_dir) as plog:
        roster_bytes = plog.roster_bytes
        out = []
        for i in range(plog.size):
            raw, sig = split_leaf(plog.leaf(i))
            h = parse_header(raw)
            body = plog.body(h.body_sha256)
            out.append((Envelope(h.topic, h, sig, bytes(body) if body is not None else b""), i))
        roots = [plog.tree.root(n) for n in range(plog.size + 1)]
    return roster_bytes, out, roots


def test_the_notary_register_certifies_the_run_and_refuses_broken_links(runs):
    from clicooper_bus.chain.registry import WatermarkRegistry

    roster_bytes, entries, roots = _log_envelopes(runs["wa"] / "log")
    roster = Roster.open(roster_bytes)

    def replay(seq):
        reg = WatermarkRegistry(roster, roster_bytes,
                                root_at=lambda n: roots[n] if n < len(roots) else None)
        done = [c for env, i in seq if (c := reg.observe(env, i)) is not None]
        return reg, done

    reg, done = replay(entries[1:])
    assert sorted((c.stage, c.round) for c in done) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert reg.refused == []
    # without stage 1's commitment of round 1, stage 2's is refused, and so are both claims
    s1r1 = next(i for env, i in entries if env.header.kind == "wm_commit"
                and env.document()["stage"] == 1 and env.document()["round"] == 1)
    reg, done = replay([e for e in entries[1:] if e[1] != s1r1])
    assert (2, 1) not in {(c.stage, c.round) for c in done}
    assert any("stage 1 has no commitment for round 1" in r for r in reg.refused)
    # a commitment that arrives after its round's first activation is refused
    s2r1 = next(e for e in entries if e[0].header.kind == "wm_commit"
                and e[0].document()["stage"] == 2 and e[0].document()["round"] == 1)
    late = [e for e in entries[1:] if e[1] != s2r1[1]]
    start = next(k for k, (env, _) in enumerate(late) if env.header.kind == "fwd"
                 and env.header.epoch == 1 and env.header.sender == roster.owner.key_id)
    late.insert(start + 1, s2r1)
    reg, done = replay(late)
    assert (2, 1) not in {(c.stage, c.round) for c in done}
    assert any("had already begun" in r for r in reg.refused)


def test_a_stage_without_weights_keeps_the_chain(tmp_path):
    """Three trainers cut the small CNN's tail into fc1 | ReLU | fc2: the ReLU stage commits and
    claims (no bits) so that the chain runs through it, and the model verifies."""
    cfg = write_config(tmp_path, run_id="w3", trainers=3, run={"epochs": 1},
                       watermark={"enabled": True}, model={"cuts": [6, 8, 9]})
    assert run(str(cfg), echo=False, free_ports=False, timeout_s=240) == 0
    d = tmp_path / "runs" / "w3"
    v = verify_model(d / "model.safetensors", d / "provenance", log_dir=d / "log")
    assert v.ok, v.failure
    assert [s.bit_errors for s in v.stages] == [0, None, 0] and v.certificates == 3


def test_dropping_the_last_rounds_fails(runs, tmp_path):
    """Without the last round, an older (still readable) mark would be checked: the roster
    the owner signed says how many rounds the run had."""
    b = _bundle_copy(runs, tmp_path)
    for k in (1, 2):
        (b / "certificates" / f"stage-{k}-round-1.cert").unlink()
    _, _, reason = _failure(_verify(runs["wa"] / "model.safetensors", b))
    assert "last rounds are missing" in reason


def test_the_unsigned_manifest_cannot_loosen_the_threshold(runs, tmp_path):
    wa, wb = load_file(runs["wa"] / "model.safetensors"), load_file(runs["wb"] / "model.safetensors")
    save_file({k: (wb[k] if k.startswith("seg2.") else v) for k, v in wa.items()},
              tmp_path / "mixed.safetensors")
    b = _bundle_copy(runs, tmp_path)
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps(dict(manifest, threshold=1.0, bits=8)))
    v = _verify(tmp_path / "mixed.safetensors", b)
    assert not v.ok and "wrong bits" in v.failure["reason"] and v.threshold == 0.2
