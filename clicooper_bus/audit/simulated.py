"""White-box simulation of the activation streams the log did not retain in full.

Under sampled retention (the default keeps the first 16 `fwd` batches of each epoch) the log
holds a few thousand of the releases a trainer saw in an epoch, and almost never the same
sample in two epochs, so the linking attack has little to link. The auditor knows what the
trainers cannot hide from it: the delivered head and stages and the privacy mechanism. It
recomputes the `fwd` stream of every stage for the followed training samples
(`channels.followed`) in every epoch the owner released in: the head, the privacy filter
(clip and the mechanism's noise, drawn fresh with a key of the auditor's: the owner's is
secret; in `once` mode one draw per sample, reused every epoch, as the owner does), then the
stages before it. The channel is named `fwd (simulated)` in the report.

It is a white-box stand-in, not what was sent: every epoch is computed with the final
weights (the trained head separates the classes at least as well as the earlier ones did),
so it is read beside the retained channels, never instead of them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from clicooper_bus.ml.attacks.channels import Rows
from clicooper_bus.ml.attacks.nets import apply
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec

SIMULATED = "fwd (simulated)"
BATCH = 500  # samples pushed through the head and stages at once (memory, not results)


@torch.no_grad()
def simulate_fwd(head: nn.Module, stages: Sequence[nn.Module], spec: FilterSpec | None,
                 images: torch.Tensor, ids: np.ndarray, epochs: Sequence[int]
                 ) -> list[Rows]:
    """The `fwd` stream each stage would have received: one `Rows` per stage (stage 1 first),
    row (sample `ids[j]`, epoch e) for every epoch in `epochs`, x flattened N x D float32.
    `images` are the followed samples' images, float N x C x H x W in [0, 1]."""
    secret = secrets.token_bytes(32)
    filt = ActivationFilter(spec, secret) if spec is not None else None
    per_stage: list[list[np.ndarray]] = [[] for _ in stages]
    for epoch in epochs:
        for start in range(0, len(ids), BATCH):
            a = _release(head, filt, images[start:start + BATCH], ids[start:start + BATCH],
                         int(epoch))
            for i, stage in enumerate(stages):
                per_stage[i].append(a.reshape(len(a), -1).numpy().astype(np.float32))
                if i + 1 < len(stages):
                    a = apply(stage.eval(), a)
    n = len(epochs)
    tiled_ids = np.tile(ids, n)
    tiled_epochs = np.repeat(np.asarray(epochs, np.int64), len(ids))
    return [Rows(SIMULATED, "train", tiled_ids, tiled_epochs, np.concatenate(parts))
            for parts in per_stage]


@torch.no_grad()
def _release(head: nn.Module, filt: ActivationFilter | None, x: torch.Tensor, ids: np.ndarray,
             epoch: int) -> torch.Tensor:
    """The owner's release of images `x`: the head, then the filter. Per-step noise is keyed by
    (epoch, first sample) here, so every epoch and batch draws afresh; `once` noise by sample."""
    a = apply(head.eval(), x)
    if filt is None:
        return a
    return filt(a, ids=ids, split="train", step=epoch * 1_000_003 + int(ids[0]))
