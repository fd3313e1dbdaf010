"""The arithmetic of one segment in a split-learning chain, shared by the in-process reference
and the processes on the bus, so that both compute exactly the same thing.

Per training step a segment sees: `forward(x)` (keeps what backward needs), then either
`backward(grad_out)` (head and middle stages) or `loss_backward(labels)` (the last stage).
Both return the gradient with respect to the segment's input (None for the head, whose input is
data) and take one optimiser step; with `update=False` the step waits for `update()`, so that a
trainer can send its gradient on before spending time on its optimiser.

A pipelined owner (several batches in flight) runs the head's forward of a new batch before the
gradients of the earlier ones are back. `stash=True` keeps, per step, a copy of the weights the
forward used (PipeDream's weight stashing): the gradient is computed at those weights and
applied to the current ones, instead of torch refusing a backward through weights changed in
place since.
"""

from __future__ import annotations

from collections.abc import Callable, KeysView
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass
class StepResult:
    grad_in: torch.Tensor | None
    loss: float = float("nan")
    correct: int = 0
    logits: torch.Tensor | None = None  # [N, C], detached: what the loss was computed on


class SegmentTrainer:
    def __init__(self, module: nn.Module, *, lr: float = 1e-3, is_head: bool = False,
                 stash: bool = False):
        self.module = module
        self.is_head = is_head
        self.stash = stash
        self._weights: dict[int, dict[str, torch.Tensor]] = {}  # stashed, per step
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
        if self.stash:
            weights = {n: p.detach().clone().requires_grad_(p.requires_grad)
                       for n, p in self.module.named_parameters()}
            self._weights[step] = weights
            raw = functional_call(self.module, weights, (x,))
        else:
            raw = self.module(x)
        out = post(raw) if post is not None else raw
        self._pending[step] = (x, out)
        if self.penalty is not None:
            self._raw[step] = raw
        return out.detach()

    def _finish(self, x: torch.Tensor, step: int, update: bool) -> torch.Tensor | None:
        weights = self._weights.pop(step, None)
        if weights is not None:  # the gradient at the stashed weights goes to the live ones
            for n, p in self.module.named_parameters():
                g = weights[n].grad
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        if update:
            self.update()
        return None if self.is_head else x.grad.detach()

    def update(self) -> None:
        """The optimiser step of the last backward (after a `backward(..., update=False)`)."""
        if self.regularizer is not None:  # e.g. a watermark: its gradient joins the step's
            self.regularizer()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def pending(self) -> KeysView[int]:
        """Steps whose forward is waiting for its backward (a live view: read on every
        message a trainer handles, so not copied)."""
        return self._pending.keys()

    def output_shape(self, step: int) -> tuple[int, ...]:
        """Shape of the output `forward` produced for `step` (to check what comes back)."""
        return tuple(self._pending[step][1].shape)

    def backward(self, grad_out: torch.Tensor, step: int, *,
                 update: bool = True) -> torch.Tensor | None:
        x, out = self._pending.pop(step)
        raw = self._raw.pop(step, None)
        if self.penalty is not None and raw is not None:
            ((out * grad_out).sum() + self.penalty(x, raw)).backward()
        else:
            out.backward(grad_out)
        return self._finish(x, step, update)

    def loss_backward(self, labels: torch.Tensor, step: int, *,
                      update: bool = True) -> StepResult:
        x, logits = self._pending.pop(step)
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        correct = int((logits.detach().argmax(1) == labels).sum())
        return StepResult(self._finish(x, step, update), float(loss.detach()), correct,
                          logits.detach())

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
