"""The audit of one finished run: verify the log, replay it, attack it, score every attack.

Order matters: nothing is attacked before the whole log verifies (signatures, chains, Merkle
tree, checkpoints, and the final checkpoint the owner saw), unless the caller forces it, and
then the report says so first. The auditor alone holds the truth (which samples each released
batch held, their images and labels, the evaluation half of the test split); attacks get a
`View` of what their threat model allows and return predictions the auditor scores.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from clicooper_bus.audit import families, scoring
from clicooper_bus.audit.channels import KINDS as CHANNEL_KINDS
from clicooper_bus.audit.channels import MAX_ROWS, TARGETS, followed, read_channels
from clicooper_bus.audit.families import INVERT_SAMPLES
from clicooper_bus.audit.order import Order, run_order
from clicooper_bus.audit.replay import Replay, replay
from clicooper_bus.audit.settings import run_settings
from clicooper_bus.audit.simulated import Stream, fresh_per_epoch, simulate
from clicooper_bus.audit.truth import CLUSTER_SAMPLES, Release, Truth, gather
from clicooper_bus.config import RunConfig, config_from_text, missing_keys
from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.attacks import default_attacks, expand_per_trainer, memo
from clicooper_bus.ml.attacks.base import Attack, Knowledge
from clicooper_bus.ml.attacks.channels import received_field
from clicooper_bus.ml.data import load_dataset, to_float
from clicooper_bus.ml.models import plan_spec, segments_from_state_dict
from clicooper_bus.ml.privacy import defences
from clicooper_bus.ml.privacy.labels import group_sum
from clicooper_bus.ml.privacy.release import FilterSpec, inference_model
from clicooper_bus.net.codec import unpack
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import parse_header, split_leaf
from clicooper_bus.protocol import ProtocolError, Usage, cpu_table
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.logverify import VerifyResult, verify_log
from clicooper_bus.tlog.retention import Retention

# Release, Truth, gather (truth.py) and the sample counts are imported from here by callers
__all__ = ["CLUSTER_SAMPLES", "INVERT_SAMPLES", "Audit", "AuditRefused", "Release", "Truth",
           "audit_run", "gather", "load_model", "run_config", "score_attack", "track"]

T = TypeVar("T")


class AuditRefused(ClicooperError):
    """The log did not verify and the audit was not forced."""

    def __init__(self, result: VerifyResult):
        f = result.failure
        where = f"{f.file}" + (f" at index {f.index}" if f and f.index is not None else "")
        super().__init__(f"the log does not verify ({where}: {f.reason if f else '?'}); refusing "
                         f"to attack it. Repair or re-obtain the log, or pass --force to attack "
                         f"it anyway (the report will say so on its first line)")
        self.result = result


def track(it: Iterable[T], desc: str, total: int) -> Iterator[T]:
    """Progress of a long step: a tqdm bar on a terminal, a line per ~10 % otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(it, desc=desc, total=total, leave=False)
        return
    every, t0 = max(1, total // 10), time.perf_counter()
    for i, x in enumerate(it, 1):
        yield x
        if i % every == 0 or i == total:
            print(f"  {desc}: {i}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)


def _verify_progress():
    """A `verify_log` progress callback: one line per quarter of each pass."""
    shown: set[tuple[str, int]] = set()

    def show(stage: str, done: int, total: int) -> None:
        quarter = 4 * done // max(1, total)
        if (stage, quarter) not in shown:
            shown.add((stage, quarter))
            print(f"  verifying {stage}: {done}/{total}", file=sys.stderr, flush=True)

    return show



@dataclass
class Audit:
    """One audit: the log's verdict, the run's settings, every attack's scored row, the
    references and figures the report draws. `run_dir` is the run directory audited."""

    run_dir: Path
    integrity: VerifyResult
    forced: bool = False
    config: RunConfig | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    references: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> arrays for the report
    classes: int = 0
    wall_s: float = 0.0
    replay: list[dict[str, Any]] | None = None  # per stage (training_replay); None: not run


def run_config(run_dir: Path, replayed: Replay) -> tuple[RunConfig, list[str]]:
    """The run's config.toml, checked against the digest the signed roster commits to, and
    the `section.key`s it does not set (a run of an older version: they load with today's
    defaults, and the report says so). Raises ClicooperError if it is missing or is not that
    configuration."""
    path = RunLayout(run_dir).config
    if not path.exists():
        raise ClicooperError(f"{path} is missing: the owner writes it at the start of a run; "
                             f"without it the auditor cannot load the run's dataset")
    text = path.read_text()
    committed = replayed.roster.meta.get("config", "")
    if file_digest(text) != committed:
        raise ClicooperError(f"{path} is not the configuration the roster commits to (digest "
                             f"{file_digest(text)[:16]}..., roster {committed[:16]}...)")
    # configured from the bytes checked, not from a second read of the file
    return config_from_text(text, path), missing_keys(text)


def file_digest(text: str) -> str:
    """The roster's config digest (`RunConfig.digest`) recomputed from the file's own keys:
    the owner writes every field it has, so this equals its digest, and a run written by an
    older version (before a field was added, which loading now fills with its default) still
    matches what its roster signed. Raises ClicooperError if the file is not TOML."""
    try:
        doc = tomllib.loads(text)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    except tomllib.TOMLDecodeError as exc:
        raise ClicooperError(f"the run's config.toml is not TOML: {exc}") from None
    except (TypeError, ValueError) as exc:  # a date or time: no config key has one
        raise ClicooperError(f"the run's config.toml holds a value no configuration has "
                             f"({exc})") from None


def load_model(run_dir: Path, plan, ack: dict | None
               ) -> tuple[list[torch.nn.Sequential], np.ndarray | None]:
    """The delivered model, checked against the digest the owner acknowledged in the log, and
    the owner's pseudo-class decoding (output -> class) when labels were obfuscated.
    Raises ClicooperError if the model is missing, replaced or does not fit the plan."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    run = RunLayout(run_dir)
    path = run.model
    if not path.exists():
        raise ClicooperError(f"{path} is missing: the run did not finish delivering its model")
    data = path.read_bytes()
    logged = (ack or {}).get("model_sha256")
    if logged is None:
        raise ClicooperError("the log holds no owner acknowledgement with the model's digest: "
                             "the run did not end normally, so its model cannot be tied to it")
    if hashlib.sha256(data).hexdigest() != logged:
        raise ClicooperError(f"{path} is not the model the owner acknowledged in the log "
                             f"(sha256 {hashlib.sha256(data).hexdigest()[:16]}..., log "
                             f"{str(logged)[:16]}...): it was replaced after the run")
    groups = _label_groups(run, plan) if plan.n_outputs != plan.classes else None
    try:
        return (segments_from_state_dict(plan_spec(plan), plan.segment_cuts, plan.seed, st_load(data)),
                groups)
    except (SafetensorError, RuntimeError, KeyError) as exc:
        raise ClicooperError(f"{path} does not fit the run's model plan: {exc}") from None


def _label_groups(run: RunLayout, plan) -> np.ndarray:
    """The owner's pseudo-class decoding (owner-only file): the true class of each output.
    Raises ClicooperError if it is missing, unreadable or does not fit the plan."""
    gpath = run.label_groups
    try:
        groups = np.asarray(json.loads(gpath.read_text())["groups"], np.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClicooperError(f"{gpath} is missing or unreadable ({exc}): the owner writes it "
                             f"when it obfuscates labels; without it the model's "
                             f"pseudo-classes cannot be decoded") from None
    if groups.shape != (plan.n_outputs,) or groups.min() < 0 or groups.max() >= plan.classes:
        raise ClicooperError(f"{gpath} does not map the model's {plan.n_outputs} outputs to "
                             f"{plan.classes} classes")
    return groups


def _verified(run: RunLayout, owner: PublicIdentity | None, witnessed: list[str],
              force: bool) -> Audit:
    """Verify the run's log (against the owner's final checkpoint when none is given).
    Raises AuditRefused if it does not verify and `force` is false."""
    if not witnessed and run.checkpoint.exists():
        witnessed = [run.checkpoint.read_text()]
    print(f"auditor: verifying {run.log}", file=sys.stderr, flush=True)
    result = verify_log(run.log, owner=owner, witnessed=witnessed,
                        progress=_verify_progress())
    print(f"auditor: log {'verified' if result.ok else 'did NOT verify'}: {result.entries} "
          f"entries, {result.checkpoints} checkpoints", file=sys.stderr, flush=True)
    if not result.ok and not force:
        raise AuditRefused(result)
    return Audit(run.root, result, forced=not result.ok)


def audit_run(run_dir: str | Path, *, force: bool = False, owner: PublicIdentity | None = None,
              witnessed: list[str] | None = None, attacks: list[Attack] | None = None,
              progress=track) -> Audit:
    """Verify, replay, attack and score one finished run (`attacks`: default the whole
    suite). Raises AuditRefused (log does not verify, not forced) or ClicooperError (the run's
    files are missing or do not match its log)."""
    run = RunLayout(run_dir)
    t0 = time.perf_counter()
    memo.clear()  # what an earlier audit in this process computed is not this run's
    audit = _verified(run, owner, list(witnessed or []), force)
    try:
        replayed = replay(run.log)
    except (ClicooperError, ValueError) as exc:
        raise ClicooperError(f"the log cannot be read even with --force: {exc}") from None
    cfg, defaulted = run_config(run.root, replayed)
    audit.config = cfg
    audit.classes = replayed.plan.classes  # true classes (the model may output pseudo-classes)
    audit.summary = json.loads(run.summary.read_text()) if run.summary.exists() else {}
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed).limit(
        cfg.data.train_limit or None, cfg.data.test_limit or None)
    spec = defences.filter_spec(cfg.privacy, cfg.run.epochs)
    segments, groups = load_model(run.root, replayed.plan, replayed.ack)
    plan = replayed.plan
    order = run_order(run, cfg.privacy.secret_order, len(data.x_train), plan.batch_size,
                      plan.seed, replayed.roster.meta.get("order_commitment", ""))
    knowledge, truth, info = gather(replayed, data, segments, cfg, spec, order)
    stages = list(replayed.roster.stages)
    _add_channels(knowledge, audit, run, cfg, data, stages, order)
    suite = expand_per_trainer(attacks if attacks is not None else default_attacks(), stages)
    _add_simulated(knowledge, audit, cfg, data, stages, spec, replayed, suite, order)
    owner_model = inference_model(segments, spec)
    owner_acc = scoring.accuracy(_predict(owner_model, truth.eval_images, groups),
                                 truth.eval_labels)
    audit.settings = run_settings(audit.summary, replayed, cfg, spec, owner_acc, info)
    audit.settings["config_defaulted"] = defaulted
    audit.settings["cpu"] = measured_cpu(run.log)
    audit.settings["owner_cpu_share"] = audit.settings["cpu"]["owner_cpu_share"]
    for attack in suite:
        audit.results.append(_attack(attack, knowledge, truth, audit, progress))
    audit.wall_s = time.perf_counter() - t0
    return audit


def measured_cpu(log_dir: Path) -> dict[str, Any]:
    """The CPU every process measured of itself (`protocol.cpu_table`), from the signed `usage`
    messages in the verified log, never from the owner's summary: the sender is the header's
    signer (a document names nobody), so each row is that process's own word. A process with
    no usage message, or whose body the log did not retain or does not parse, is `missing`
    (and a second message from one sender is ignored, as the owner ignores it)."""
    with ProvenanceLog.open(log_dir) as plog:
        roster = Roster.open(plog.roster_bytes)
        got: dict[str, Usage] = {}
        unreadable: list[str] = []
        for i in range(plog.size):
            h = parse_header(split_leaf(plog.leaf(i))[0], plog.limits)
            member = roster.by_key_id(h.sender) if h.kind == "usage" else None
            if member is None or member.name in got:
                continue
            body = plog.body(h.body_sha256)
            try:
                got[member.name] = Usage.parse(unpack(body) if body is not None else None,
                                               sender=member.name)
            except (ProtocolError, ValueError) as exc:
                unreadable.append(f"{member.name}: {exc}")
    order = {"owner": 0, "trainer": 1, "notary": 2}
    members = sorted((m for m in roster.members if m.role in order),
                     key=lambda m: (order[m.role], roster.stages.index(m.name)
                                    if m.role == "trainer" else 0))
    table = cpu_table([(m.name, m.role, got.get(m.name)) for m in members])
    return {**table, "unreadable": unreadable, "source": "the signed usage messages in the log"}


def _add_channels(knowledge: Knowledge, audit: Audit, run: RunLayout, cfg: RunConfig, data,
                  stages: list[str], order: Order) -> None:
    """Every trainer's received channels as `received/<trainer>` fields, named as it can name
    them under the run's batch `order`; the rows each saw per kind (retained or not) go to the
    references, for the report's "rows used of received"."""
    retention = Retention.parse(cfg.log.retention)
    full = {k for k in CHANNEL_KINDS if retention.limit(k) is None}
    ch = read_channels(run.log, len(data.x_train), len(data.x_test), full, order)
    for s in stages:
        knowledge.values[received_field(s)] = ch.of(s)
    audit.references["channels_seen"] = ch.seen
    audit.references["released_seen"] = ch.seen.get(stages[0], {}).get("fwd", 0)


def _add_simulated(knowledge: Knowledge, audit: Audit, cfg: RunConfig, data, stages: list[str],
                   spec: FilterSpec | None, replayed: Replay, attacks: list[Attack],
                   order: Order) -> None:
    """Where the log keeps only a sample of the `fwd` or `eval_fwd` streams, each trainer's
    channels also get their white-box simulation (`audit.simulated`), when an attack reads
    the trainers' channels, its rows named as the trainer could name them (`order`); the
    report names which were simulated, and why."""
    if not any(f.startswith("received/") for a in attacks for f in a.threat.sees):
        return
    retention = Retention.parse(cfg.log.retention)
    half = len(data.x_test) // 2
    private = np.arange(half, min(len(data.x_test), half + TARGETS // 2))
    train = followed(len(data.x_train))
    streams = [Stream(kind, split, ids, to_float(x[ids]), sorted(replayed.owner_epochs.get(
                   kind, ())))
               for kind, split, ids, x in (("fwd", "train", train, data.x_train),
                                           ("eval_fwd", "test", private, data.x_test))
               if retention.limit(kind) is not None and len(ids)]
    head, done = knowledge.values["release"].head, []
    for stream in (s for s in streams if s.epochs):
        rows = simulate(head, knowledge.values["stages"], spec, stream, MAX_ROWS)
        for s, r in zip(stages, rows, strict=True):
            knowledge.values[received_field(s)][r.kind] = order.as_attacker_names(r)
        done.append({"channel": rows[0].kind,
                     "samples": len(rows[0]) // max(1, len(np.unique(rows[0].epochs))),
                     "epochs": sorted({int(e) for e in rows[0].epochs}),
                     "released_in": list(stream.epochs)})
    if done:
        audit.references["simulated"] = {
            "channels": done,
            "why": f"[log] retention `{cfg.log.retention}` keeps only a sample of these streams",
            "how": "white-box: the delivered head and stages, the privacy filter with fresh "
                   "noise, no bus codec" + ("" if fresh_per_epoch(spec) else
                                           "; one epoch, since every epoch's release is the "
                                           "same without per-step noise")}


def _attack(attack: Attack, knowledge: Knowledge, truth: Truth, audit: Audit,
            progress) -> dict[str, Any]:
    """Run one attack on its view and score it: its report row (wall_s in seconds)."""
    print(f"auditor: attack {attack.name}: {attack.title}", file=sys.stderr, flush=True)
    a0 = time.perf_counter()
    out = attack.run(knowledge.view(attack.threat), progress)
    row = {"name": attack.name, "family": attack.family, "title": attack.title,
           "threat_model": attack.threat.to_json(),
           **score_attack(attack, out, truth, audit, progress)}
    row["wall_s"] = round(time.perf_counter() - a0, 1)
    return row


def _predict(model: torch.nn.Module, x: torch.Tensor, groups: np.ndarray | None = None
             ) -> np.ndarray:
    """Class predictions; pseudo-class outputs are decoded by summing each class's."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 512):
            p = model(x[i:i + 512]).softmax(1)
            out.append((group_sum(p, groups) if groups is not None else p).argmax(1))
    return torch.cat(out).numpy()


def score_attack(attack: Attack, out: Any, truth: Truth, audit: Audit,
                 progress=track) -> dict[str, Any]:
    """Score an attack's output with its family's scorer (`clicooper_bus.audit.families`).
    Raises UnknownFamily (a ClicooperError) for a family that is not registered."""
    return families.of(attack).score(attack, out, truth, audit, progress)
