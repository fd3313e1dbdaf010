"""In-process reference training of the same split model: the ground truth the bus must match.

Same spec, cuts, seed, batch order and segment arithmetic (`SegmentTrainer`) as the processes
on the bus; activations and gradients are passed as detached float32 tensors, exactly what
crosses the network. With defences off and the same thread count, training over the bus gives
the same weights, with pipelining too (`in_flight`): the schedule below is the owner's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from clicooper_bus.ml.data import Dataset, batch_order, to_float
from clicooper_bus.ml.models import ModelSpec, build_segments
from clicooper_bus.ml.split import SegmentTrainer


@dataclass
class ReferenceResult:
    segments: list[torch.nn.Sequential]
    per_epoch: list[dict] = field(default_factory=list)
    test_accuracy: float = float("nan")
    steps: int = 0


def evaluate(trainers: list[SegmentTrainer], x: np.ndarray, y: np.ndarray,
             batch_size: int) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        h = to_float(x[i:i + batch_size])
        for t in trainers:
            h = t.evaluate(h)
        correct += int((h.argmax(1).numpy() == y[i:i + batch_size]).sum())
    return correct / max(1, len(x))


def _head_backward(head: SegmentTrainer, window: deque[tuple[int, torch.Tensor]]) -> None:
    step, grad = window.popleft()
    head.backward(grad, step)


def train_reference(data: Dataset, spec: ModelSpec, cuts: tuple[int, ...], *, seed: int,
                    epochs: int, batch_size: int, lr: float, max_steps: int | None = None,
                    evaluate_each_epoch: bool = True,
                    progress: Callable[[dict], None] | None = None,
                    regularizers: Callable[[int, list], dict] | None = None,
                    release: Callable[[torch.Tensor, np.ndarray, int], torch.Tensor] | None = None,
                    in_flight: int = 1) -> ReferenceResult:
    """`regularizers(epoch, segments)` may return {segment index: function adding a gradient
    to the segment's weights before each step} for an epoch (each stage's watermark).
    `release(activation, sample ids, step)` transforms the head's output on its way to stage 1
    (the owner's privacy filter), as the owner does on the bus. `in_flight` > 1 delays the
    head's backward as the pipelined owner does: the head's forward of step s comes after its
    backward of step s - in_flight and before that of the next; the stages train in order."""
    segments = build_segments(spec, cuts, seed)
    trainers = [SegmentTrainer(s, lr=lr, is_head=(i == 0), stash=(i == 0 and in_flight > 1),
                               seed=(seed, i) if i else None)  # stage i's, as on the bus
                for i, s in enumerate(segments)]
    result = ReferenceResult(segments)
    step = 0
    for epoch in range(epochs):
        t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        if regularizers is not None:
            for i, fn in regularizers(epoch, segments).items():
                trainers[i].regularizer = fn
        window: deque[tuple[int, torch.Tensor]] = deque()  # (step, gradient for the head)
        for idx in batch_order(len(data.x_train), batch_size, seed, epoch):
            if max_steps is not None and step >= max_steps:
                break
            if len(window) == in_flight:
                _head_backward(trainers[0], window)
            h = to_float(data.x_train[idx])
            post = (lambda a, idx=idx, step=step: release(a, idx, step)) if release else None
            h = trainers[0].forward(h, step, post=post)
            for t in trainers[1:-1]:
                h = t.forward(h, step)
            trainers[-1].forward(h, step)
            r = trainers[-1].loss_backward(torch.from_numpy(data.y_train[idx]), step)
            g = r.grad_in
            for t in reversed(trainers[1:-1]):
                g = t.backward(g, step)
            window.append((step, g))
            loss_sum += r.loss * len(idx)
            correct += r.correct
            seen += len(idx)
            step += 1
            if progress and step % 50 == 0:
                progress({"epoch": epoch, "step": step, "loss": r.loss})
        while window:
            _head_backward(trainers[0], window)
        row = {"epoch": epoch, "loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen),
               "wall_s": time.perf_counter() - t0}
        if evaluate_each_epoch:
            row["accuracy"] = evaluate(trainers, data.x_test, data.y_test, batch_size)
        result.per_epoch.append(row)
    result.steps = step
    result.test_accuracy = evaluate(trainers, data.x_test, data.y_test, batch_size)
    return result
