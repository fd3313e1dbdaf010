"""What the owner builds from its config before it joins the bus: the data, the split model,
the defences, the training plan and the roster that signs them."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from clicooper_bus.config import RunConfig
from clicooper_bus.ml.data import Dataset, load_dataset, order_commitment
from clicooper_bus.ml.models import ModelSpec, build_segments, configured_split
from clicooper_bus.ml.privacy import defences as privacy
from clicooper_bus.ml.privacy.nopeek import HeadPenalty
from clicooper_bus.ml.privacy.secret import load_or_create, run_key
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.net.identity import Identity, PublicIdentity
from clicooper_bus.net.roster import Roster
from clicooper_bus.plan import Plan
from clicooper_bus.protocol.recovery import STATES_ROUNDS
from clicooper_bus.tlog.retention import Retention


@dataclass
class OwnerSetup:
    data: Dataset
    spec: ModelSpec
    cuts: tuple[int, ...]
    plan: Plan
    segments: list  # head, the trainers' stages, and the owner's tail if it keeps one
    defences: privacy.Defences
    head: SegmentTrainer
    tail: SegmentTrainer | None
    roster: Roster
    penalty: HeadPenalty | None = None  # the head's NoPeek and label decorrelation
    order_key: bytes | None = None  # the secret batch order's key (None: the public order)


def build(cfg: RunConfig, ident: Identity, trainer_keys: list[PublicIdentity],
          notary_key: PublicIdentity) -> OwnerSetup:
    """Load the data and build everything the run needs. Raises ConfigError for a bad model,
    cut or dataset, and KeyFileError for an unreadable owner secret."""
    p, pv = cfg.participants, cfg.privacy
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.run.seed)
    data = data.limit(cfg.data.train_limit or None, cfg.data.test_limit or None)
    # the secret, through a fresh key of this run, keys the noise and the pseudo-labels;
    # it never leaves the key directory
    # randomised response is keyed by the secret itself: every run draws the same labels
    owner_secret = load_or_create(p.keys, p.owner) if pv.on else None
    secret = run_key(owner_secret, cfg.run.id) if owner_secret is not None else None
    classes = data.classes
    spec, cuts, tail_at = configured_split(cfg, data.input_shape, classes)
    plan = Plan(spec.name, data.input_shape, classes, cuts, cfg.run.seed, cfg.run.lr,
                cfg.run.batch_size, outputs=classes * pv.label_gamma if pv.label_gamma > 1 else 0,
                tail=tail_at, in_flight=cfg.run.in_flight, layers=spec.layers,
                train_size=len(data.x_train), test_size=len(data.x_test),
                max_steps=cfg.run.max_steps, codec=cfg.bus.codec)
    segments = build_segments(spec, plan.segment_cuts, cfg.run.seed)
    defences = privacy.Defences.build(pv, secret, classes, cfg.run.epochs, owner_secret,
                                      data.x_train)
    head = SegmentTrainer(segments[0], lr=cfg.run.lr, is_head=True,
                          stash=cfg.run.in_flight > 1 and not defences.head_fixed)
    head.warm_up((cfg.run.batch_size, *data.input_shape))
    penalty = HeadPenalty(pv.nopeek, pv.label_dcor, classes) \
        if pv.nopeek or pv.label_dcor else None
    head.penalty = penalty
    tail = SegmentTrainer(segments[-1], lr=cfg.run.lr) if tail_at else None
    # fresh for every run (a run with defences is never resumed); the roster commits to it
    order_key = secrets.token_bytes(32) if pv.secret_order else None
    roster = Roster.build(
        cfg.run.id, owner=ident.public, trainers=trainer_keys, notary=notary_key,
        meta={"plan": plan.to_meta(), "model_spec": spec.digest(plan.segment_cuts),
              "config": cfg.digest(), "dataset": data.name, "model": spec.name,
              **watermark_meta(cfg, len(data.x_train)), **states_meta(cfg),
              **({"order_commitment": order_commitment(order_key)} if order_key else {})},
        standby=[public_key(p.keys, n) for n in p.standby])
    return OwnerSetup(data, spec, cuts, plan, segments, defences, head, tail, roster, penalty,
                      order_key)


def states_meta(cfg: RunConfig) -> dict[str, str]:
    """`states`: when the log keeps only some bodies of the training tensors (`[log]
    retention`), every trainer sends its state at each round boundary, sealed to the owner,
    so that replay verification can start a span there (`protocol.recovery.StageState`)."""
    kept = Retention.parse(cfg.log.retention)
    if all(kept.limit(kind) is None for kind in ("fwd", "bwd", "labels")):
        return {}
    return {"states": STATES_ROUNDS}


def public_key(keys: str, name: str) -> PublicIdentity:
    from pathlib import Path

    from clicooper_bus.net.identity import load_public

    return load_public(Path(keys) / f"{name}.pub")


def watermark_meta(cfg: RunConfig, n_train: int) -> dict[str, str]:
    """The watermark settings the owner signs into the roster, with the number of rounds the
    run will have, so that a bundle missing its last rounds cannot pass for whole."""
    w = cfg.watermark
    if not w.enabled:
        return {}
    rounds = cfg.run.epochs
    if cfg.run.max_steps:
        per_epoch = -(-n_train // cfg.run.batch_size)
        rounds = min(rounds, -(-cfg.run.max_steps // per_epoch))
    return {"watermark": json.dumps({"bits": w.bits, "strength": w.strength,
                                     "threshold": w.threshold, "rounds": rounds},
                                    sort_keys=True)}
