"""White-box simulation of the activation streams the log did not retain in full.

Under sampled retention (the default keeps the first 16 `fwd` batches and the first 2
`eval_fwd` batches of each epoch) the log holds a few thousand of the releases a trainer saw
in an epoch, almost never the same sample in two epochs (so the linking attack has little to
link), and no evaluation release of the test split's private half at all (its first batches
are the public aux images). The auditor knows what the trainers cannot hide from it: the
delivered head and stages and the privacy mechanism. It recomputes, for every stage:
- `fwd (simulated)`: the followed training samples (`channels.followed`) in every epoch the
  owner released training batches in;
- `eval_fwd (simulated)`: the first TARGETS / 2 images of the private half, in every epoch
  the owner evaluated through the chain;
each as the head, the privacy filter (clip and the mechanism's noise, drawn fresh with a key
of the auditor's, since the owner's is secret; in `once` mode one draw per sample, reused
every epoch, as the owner does), then the stages before it.

It is a white-box stand-in, not what was sent: every epoch is computed with the final
weights (the trained head separates the classes at least as well as the earlier ones did)
and without the bus codec's rounding, so it is at least as strong as what was sent; the
report names it, and it is read beside the retained channels. Without fresh noise per epoch
(no mechanism, or `once` mode) every epoch's simulated release is the same, so one epoch is
simulated: linking identical copies measures nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clicooper_bus.ml.attacks.channels import simulated
from clicooper_bus.ml.attacks.linking import Rows
from clicooper_bus.ml.attacks.nets import apply
from clicooper_bus.ml.privacy.release import ActivationFilter, FilterSpec

BATCH = 500  # samples pushed through the head and stages at once (memory, not results)


@dataclass(frozen=True)
class Stream:
    """One stream to simulate: `kind` (fwd or eval_fwd), `split` (train or test), the sample
    ids (positions in that split), their images (float N x C x H x W in [0, 1]), and the
    epochs the owner released it in."""

    kind: str
    split: str
    ids: np.ndarray
    images: torch.Tensor
    epochs: Sequence[int]


def fresh_per_epoch(spec: FilterSpec | None) -> bool:
    """Whether each epoch's release of a sample differs (per-step noise): else one suffices."""
    return spec is not None and spec.mode != "once"


@torch.no_grad()
def simulate(head: nn.Module, stages: Sequence[nn.Module], spec: FilterSpec | None,
             stream: Stream, max_rows: int) -> list[Rows]:
    """What each stage would have received of `stream`: one `Rows` per stage (stage 1
    first), kind `<kind> (simulated)`, row (sample, epoch) for each simulated epoch, x
    flattened N x D float32; at most `max_rows` rows per stage (fewer samples when there are
    many epochs, so that memory stays bounded)."""
    epochs = list(stream.epochs) if fresh_per_epoch(spec) else list(stream.epochs)[-1:]
    n = min(len(stream.ids), max(1, max_rows // max(1, len(epochs))))
    ids, images = stream.ids[:n], stream.images[:n]
    filt = ActivationFilter(spec, secrets.token_bytes(32)) if spec is not None else None
    per_stage: list[list[np.ndarray]] = [[] for _ in stages]
    draw = 0  # per-step noise: every (epoch, batch) its own draw
    for _epoch in epochs:
        for start in range(0, n, BATCH):
            a = apply(head.eval(), images[start:start + BATCH])
            if filt is not None:
                a = filt(a, ids=ids[start:start + BATCH], split=stream.split, step=draw)
            draw += 1
            for i, stage in enumerate(stages):
                per_stage[i].append(a.reshape(len(a), -1).numpy().astype(np.float32))
                if i + 1 < len(stages):
                    a = apply(stage.eval(), a)
    tiled_ids = np.tile(ids, len(epochs))
    tiled_epochs = np.repeat(np.asarray(epochs, np.int64), n)
    return [Rows(simulated(stream.kind), stream.split, tiled_ids, tiled_epochs,
                 np.concatenate(parts)) for parts in per_stage]
