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

Random layers (dropout) draw from a generator seeded per step (`step_seed`), not from the
process's: a step's forward is then a function of the seed, the step and the weights alone,
which replay verification recomputes (`audit.training_replay`); the process RNG would make it a
function of everything the process drew before.
"""

from __future__ import annotations

import hashlib
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


def step_seed(seed: int, stage: int, step: int) -> int:
    """The seed of stage `stage`'s random layers at training step `step` of a run whose plan
    seed is `seed`: 63 bits of SHA-256 over the three, so that no two (stage, step) share a
    stream."""
    digest = hashlib.sha256(f"clicooper-dropout/{seed}/{stage}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def is_random(module: nn.Module) -> bool:
    """Whether `module` draws random numbers in training mode (a dropout layer)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())


class SegmentTrainer:
    def __init__(self, module: nn.Module, *, lr: float = 1e-3, is_head: bool = False,
                 stash: bool = False, seed: tuple[int, int] | None = None):
        """`seed`: (plan seed, stage) for the per-step generator of random layers (see the
        module's docstring); None draws from the process's RNG (the owner's head, which no
        one replays)."""
        self.module = module
        self.is_head = is_head
        self.stash = stash
        self.seed = seed if seed is not None and is_random(module) else None
        self._weights: dict[int, dict[str, torch.Tensor]] = {}  # stashed, per step
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr) if params else None
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._raw: dict[int, torch.Tensor] = {}
        # adds the gradient of a loss on the segment's own weights to their .grad before every
        # step (a watermark), or None
        self.regularizer: Callable[[], None] | None = None
        # a loss on (input, output before `post`, step) added to the step's (NoPeek, label
        # decorrelation: `ml.privacy.nopeek.HeadPenalty`), or None
        self.penalty: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, step: int,
                post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Training forward; the returned activation is detached (it crosses the network).
        `post` transforms the output on its way out (the owner's privacy filter); gradients
        flow back through it."""
        self.module.train()
        if not self.is_head:
            x = x.detach().requires_grad_(True)
        if self.seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(step_seed(*self.seed, step))
                raw = self._call(x, step)
        else:
            raw = self._call(x, step)
        out = post(raw) if post is not None else raw
        self._pending[step] = (x, out)
        if self.penalty is not None:
            self._raw[step] = raw
        return out.detach()

    def _call(self, x: torch.Tensor, step: int) -> torch.Tensor:
        if self.stash:
            weights = {n: p.detach().clone().requires_grad_(p.requires_grad)
                       for n, p in self.module.named_parameters()}
            self._weights[step] = weights
            return functional_call(self.module, weights, (x,))
        return self.module(x)

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
            ((out * grad_out).sum() + self.penalty(x, raw, step)).backward()
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
