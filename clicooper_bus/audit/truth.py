"""What the auditor hands attacks, and what it keeps to itself.

`gather` turns the replayed log, the run's data and its delivered model into `Knowledge` (the
fields attacks may be handed, cut down per threat model by `Knowledge.view`) and `Truth` (which
samples each released batch held, their images and labels, the evaluation half of the test
split: what attacks are scored against, never handed out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clicooper_bus.audit.order import Order
from clicooper_bus.audit.replay import Batch, Replay
from clicooper_bus.config import RunConfig
from clicooper_bus.errors import ClicooperError
from clicooper_bus.ml.attacks.base import Knowledge
from clicooper_bus.ml.attacks.channels import stage_field
from clicooper_bus.ml.attacks.linking import RELEASE
from clicooper_bus.ml.data import Dataset, to_float
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec

CLUSTER_SAMPLES = 2000  # activations clustered (the latest released batches first)


class Release(torch.nn.Module):
    """The owner's release path as a white-box attacker knows it: the head, then the privacy
    filter (clip and noise, fresh: the attacker lacks the owner's secret). A module, so each
    view gets its own copy."""

    def __init__(self, head: torch.nn.Module, spec: FilterSpec | None = None):
        super().__init__()
        self.head = head
        self.filter = ActivationFilter(spec) if spec is not None else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.head(x)
        return self.filter(a) if self.filter is not None else a


@dataclass
class Truth:
    """What only the auditor knows: indices, images and labels behind the released batches."""

    released_index: np.ndarray  # training-set index of each released sample used
    images: np.ndarray  # their images, float [0, 1]
    labels: np.ndarray  # their true labels
    eval_images: torch.Tensor
    eval_labels: np.ndarray
    aux: np.ndarray  # the public aux images and labels, for the reference lines
    aux_labels: np.ndarray
    train_labels: np.ndarray | None = None  # every training label, by sample id (channels)
    test_labels: np.ndarray | None = None  # every test label, by position in the test split
    order: Order | None = None  # the run's batch order, which turns release tags to samples

    def labels_of(self, split: str, ids: np.ndarray) -> np.ndarray:
        """The true labels of rows an attack named `ids` in `split` (`Rows.split`): training
        sample ids, release tags (a secret order) or positions in the test split."""
        if split == RELEASE:
            if self.order is None:
                raise ClicooperError("rows named by release tag, but no batch order to read them")
            return self.train_labels[self.order.samples(ids)]
        return (self.train_labels if split == "train" else self.test_labels)[ids]


def _latest_first(batches: list[Batch], limit: int) -> list[Batch]:
    """Whole batches from the latest epoch backwards (the released head closest to the final
    one), in log order within an epoch, up to `limit` samples."""
    chosen, n = [], 0
    for epoch in sorted({b.epoch for b in batches}, reverse=True):
        for b in (b for b in batches if b.epoch == epoch):
            if n >= limit:
                break
            chosen.append(b)
            n += len(b.array)
    return chosen


def gather(replayed: Replay, data: Dataset, segments, cfg: RunConfig, spec: FilterSpec | None,
           order: Order) -> tuple[Knowledge, Truth, dict[str, Any]]:
    """What attacks may see, the truth they are scored against, and the settings that say
    which data was attacked. `segments` is the delivered model, `spec` the privacy filter (or
    None), `order` the run's batch order (`audit.order.run_order`); `cfg`, the run's verified
    configuration, is not read. Raises ClicooperError when the log retains no released
    activations or a released batch does not fit the run's data."""
    plan = replayed.plan
    if not replayed.released:
        raise ClicooperError("the log retains no released activations (fwd bodies): set "
                             "[log] retention to keep some, e.g. fwd=sample:16")
    chosen = _latest_first(replayed.released, CLUSTER_SAMPLES)
    index, acts, received = _align(chosen, replayed, data, order)
    half = len(data.x_test) // 2
    aux = to_float(data.x_test[:half])
    head, stages = segments[0], segments[1:1 + len(plan.cuts)]  # not the owner's tail

    pairs = _eval_pairs(replayed, aux, plan.batch_size)
    knowledge = Knowledge({
        "plan": plan, "released": np.concatenate(acts).astype(np.float32),
        "released_labels": np.concatenate(received).astype(np.int64), "eval_pairs": pairs,
        "stages": stages, "release": Release(head, spec), "aux_images": aux,
        "aux_labels": data.y_test[:half],
        # each trainer's own stage, for the attacks of that trainer alone (roster order)
        **{stage_field(name): s for name, s in zip(replayed.roster.stages, stages, strict=True)}})
    truth = Truth(index, data.x_train[index].astype(np.float32) / 255.0, data.y_train[index],
                  to_float(data.x_test[half:]), data.y_test[half:], aux.numpy(), data.y_test[:half],
                  data.y_train, data.y_test, order)
    epochs = sorted({b.epoch for b in chosen})
    info = {"released_samples": len(index), "released_epochs": epochs,
            "eval_pairs": 0 if pairs is None else len(pairs[0]), "aux_samples": half,
            "eval_samples": len(data.x_test) - half,
            "labels_aligned": int((knowledge.values["released_labels"] >= 0).sum())}
    return knowledge, truth, info


def _align(chosen: list[Batch], replayed: Replay, data: Dataset, order: Order
           ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """For each chosen batch: the training-set indices it held (recomputed from the run's
    batch order), its activations, and the labels the last stage received for its step (-1
    where none was retained). Raises ClicooperError if a batch does not fit the run's data."""
    labels_by_step = {b.step: b.array for b in replayed.labels}
    index, acts, received = [], [], []
    for b in chosen:
        batches = order.batches(b.epoch)
        if not 0 <= b.batch < len(batches):
            raise ClicooperError(f"released batch {b.batch} of epoch {b.epoch} does not exist in "
                                 f"a {len(batches)}-batch epoch of this run's data")
        idx = batches[b.batch]
        if len(idx) != len(b.array):
            raise ClicooperError(f"released batch {b.batch} of epoch {b.epoch} holds "
                                 f"{len(b.array)} samples, the run's batch order says {len(idx)}: "
                                 f"config.toml does not describe this run's data")
        index.append(idx)
        acts.append(b.array)
        received.append(labels_by_step.get(b.step, np.full(len(idx), -1)))
    return np.concatenate(index), acts, received


def _eval_pairs(replayed: Replay, aux: torch.Tensor, bs: int):
    """Evaluation releases of aux images from the latest epoch that has any, with the images."""
    usable = [b for b in replayed.eval_released if (b.batch + 1) * bs <= len(aux)]
    if not usable:
        return None
    last = max(b.epoch for b in usable)
    batches = [b for b in usable if b.epoch == last]
    x = torch.cat([aux[b.batch * bs:b.batch * bs + len(b.array)] for b in batches])
    return x, np.concatenate([b.array for b in batches]).astype(np.float32)
