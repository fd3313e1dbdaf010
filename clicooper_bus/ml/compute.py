"""Who computes what: per participant of a split, its training FLOPs per sample, its parameters
and the bytes it sends and receives per sample, and the owner's share of the training FLOPs.

FLOPs are measured, never counted by hand: each segment runs one training step (forward, then
backward exactly as `ml/split.py` does it: the head's input needs no gradient, a stage's does,
the segment holding the loss back-propagates cross-entropy) under
`torch.utils.flop_counter.FlopCounterMode`, once for the forward alone and once for forward and
backward; backward is the difference. What that counter counts (torch's
`torch/utils/flop_counter.py`, the registered formulas): matrix products and convolutions
(`mm`, `addmm`, `bmm`, `convolution`, `convolution_backward`, attention), 2 FLOPs per
multiply-accumulate (2 * m * n * k for a product; `addmm`'s bias add, a convolution's bias,
ReLU, pooling, softmax and cross-entropy, and the optimiser's elementwise update count 0).
So a linear layer costs 2 * in * out per sample forward and, in a trainer's stage (input
gradient and weight gradient), 4 * in * out backward; in the owner's head the first layer
computes no input gradient (its input is data) and costs 2 * in * out backward.

Per-step costs that do not scale with the batch are not in the table: a trainer's watermark
regulariser (a product of its T x n projection with its carrier weights, once per step) and
NoPeek's distance correlation (owner, per batch).

Bytes are what the bus carries per training sample, in the dtypes the processes send
(`services/owner/training.py`, `services/trainer/stage.py`): activations forward and gradients
back as float32 (4 bytes a value; the owner's privacy release keeps the head's shape and dtype),
labels from the owner to the last stage as int64 (8 bytes a sample; pseudo-labels too) unless the
owner keeps the tail, in which case the last stage's output goes to the owner and its gradient
comes back instead. Envelope headers, signatures and control messages (per message, not per
sample), and evaluation traffic (forward only, per test sample) are not included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import prod

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from clicooper_bus.config import RunConfig
from clicooper_bus.ml.models import ModelSpec, build_segments, configured_split

FLOAT32_BYTES = 4  # activations and gradients cross the bus as float32
LABEL_BYTES = 8  # labels (and pseudo-labels) cross the bus as int64


@dataclass(frozen=True)
class ParticipantCompute:
    """One participant's segment. FLOPs per training sample (FlopCounterMode's count: 2 per
    multiply-accumulate of matrix products and convolutions); bytes per training sample."""

    participant: str  # "owner (head)", a trainer's name, or "owner (tail)"
    role: str  # head, stage or tail
    layers: tuple[int, int]  # [first, end) layer indices of the spec
    layer_ops: tuple[str, ...]  # the ops of those layers, in order
    fwd_flops: float  # FLOPs per sample, forward
    bwd_flops: float  # FLOPs per sample, backward (input and weight gradients)
    params: int  # parameters (numbers) of the segment
    bytes_sent: int  # bytes per sample this participant sends in training
    bytes_received: int  # bytes per sample it receives in training

    @property
    def train_flops(self) -> float:
        """FLOPs per sample of one training step: forward plus backward."""
        return self.fwd_flops + self.bwd_flops


@dataclass(frozen=True)
class CutTraffic:
    """What crosses one edge of the split per training sample, in bytes."""

    sender: str  # who sends forward (activations or labels)
    receiver: str
    at_layer: int  # the first layer after the cut (for labels: the loss layer)
    what: str  # "activations" or "labels"
    shape: tuple[int, ...]  # per sample
    fwd_bytes: int  # bytes per sample, forward (float32 activations or int64 labels)
    bwd_bytes: int  # bytes per sample, gradients back (0 for labels)


@dataclass(frozen=True)
class ComputePlan:
    """Who computes what in one split (`compute_plan`). Units: FLOPs and bytes per training
    sample; the source of the FLOPs is `torch.utils.flop_counter.FlopCounterMode`."""

    model: str
    input_shape: tuple[int, int, int]
    outputs: int
    cuts: tuple[int, ...]
    tail: int  # first layer of the owner's tail, 0: none
    batch_size: int  # the batch the counts were measured at (then divided by it)
    participants: tuple[ParticipantCompute, ...]
    edges: tuple[CutTraffic, ...]

    @property
    def train_flops(self) -> float:
        """FLOPs per sample of a whole training step, every participant together."""
        return sum(p.train_flops for p in self.participants)

    @property
    def owner_flops(self) -> float:
        """The owner's FLOPs per sample of a training step (its head, and its tail if any)."""
        return sum(p.train_flops for p in self.participants if p.role != "stage")

    @property
    def owner_share(self) -> float:
        """The owner's fraction (0..1) of the training FLOPs (forward plus backward)."""
        total = self.train_flops
        return self.owner_flops / total if total else 0.0

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["participants"] = [{**asdict(p), "train_flops": p.train_flops}
                               for p in self.participants]
        doc.update(train_flops=self.train_flops, owner_flops=self.owner_flops,
                   owner_share=self.owner_share, units={"flops": "FLOPs per sample",
                                                        "bytes": "bytes per sample"},
                   source="torch.utils.flop_counter.FlopCounterMode")
        return doc


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _measure(module: nn.Module, x: torch.Tensor, *, input_grad: bool, loss: bool
             ) -> tuple[int, int, tuple[int, ...]]:
    """(forward FLOPs, backward FLOPs, output shape per sample) of one training step on batch
    `x`, as `SegmentTrainer` computes it."""
    module.train()

    def forward() -> torch.Tensor:
        inp = x.detach().requires_grad_(input_grad)
        return module(inp)

    def step() -> None:
        out = forward()
        if loss:
            labels = torch.zeros(out.shape[0], dtype=torch.long)
            nn.functional.cross_entropy(out, labels).backward()
        elif out.requires_grad:
            out.backward(torch.ones_like(out))

    with torch.no_grad():
        shape = tuple(module(x).shape[1:])
    fwd = _count(forward)
    both = _count(step)
    module.zero_grad(set_to_none=True)
    return fwd, both - fwd, shape


def compute_plan(spec: ModelSpec, cuts: tuple[int, ...], *, tail: int = 0,
                 batch_size: int = 128, trainers: list[str] | tuple[str, ...] | None = None,
                 seed: int = 0) -> ComputePlan:
    """Measure a split: the owner's head (layers before `cuts[0]`), one stage per cut (named
    after `trainers`, default "stage K"), and the owner's tail from layer `tail` (0: none).
    FLOPs are measured on a batch of `batch_size` zeros and divided by it (exact for these ops,
    whose count is linear in the batch). Pure: builds its own segments, touches no global state
    (the RNG is restored by `build_segments`)."""
    names = list(trainers) if trainers is not None else [f"stage {i + 1}" for i in
                                                         range(len(cuts))]
    if len(names) != len(cuts):
        raise ValueError(f"{len(names)} trainer names for {len(cuts)} stages")
    seg_cuts = (*cuts, tail) if tail else tuple(cuts)
    segments = build_segments(spec, seg_cuts, seed)
    bounds = (0, *seg_cuts, len(spec.layers))
    roles = ["head", *(["stage"] * len(cuts)), *(["tail"] if tail else [])]
    labels = ["owner (head)", *names, *(["owner (tail)"] if tail else [])]
    x = torch.zeros((batch_size, *spec.input_shape))
    measured, shapes = [], [tuple(spec.input_shape)]
    for i, seg in enumerate(segments):
        fwd, bwd, shape = _measure(seg, x, input_grad=i > 0, loss=i == len(segments) - 1)
        measured.append((fwd / batch_size, bwd / batch_size))
        shapes.append(shape)
        with torch.no_grad():
            x = seg(x)
    # edges: activations from segment i to i+1 (gradients back), labels to the last stage
    edges = [CutTraffic(labels[i], labels[i + 1], bounds[i + 1], "activations", shapes[i + 1],
                        FLOAT32_BYTES * prod(shapes[i + 1]), FLOAT32_BYTES * prod(shapes[i + 1]))
             for i in range(len(segments) - 1)]
    if not tail:
        edges.append(CutTraffic(labels[0], labels[-1], len(spec.layers), "labels", (),
                                LABEL_BYTES, 0))
    # the owner's head and tail are one process: traffic between them never crosses the bus
    participants = []
    for i, seg in enumerate(segments):
        me = labels[i]
        sent = sum(e.fwd_bytes for e in edges if e.sender == me) + \
            sum(e.bwd_bytes for e in edges if e.receiver == me)
        received = sum(e.fwd_bytes for e in edges if e.receiver == me) + \
            sum(e.bwd_bytes for e in edges if e.sender == me)
        participants.append(ParticipantCompute(
            me, roles[i], (bounds[i], bounds[i + 1]),
            tuple(str(layer["op"]) for layer in spec.layers[bounds[i]:bounds[i + 1]]),
            measured[i][0], measured[i][1], sum(p.numel() for p in seg.parameters()),
            sent, received))
    return ComputePlan(spec.name, tuple(spec.input_shape), spec.classes, tuple(cuts), tail,
                       batch_size, tuple(participants), tuple(edges))


def config_compute(cfg: RunConfig, input_shape: tuple[int, int, int], classes: int
                   ) -> ComputePlan:
    """`compute_plan` for a run config and its dataset's input shape (C, H, W) and classes:
    the model, cuts and owner tail the owner builds (`services/owner/setup.py`), at the run's
    batch size. Raises ConfigError for a bad model or cut."""
    spec, cuts, tail = configured_split(cfg, input_shape, classes)
    return compute_plan(spec, cuts, tail=tail, batch_size=cfg.run.batch_size,
                        trainers=list(cfg.participants.trainers), seed=cfg.run.seed)
