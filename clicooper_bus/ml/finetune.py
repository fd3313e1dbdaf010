"""The owner's fine-tune: after split training, the owner trains its own head and tail on its
clean data, with the trainers' stages frozen, for a bounded number of epochs. Nothing is
released: no message is sent, the stages' weights (and so their watermarks and certificates)
are untouched, and the run's model, whose digest is in the log, stays as it was delivered. It
repays accuracy the defences cost (noisy releases, randomised labels) where the owner alone
can: it sees the true labels and the images without noise. The fine-tuned model is trained on
those: no epsilon of the run covers it, and handing it on releases what it learnt.

The control arm (`finetune_control`, `tools/finetune.py`) runs the same fine-tune from untrained weights
(the run's initial ones, `build_segments` at the run's seed): what the owner reaches with the
same budget and no trainer at all. If it matches, the trainers contributed nothing at that split.

The FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on one real step (forward
through every segment, backward into the head through the frozen stages, without their weight
gradients) and scaled by the samples trained (the count is linear in the batch).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clicooper_bus.ml.data import Dataset, to_float
from clicooper_bus.ml.privacy.release import FilterSpec, inference_model


@dataclass(frozen=True)
class FineTuned:
    """What a fine-tune reached: test accuracy of the fine-tuned model on the whole test split,
    the epochs and samples trained, its FLOPs (all the owner's) and its wall time."""

    accuracy: float
    epochs: int
    samples: int
    flops: float  # FLOPs of the whole fine-tune, forward and backward
    wall_s: float
    cpu_s: float  # time.process_time() of this process over the fine-tune and its test

    def to_json(self) -> dict:
        return asdict(self)


def trainable(segments: list[nn.Module], owned: tuple[int, ...]) -> list[nn.Module]:
    """Deep copies of `segments` in which only the owner's segments `owned` (indices: the head
    0 and the tail) train; every other segment's parameters are frozen."""
    out = [copy.deepcopy(s) for s in segments]
    for i, seg in enumerate(out):
        for p in seg.parameters():
            p.requires_grad_(i in owned)
    return out


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def accuracy(model: nn.Module, data: Dataset, batch_size: int) -> float:
    """Test accuracy of `model` on the whole test split (no noise, nothing released)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.x_test), batch_size):
            pred = model(to_float(data.x_test[i:i + batch_size])).argmax(1).numpy()
            correct += int((pred == data.y_test[i:i + batch_size]).sum())
    return correct / max(1, len(data.x_test))


def finetune(segments: list[nn.Module], owned: tuple[int, ...], data: Dataset, *,
             epochs: int, samples: int, batch_size: int, lr: float, seed: int,
             release: FilterSpec | None) -> tuple[list[nn.Module], FineTuned]:
    """Fine-tune copies of `segments` ([head, stages..., tail]), training only `owned`, on the
    first `samples` training images (0: all) for `epochs` epochs with Adam at `lr`, in a batch
    order drawn from `seed`; `release`: a clip kept after the head (None: none, as the owner's
    fine-tune does: the fine-tuned model never leaves it). Returns the fine-tuned segments and
    what they reached. Raises ValueError for epochs < 1."""
    if epochs < 1:
        raise ValueError(f"a fine-tune needs epochs >= 1, got {epochs}")
    t0, c0 = time.perf_counter(), time.process_time()
    tuned = trainable(segments, owned)
    model = inference_model(tuned, release)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    n = min(samples or len(data.x_train), len(data.x_train))
    rng = np.random.default_rng([seed, 0xF17E])
    per_sample = None
    for _ in range(epochs):
        for s in np.array_split(rng.permutation(n), max(1, -(-n // batch_size))):
            model.train()
            for i in range(1, len(tuned) - 1):  # frozen stages keep inference behaviour
                tuned[i].eval()
            x = to_float(data.x_train[s])
            y = torch.from_numpy(data.y_train[s].astype(np.int64))
            if per_sample is None:  # the first step, counted
                with FlopCounterMode(display=False) as counter:
                    _step(model, opt, x, y)
                per_sample = counter.get_total_flops() / len(s)
            else:
                _step(model, opt, x, y)
    acc = accuracy(model, data, batch_size)
    return tuned, FineTuned(acc, epochs, n, float(per_sample or 0.0) * n * epochs,
                            time.perf_counter() - t0, time.process_time() - c0)
