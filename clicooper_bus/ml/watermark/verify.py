"""Verifying a delivered model against its provenance bundle, and settling disputes.

A bundle (`runs/<id>/provenance/`) holds the owner's signed roster, the notary's certificate
of every stage and round, every checkpoint the run published and the final one, and a
manifest. `verify_model` recomputes every key of the chain from the bundle (and the log, if
given), checks every signature and inclusion proof and the order commitment < round start <
claim, extracts each stage's bits for its last round from the model and checks the bit error
rate against the threshold. The first failure is reported with its stage, round and reason.

A stage handed over to a standby (`handovers.msgpack` in the bundle: the owner's signed,
logged `handover` messages) is the standby's from the handover's round on: its commitments and
claims must be the standby's, the first linking to the stage's last claim before it, and the
verdict names every trainer of a stage with its rounds.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clicooper_bus.chain import key as wk
from clicooper_bus.chain.certificate import (
    Certificate,
    CertificateError,
    keyed_root,
    open_certificate,
)
from clicooper_bus.chain.documents import Claim, Commit, check_commit
from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import ProvenanceLayout, RunLayout
from clicooper_bus.ml.watermark import mark as wm
from clicooper_bus.ml.watermark.claim import weights_digest
from clicooper_bus.ml.watermark.handovers import Handed, HandoverRefused, open_handovers, trainer_of
from clicooper_bus.net import codec
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import parse_header, signed_bytes, split_leaf
from clicooper_bus.plan import Plan
from clicooper_bus.tlog.checkpoint import open_checkpoint
from clicooper_bus.tlog.log import default_origin
from clicooper_bus.tlog.merkle import EMPTY_ROOT


class VerifyFailed(ClicooperError):
    def __init__(self, reason: str, stage: int | None = None, round_: int | None = None):
        where = "" if stage is None else f"stage {stage}" + ("" if round_ is None else f", round {round_}")
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason, self.stage, self.round = reason, stage, round_


@dataclass
class StageResult:
    stage: int
    trainer: str
    rounds: int
    last_round: int
    bits: int
    bit_errors: int | None  # None: a stage without weights carries no mark
    bit_error_rate: float | None
    weights_as_claimed: bool  # the delivered stage is byte for byte the one last claimed
    certified_ns: int  # when the notary certified the last round's claim
    trainers: dict[str, list[int]] = field(default_factory=dict)  # who trained which rounds
    replay: str | None = None  # its replay verdict (`audit.model_replay`), None: not replayed


@dataclass
class Verdict:
    ok: bool
    run_id: str = ""
    model: str = ""
    threshold: float = 0.0
    stages: list[StageResult] = field(default_factory=list)
    certificates: int = 0
    log_checked: bool = False
    failure: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Bundle:
    dir: Path
    manifest: dict[str, Any]
    roster_bytes: bytes
    roster: Roster
    certificates: list[tuple[str, bytes]]  # (file name, signed document)
    checkpoints: list[str]
    final_note: str
    handovers: list[tuple[bytes, bytes]] = field(default_factory=list)  # (leaf, body) as logged


def load_bundle(directory: str | os.PathLike[str], owner: PublicIdentity | None = None) -> Bundle:
    """Read a provenance bundle (`RUN_DIR/provenance`, see `clicooper_bus.layout`) and open
    its roster (against `owner`'s key when given). Raises VerifyFailed if a file is missing or
    unreadable or the roster does not verify."""
    d = Path(directory)
    bundle = ProvenanceLayout(d)
    try:
        manifest = json.loads(bundle.manifest.read_text())
        roster_bytes = bundle.roster.read_bytes()
        certs = [(p.name, p.read_bytes()) for p in sorted(bundle.certificates.glob("*.cert"))]
        checkpoints = json.loads(bundle.checkpoints.read_text())
        final = bundle.checkpoint.read_text()
        handovers = codec.unpack(bundle.handovers.read_bytes()) if bundle.handovers.exists() \
            else []
        if type(handovers) is not list or not all(
                type(h) is list and len(h) == 2 and all(type(b) is bytes for b in h)
                for h in handovers):
            raise ValueError("handovers.msgpack must be a list of [leaf, body] pairs")
        if type(manifest) is not dict or type(checkpoints) is not list or \
                not all(type(c) is str for c in checkpoints):
            raise ValueError("manifest.json must be a map and checkpoints.json a list of notes")
    except (OSError, ValueError, ClicooperError) as exc:
        raise VerifyFailed(f"the bundle {d} is incomplete or unreadable: {exc}") from None
    try:
        roster = Roster.open(roster_bytes, owner=owner)
    except ClicooperError as exc:
        raise VerifyFailed(f"the bundle's roster does not verify: {exc}") from None
    return Bundle(d, manifest, roster_bytes, roster, certs, list(checkpoints), final,
                  [(h[0], h[1]) for h in handovers])


def load_model(path: str | os.PathLike[str], plan: Plan):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from clicooper_bus.ml.models import plan_spec, segments_from_state_dict

    try:
        return segments_from_state_dict(plan_spec(plan), plan.segment_cuts, plan.seed, load_file(str(path)))
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise VerifyFailed(f"{path} is not a model of this run's plan: {exc}") from None


def _leaf_check(logged, kind: str, roster: Roster, stage: int, round_: int,
                handed: list[Handed] = ()) -> None:
    h = logged.header
    trainer = roster.by_name(trainer_of(roster, handed, stage, round_))
    if h.kind != kind or h.run != roster.run_id:
        raise VerifyFailed(f"the certified {kind} is a {h.kind} of run {h.run!r}", stage, round_)
    if h.sender != trainer.key_id:
        raise VerifyFailed(f"the {kind} was not sent by {trainer.name}, the trainer of stage "
                           f"{stage} in that round by the roster and its handovers", stage,
                           round_)
    header, sig = split_leaf(logged.leaf)
    if not trainer.identity.verify(signed_bytes(header), sig):
        raise VerifyFailed(f"the {kind}'s signature does not verify", stage, round_)


def _open_all(bundle: Bundle, handed: list[Handed] = ()
              ) -> dict[tuple[int, int], Certificate]:
    roster, notary = bundle.roster, bundle.roster.notary
    if notary is None:
        raise VerifyFailed("the roster names no notary")
    origin = default_origin(roster.run_id)
    certs: dict[tuple[int, int], Certificate] = {}
    for name, raw in bundle.certificates:
        try:
            cert, _ = open_certificate(raw, notary.identity, origin)
        except ClicooperError as exc:
            raise VerifyFailed(f"certificate {name} does not verify: {exc}") from None
        if cert.run_id != roster.run_id:
            raise VerifyFailed(f"a certificate of run {cert.run_id!r} in the bundle of run "
                               f"{roster.run_id!r}", cert.stage, cert.round)
        if not 1 <= cert.stage <= len(roster.stages):
            raise VerifyFailed("a certificate for a stage the roster does not have", cert.stage)
        if (cert.stage, cert.round) in certs:
            raise VerifyFailed("two certificates for the same stage and round", cert.stage,
                               cert.round)
        _leaf_check(cert.commit, "wm_commit", roster, cert.stage, cert.round, handed)
        _leaf_check(cert.claim, "wm_claim", roster, cert.stage, cert.round, handed)
        if not cert.commit.index < cert.round_start < cert.claim.index:
            raise VerifyFailed(f"the commitment (index {cert.commit.index}) was not logged before "
                               f"the round began (index {cert.round_start}) and the claim "
                               f"(index {cert.claim.index}) after it", cert.stage, cert.round)
        certs[(cert.stage, cert.round)] = cert
    return certs


def _roots(bundle: Bundle, plog, certs: dict | None = None) -> Any:
    """root_at(size) from the log when given, else from the run's published checkpoints and
    the roots the certificates prove (`certificate.keyed_root`: a commitment's log root, by
    a consistency proof to its notary-signed checkpoint)."""
    if plog is not None:
        return lambda n: plog.tree.root(n) if n <= plog.size else None
    notary, origin = bundle.roster.notary.identity, default_origin(bundle.roster.run_id)
    roots = {0: EMPTY_ROOT}
    for note in bundle.checkpoints:
        try:
            cp = open_checkpoint(note, notary, origin)
        except ClicooperError as exc:
            raise VerifyFailed(f"a checkpoint in the bundle does not verify: {exc}") from None
        roots[cp.size] = cp.root
    for cert in (certs or {}).values():
        cp = open_checkpoint(cert.checkpoint_note, notary, origin)  # checked with the cert
        proven = keyed_root(cert, cp)
        if proven is not None:
            roots.setdefault(*proven)
    return roots.get


def verify_model(model: str | os.PathLike[str], bundle_dir: str | os.PathLike[str], *,
                 log_dir: str | os.PathLike[str] | None = None,
                 owner: PublicIdentity | None = None, exact: bool = False) -> Verdict:
    """Never raises for a bad model or bundle: the verdict names the first failure. The
    marks' keys are public (they are derived from the log), so anyone holding a bundle can
    write its marks into any model: the marks show a model descends from the run, `exact`
    also requires every stage to be byte for byte the weights the last claims certify."""
    verdict = Verdict(ok=False, model=str(model))
    try:
        _verify(verdict, model, bundle_dir, log_dir, owner)
        changed = [s.stage for s in verdict.stages if not s.weights_as_claimed]
        if exact and changed:
            raise VerifyFailed(f"not the weights its last claim certifies (stages "
                               f"{', '.join(map(str, changed))} differ)", changed[0])
        verdict.ok = True
    except VerifyFailed as exc:
        verdict.failure = {"stage": exc.stage, "round": exc.round, "reason": exc.reason}
    except (CertificateError, ClicooperError) as exc:
        verdict.failure = {"stage": None, "round": None, "reason": str(exc)}
    return verdict


def _verify(v: Verdict, model, bundle_dir, log_dir, owner) -> None:
    bundle = load_bundle(bundle_dir, owner)
    roster = bundle.roster
    v.run_id = roster.run_id
    from clicooper_bus.ml.watermark.marker import settings

    try:
        marks = settings(roster)  # signed by the owner; the manifest is only a convenience
    except ClicooperError as exc:
        raise VerifyFailed(f"{exc} (a bundle from an older version: re-run to get one "
                           f"verify can check)") from None
    if marks is None:
        raise VerifyFailed("the roster says this run had no watermarks")
    v.threshold, nbits = marks["threshold"], marks["bits"]
    plan = Plan.from_meta(roster.meta["plan"])
    segments = load_model(model, plan)
    try:
        handed = open_handovers(bundle.roster, bundle.handovers)
    except HandoverRefused as exc:
        raise VerifyFailed(exc.reason, exc.stage, exc.round) from None
    certs = _open_all(bundle, handed)
    v.certificates = len(certs)
    if log_dir is None:
        _check_chain(v, bundle, certs, segments, nbits, _roots(bundle, None, certs), marks["rounds"],
                     handed)
        return
    from clicooper_bus.tlog.log import ProvenanceLog

    with ProvenanceLog.open(log_dir) as plog:
        if plog.roster_bytes != bundle.roster_bytes:
            raise VerifyFailed("the log's roster is not the bundle's")
        _check_against_log(certs, plog, handed)
        v.log_checked = True
        _check_chain(v, bundle, certs, segments, nbits, _roots(bundle, plog), marks["rounds"],
                     handed)


def _check_chain(v: Verdict, bundle: Bundle, certs, segments, nbits: int, root_at,
                 planned: int, handed: list[Handed] = ()) -> None:
    roster = bundle.roster
    stages = len(roster.stages)
    rounds = 1 + max((t for (_, t) in certs), default=-1)
    if rounds == 0:
        raise VerifyFailed("the bundle holds no certificate")
    if rounds != planned:
        raise VerifyFailed(f"the bundle certifies rounds 0 to {rounds - 1}, the roster planned "
                           f"{planned}: the last rounds are missing (an older mark would be "
                           f"checked)" if rounds < planned else
                           f"the bundle certifies {rounds} rounds, the roster planned {planned}",
                           None, rounds if rounds < planned else None)
    for t in range(rounds):
        for k in range(1, stages + 1):
            if (k, t) not in certs:
                missing = "a skipped round" if any((k, u) in certs for u in range(t + 1, rounds)) \
                    else "a missing stage"
                raise VerifyFailed(f"no certificate ({missing})", k, t)
            cert = certs[(k, t)]
            commit = Commit.from_doc(cert.commit.document())
            claim = Claim.from_doc(cert.claim.document())
            if (commit.stage, commit.round, claim.stage, claim.round) != (k, t, k, t):
                raise VerifyFailed("the certified messages name another stage or round", k, t)
            if claim.commitment != commit.commitment:
                raise VerifyFailed("the claim names another commitment", k, t)
            trainer = roster.by_name(trainer_of(roster, handed, k, t)).identity.public_key
            prev = certs.get((k - 1, t))
            before = certs.get((k, t - 1))
            why = check_commit(commit, run_id=roster.run_id, trainer_key=trainer,
                               roster=bundle.roster_bytes,
                               prev_commitment=Commit.from_doc(prev.commit.document()).commitment
                               if prev else None,
                               prev_claim=before.claim.digest if before else None,
                               root_at=root_at)
            if why:
                raise VerifyFailed(f"broken chain: {why}", k, t)
            if k > 1 and not certs[(k - 1, t)].commit.index < cert.commit.index:
                raise VerifyFailed(f"stage {k} committed before stage {k - 1} (reordered "
                                   f"stages)", k, t)
    last = rounds - 1
    for k in range(1, stages + 1):
        cert = certs[(k, last)]
        claim = Claim.from_doc(cert.claim.document())
        trainer = roster.by_name(trainer_of(roster, handed, k, last))
        key = certified_key(roster, cert)
        seg = segments[k]
        row = StageResult(k, trainer.name, rounds, last, nbits, None, None,
                          weights_digest(seg) == claim.weights_sha256, cert.issued_ns)
        for t in range(rounds):
            row.trainers.setdefault(trainer_of(roster, handed, k, t), []).append(t)
        if wm.carrier(seg) is not None:
            got = wm.extract(key, seg, nbits)
            row.bit_errors = int((got != wk.bits(key, nbits)).sum())
            row.bit_error_rate = row.bit_errors / nbits
        v.stages.append(row)
        if row.bit_error_rate is not None and row.bit_error_rate > v.threshold:
            raise VerifyFailed(f"wrong bits: {row.bit_errors} of {nbits} differ from the mark of "
                               f"its last round (threshold {v.threshold:.0%}): this stage is not "
                               f"the one {trainer.name} trained", k, last)


def certified_key(roster: Roster, cert: Certificate) -> bytes:
    """The mark key a certificate's commitment derives (every input is in the commitment,
    the trainer's key in the roster under the commitment's signer, checked by `_leaf_check`)."""
    member = roster.by_key_id(cert.commit.header.sender)
    if member is None:
        raise VerifyFailed("a certified commitment from a key the roster does not list",
                           cert.stage, cert.round)
    trainer = member.identity.public_key
    return Commit.from_doc(cert.commit.document()).link(roster.run_id, trainer).key()


def _check_against_log(certs: dict[tuple[int, int], Certificate], plog,
                       handed: list[Handed] = ()) -> None:
    """With the log: every certified message and every handover is the log's entry at its
    index, every certificate's checkpoint is a tree the log has, and each round began where it
    says (a round a handover started again: at its first activation after the handover)."""
    roster = Roster.open(plog.roster_bytes)
    owner, origin = roster.owner.key_id, default_origin(roster.run_id)
    first_fwd: dict[int, int] = {}  # epoch -> index of the owner's first activation in it
    restarts = {h.leaf: h.round for h in handed}
    for i in range(plog.size):
        leaf = plog.leaf(i)
        h = parse_header(split_leaf(leaf)[0])
        if h.kind == "fwd" and h.sender == owner and h.epoch is not None:
            first_fwd.setdefault(h.epoch, i)
        elif leaf in restarts:
            first_fwd.pop(restarts.pop(leaf), None)
    if restarts:
        raise VerifyFailed(f"{len(restarts)} handover(s) of the bundle are not in the log")
    for (k, t), cert in sorted(certs.items()):
        for what, logged in (("commitment", cert.commit), ("claim", cert.claim)):
            if logged.index >= plog.size or plog.leaf(logged.index) != logged.leaf:
                raise VerifyFailed(f"the certified {what} is not the log's entry {logged.index}",
                                   k, t)
        cp = open_checkpoint(cert.checkpoint_note, roster.notary.identity, origin)
        if cp.size > plog.size or plog.tree.root(cp.size) != cp.root:
            raise VerifyFailed("the certificate's checkpoint is not a tree of this log", k, t)
        if first_fwd.get(t, -1) != cert.round_start:
            raise VerifyFailed(f"round {t} began at log index {first_fwd.get(t, -1)}, not "
                               f"{cert.round_start} as certified", k, t)


def _delivered(bundle_dir: Path) -> tuple[Path, Verdict]:
    """The run's own delivered model (beside its bundle), checked to be exactly what its last
    certified claims name."""
    model = RunLayout(Path(bundle_dir).parent).model
    v = verify_model(model, bundle_dir)
    if v.ok and not all(s.weights_as_claimed for s in v.stages):
        v.ok = False
        v.failure = {"stage": None, "round": None,
                     "reason": f"{model} is not the model this run's last claims certify"}
    return model, v


def _distance(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if set(wa) != set(wb):
        return float("inf")
    return float(sum(((wa[k].float() - wb[k].float()) ** 2).sum() for k in wa if k.startswith(
        tuple(f"seg{i}." for i in range(1, 9))))) ** 0.5


def dispute(model: str | os.PathLike[str], bundles: list[str | os.PathLike[str]]
            ) -> tuple[int | None, list[Verdict], str]:
    """Which run a model comes from. Anyone can write a bundle's marks (its keys are public),
    and a second mark leaves the first readable, so neither marks nor clocks decide. Each run's
    own delivered model (beside its bundle, certified by its last claims) does: a run whose own
    model already carries another listed run's marks derives from it; among the runs that
    derive from no other, the model goes to the one whose delivered model it is closest to."""
    verdicts = [verify_model(model, b) for b in bundles]
    holding = [i for i, v in enumerate(verdicts) if v.ok]
    if not holding:
        return None, verdicts, "no bundle verifies against this model"
    if len(holding) == 1:
        i = holding[0]
        others = "; ".join(f"bundle {j + 1} fails: {verdicts[j].failure['reason']}"
                           for j in range(len(bundles)) if j != i)
        return i, verdicts, f"only bundle {i + 1} verifies ({others})"
    own = {i: _delivered(Path(bundles[i])) for i in holding}
    bad = [i for i in holding if not own[i][1].ok]
    if bad:
        return None, verdicts, "; ".join(f"bundle {i + 1}: {own[i][1].failure['reason']}"
                                         for i in bad) + ": cannot decide without each run's model"
    derived = {i: [j for j in holding if j != i and verify_model(own[i][0], bundles[j]).ok]
               for i in holding}
    original = [i for i in holding if not derived[i]]
    if not original:
        return None, verdicts, "every run's model carries another's marks: undecided"
    dist = {i: _distance(Path(model), own[i][0]) for i in original}
    winner = min(original, key=dist.get)
    why = [f"run {verdicts[i].run_id!r}'s own model already carries the marks of "
           f"{', '.join(repr(verdicts[j].run_id) for j in derived[i])}: it derives from them"
           for i in holding if derived[i]]
    why.append(f"the model is closest to run {verdicts[winner].run_id!r}'s delivered model "
               f"(distance {dist[winner]:.3g}" + "".join(
                   f", {verdicts[i].run_id!r} {dist[i]:.3g}" for i in original if i != winner)
               + ")")
    return winner, verdicts, "; ".join(why)
