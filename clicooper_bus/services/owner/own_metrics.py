"""The owner's own loss and accuracy of every training step, without its tail (issue 19): the
last stage sends the step's logits beside its `metrics`; the owner recomputes both from them and
the labels it sent (`ml.step_metrics`), keeps its own numbers for the summary, and refuses a
claim they do not bear out (PoisonedInput naming the last stage: the run stops cleanly).

With the owner's tail the owner computes the loss itself and none of this is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clicooper_bus.errors import PoisonedInput
from clicooper_bus.ml.step_metrics import disagreement, step_metrics
from clicooper_bus.ml.tensors import Expected, received
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol import Metrics


class OwnMetrics:
    """Per training step: the labels the owner sent, the logits the last stage sent back, its
    claim; `checked` once they agree. `metrics` is the owner's books' table (step -> Metrics):
    a checked step's entry is replaced by the owner's own numbers."""

    def __init__(self, last: str, classes: int, codec: str, metrics: dict[int, Metrics],
                 stale: Callable[[Envelope], bool]):
        self.last, self.classes, self.codec = last, classes, codec
        self.metrics, self.stale = metrics, stale
        self.labels: dict[int, torch.Tensor] = {}  # sent, not yet checked
        self.logits: dict[int, torch.Tensor] = {}  # received, not yet checked
        self.checked: set[int] = set()

    def sent(self, step: int, labels) -> None:
        """The labels of training step `step` went to the last stage."""
        self.labels[step] = torch.as_tensor(labels).long()

    def on_logits(self, env: Envelope) -> None:
        """The last stage's logits of a step the owner sent labels for, once (the receive
        check: float32 [rows of that step, classes], finite). Raises PoisonedInput."""
        if self.stale(env):
            return
        step = env.header.step
        labels = self.labels.get(step) if step is not None else None
        if labels is None or step in self.logits or step in self.checked:
            raise PoisonedInput(sender=self.last, kind="logits", step=step, problem=(
                "logits of a step the owner sent no labels for, or a second time"))
        want = Expected("float32", (self.classes,), rows=len(labels))
        self.logits[step] = received(env, want, self.last)
        self.check(step)

    def check(self, step: int) -> None:
        """Once a step's logits and claim are both in: the claim must be what the logits give
        (within the codec's bound), and the owner's own numbers replace it."""
        claim = self.metrics.get(step)
        if step in self.checked or claim is None or step not in self.logits:
            return
        logits, labels = self.logits.pop(step), self.labels.pop(step)
        problem = disagreement(claim.loss, claim.correct, logits, labels, self.codec)
        if problem is not None:
            raise PoisonedInput(sender=self.last, kind="metrics", step=step, problem=(
                f"{problem}: the owner reports only metrics it can check"))
        self.metrics[step] = Metrics(*step_metrics(logits, labels))
        self.checked.add(step)

    def forget_from(self, step: int) -> None:
        """A rollback to `step`: the steps from it on are sent and checked again."""
        for table in (self.labels, self.logits):
            for s in [s for s in table if s >= step]:
                del table[s]
        self.checked = {s for s in self.checked if s < step}
