"""Every tensor channel a trainer received, read back from a verified log.

Trainer k receives `fwd` (activations from its predecessor), `bwd` (gradients from its
successor, or from the owner's tail), `labels` (the last stage, unless the owner keeps a tail)
and `eval_fwd` (evaluation activations). Each row of each retained body is named as the trainer
can name it (`audit.order`): under the public batch order, a function of the roster's seed
(`batch_order(n, bs, seed, epoch)`), by the sample it belongs to, which lets an attacker link
one sample's releases across epochs by id; under a secret order, by its release tag (epoch and
position), which it must link by matching. Evaluation batches are named by position in the
test split.

Memory is bounded per channel: where every body of a kind is retained, only the rows of a fixed
subset of `TARGETS` sample ids are kept (in every epoch, so linking stays possible; for
evaluation, half from the public aux half of the test split and half from the private half);
otherwise every retained row is kept, up to `MAX_ROWS` (the latest epochs first).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from clicooper_bus.audit.order import Order
from clicooper_bus.audit.replay import resent
from clicooper_bus.errors import BadTensor
from clicooper_bus.ml.attacks.linking import Rows
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import array_of, parse_header, split_leaf
from clicooper_bus.plan import Plan
from clicooper_bus.tlog.log import ProvenanceLog

KINDS = ("fwd", "bwd", "labels", "eval_fwd")
TARGETS = 2000  # sample ids followed through every epoch where a kind is retained in full
MAX_ROWS = 8192  # rows kept per channel otherwise


@dataclass
class Channels:
    """What each trainer received: per trainer, per kind, the kept rows and how many rows it
    saw in all (retained or not)."""

    rows: dict[str, dict[str, Rows]] = field(default_factory=dict)
    seen: dict[str, dict[str, int]] = field(default_factory=dict)
    undecodable: int = 0  # retained bodies that do not decode (a receiver refused them)

    def of(self, trainer: str) -> dict[str, Rows]:
        return self.rows.get(trainer, {})


def followed(n_train: int) -> np.ndarray:
    """The training sample ids followed through every epoch (sorted; a fixed draw, the same in
    every audit): where a kind is retained in full, and in the white-box simulation."""
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(n_train, min(TARGETS, n_train), replace=False))


class _Sampler:
    """Which rows of a batch to keep, and their sample ids."""

    def __init__(self, plan: Plan, n_train: int, n_test: int, full: set[str],
                 order: Order | None = None):
        self.plan, self.n_train, self.n_test, self.full = plan, n_train, n_test, full
        self.targets = np.zeros(n_train, bool)
        self.targets[followed(n_train)] = True
        self.order = order or Order(n_train, plan.batch_size, plan.seed)
        self.orders: dict[int, list[np.ndarray]] = {}

    def ids(self, kind: str, epoch: int, batch: int, n: int) -> np.ndarray | None:
        """The sample ids of a batch's n rows, or None if they do not fit the data."""
        if kind == "eval_fwd":
            start = batch * self.plan.batch_size
            return np.arange(start, start + n) if start + n <= self.n_test else None
        if epoch not in self.orders:  # the truth: which samples, whoever may know it
            self.orders[epoch] = self.order.batches(epoch)
        order = self.orders[epoch]
        return order[batch] if 0 <= batch < len(order) and len(order[batch]) == n else None

    def keep(self, kind: str, ids: np.ndarray) -> np.ndarray:
        if kind in self.full and kind != "eval_fwd":
            return self.targets[ids]
        if kind in self.full:
            # both halves of the test split: the public aux images' rows are an attacker's
            # known plaintext (completion labels them), the private half's are what it attacks
            half, each = self.n_test // 2, TARGETS // 2
            return (ids < each) | ((ids >= half) & (ids < half + each))
        return np.ones(len(ids), bool)


def read_channels(directory: str | os.PathLike[str], n_train: int, n_test: int,
                  full: set[str], order: Order | None = None) -> Channels:
    """Every trainer's received channels from the verified log at `directory`; `n_train` and
    `n_test` are the run's split sizes, `full` the kinds the log retains in full (their rows are
    cut down to the target samples, chosen by the auditor with the truth side's `order`:
    default the public one), the rows named as an attacker can (`Order.as_attacker_names`).
    Run only on a log `verify_log` accepted."""
    parts: dict[tuple[str, str], list[tuple[np.ndarray, int, np.ndarray]]] = {}
    out = Channels()
    with ProvenanceLog.open(directory) as plog:
        roster = Roster.open(plog.roster_bytes)
        plan = Plan.from_meta(roster.meta["plan"])
        order = order or Order(n_train, plan.batch_size, plan.seed)
        sampler = _Sampler(plan, n_train, n_test, full, order)
        stages, sent = set(roster.stages), set()
        for i in range(plog.size):
            h = parse_header(split_leaf(plog.leaf(i))[0], plog.limits)
            if h.kind not in KINDS or h.to not in stages or not h.shape or resent(h, sent):
                continue
            seen = out.seen.setdefault(h.to, {})
            seen[h.kind] = seen.get(h.kind, 0) + h.shape[0]
            body = plog.body(h.body_sha256)
            if body is None or h.epoch is None or h.batch is None:
                continue
            ids = sampler.ids(h.kind, int(h.epoch), int(h.batch), h.shape[0])
            if ids is None or not len(ids):
                continue
            try:
                x = array_of(h.dtype, h.shape, bytes(body), h.sender).reshape(
                    h.shape[0], math.prod(h.shape[1:]))
            except (BadTensor, ValueError):  # one its receiver refused (the run stopped on it)
                out.undecodable += 1
                continue
            keep = sampler.keep(h.kind, ids)
            if keep.any():
                parts.setdefault((h.to, h.kind), []).append((ids[keep], int(h.epoch), x[keep]))
    for (trainer, kind), batches in parts.items():
        out.rows.setdefault(trainer, {})[kind] = order.as_attacker_names(_stack(kind, batches))
    return out


def _stack(kind: str, batches: list[tuple[np.ndarray, int, np.ndarray]]) -> Rows:
    """The batches' rows, latest epoch first, at most MAX_ROWS."""
    batches = sorted(batches, key=lambda b: -b[1])
    kept, n = [], 0
    for b in batches:
        if n >= MAX_ROWS:
            break
        kept.append(b)
        n += len(b[0])
    ids = np.concatenate([b[0] for b in kept])[:MAX_ROWS]
    epochs = np.concatenate([np.full(len(b[0]), b[1]) for b in kept])[:MAX_ROWS]
    x = np.concatenate([b[2] for b in kept])[:MAX_ROWS]
    x = x.astype(np.int64) if kind == "labels" else x.astype(np.float32)
    return Rows(kind, "test" if kind == "eval_fwd" else "train", ids, epochs, x)
