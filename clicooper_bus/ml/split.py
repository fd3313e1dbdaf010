"""The arithmetic of one segment in a split-learning chain, shared by the in-process reference
and the processes on the bus, so that both compute exactly the same thing.

Per training step a segment sees: `forward(x)` (keeps what backward needs), then either
`backward(grad_out)` (head and middle stages) or `loss_backward(labels)` (the last stage).
Both return the gradient with respect to the segment's input (None for the head, whose input is
data) and take one optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StepResult:
    grad_in: torch.Tensor | None
    loss: float = float("nan")
    correct: int = 0


class SegmentTrainer:
    def __init__(self, module: nn.Module, *, lr: float = 1e-3, is_head: bool = False):
        self.module = module
        self.is_head = is_head
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr) if params else None
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._raw: dict[int, torch.Tensor] = {}
        # adds the gradient of a loss on the segment's own weights to their .grad before every
        # step (a watermark), or None
        self.regularizer: Callable[[], None] | None = None
        # a loss on (input, output before `post`) added to the step's (NoPeek), or None
        self.penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, step: int,
                post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Training forward; the returned activation is detached (it crosses the network).
        `post` transforms the output on its way out (the owner's privacy filter); gradients
        flow back through it."""
        self.module.train()
        if not self.is_head:
            x = x.detach().requires_grad_(True)
        raw = self.module(x)
        out = post(raw) if post is not None else raw
        self._pending[step] = (x, out)
        if self.penalty is not None:
            self._raw[step] = raw
        return out.detach()

    def _finish(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.regularizer is not None:  # e.g. a watermark: its gradient joins the step's
            self.regularizer()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return None if self.is_head else x.grad.detach()

    @property
    def pending(self) -> set[int]:
        """Steps whose forward is waiting for its backward."""
        return set(self._pending)

    def output_shape(self, step: int) -> tuple[int, ...]:
        """Shape of the output `forward` produced for `step` (to check what comes back)."""
        return tuple(self._pending[step][1].shape)

    def backward(self, grad_out: torch.Tensor, step: int) -> torch.Tensor | None:
        x, out = self._pending.pop(step)
        raw = self._raw.pop(step, None)
        if self.penalty is not None and raw is not None:
            ((out * grad_out).sum() + self.penalty(x, raw)).backward()
        else:
            out.backward(grad_out)
        return self._finish(x)

    def loss_backward(self, labels: torch.Tensor, step: int) -> StepResult:
        x, logits = self._pending.pop(step)
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        correct = int((logits.detach().argmax(1) == labels).sum())
        return StepResult(self._finish(x), float(loss.detach()), correct)

    def warm_up(self, input_shape: tuple[int, ...]) -> None:
        """Run forward and backward once on zeros, without touching the weights: torch's first
        call builds kernels and can take seconds, during which a process sends no beats."""
        x = torch.zeros(input_shape, requires_grad=not self.is_head)
        out = self.module(x)
        out.backward(torch.ones_like(out))
        self.module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x)
