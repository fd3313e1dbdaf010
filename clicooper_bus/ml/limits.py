"""What a plan may ask of the wire and of a trainer: at every cut a batch of activations
(forward) and of their gradients (backward) fits the wire's largest message body
(`check_wire`), and a trainer refuses a stage that needs more memory than it allows
(`stage_memory`, `[run] trainer_memory_mb`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from clicooper_bus.errors import ConfigError, RosterError
from clicooper_bus.ml.build import SKIP_CHUNK, random_draws
from clicooper_bus.ml.spec import FLOAT_BYTES, ModelSpec, shape_str
from clicooper_bus.net.wire import DEFAULT_LIMITS
from clicooper_bus.plan import Plan


def check_wire(spec: ModelSpec, segment_cuts: tuple[int, ...], batch_size: int,
               max_body: int = DEFAULT_LIMITS.max_body) -> None:
    """That a batch of `batch_size` activations crossing each cut (forward; their gradients
    backward are as large) fits one message body of at most `max_body` bytes (the wire's
    `Limits.max_body`): otherwise the first send would fail with OversizeFrame mid-run.
    Raises ConfigError naming the cut, the bytes and the limit, with the largest batch that
    fits and the later cuts where this batch would."""
    for cut in segment_cuts:
        per_sample = math.prod(spec.shapes[cut]) * FLOAT_BYTES
        if per_sample * batch_size <= max_body:
            continue
        later = [i for i in range(cut + 1, len(spec.layers))
                 if math.prod(spec.shapes[i]) * FLOAT_BYTES * batch_size <= max_body]
        raise ConfigError(
            f"at the cut before layer {cut} ({spec.layers[cut]['op']}) a batch of {batch_size} "
            f"activations of {shape_str(spec.shapes[cut])} is {per_sample * batch_size:,} bytes "
            f"per fwd (and bwd) message, over the wire's limit of {max_body:,} bytes "
            f"(net.wire Limits.max_body): use [run] batch_size <= {max_body // per_sample}"
            + (f", or cut later, where this batch fits (layers {', '.join(map(str, later[:8]))})"
               if later else ""))


# --- memory ------------------------------------------------------------------------------------

# autograd keeps about one tensor per layer output for the backward pass (a layer's input or
# output), the backward pass holds about one gradient of that size at a time, and the forward
# output exists once: with the input and its gradient, ACT_FACTOR x the layers' outputs
ACT_FACTOR = 2
# torch's own working memory on top (convolution workspaces, the allocator's slack): measured
# peak RSS growth of a stage exceeded the estimate without it by up to 26 MiB
WORKSPACE = 32 << 20


@dataclass(frozen=True)
class StageMemory:
    """What a trainer's stage needs, in bytes, estimated from the resolved shapes before
    anything is allocated (float32 everywhere)."""

    model_params: int  # parameters of the whole model
    stage_params: int  # ... of this stage
    weights: int  # weights, gradients and Adam's two moments of this stage: 4 x params x 4 B
    activations: int  # at batch_size: inputs in flight, outputs kept for backward, gradients
    skip: int  # the buffer that draws the earlier layers' random numbers (`build_segment`)
    workspace: int = WORKSPACE  # torch's working memory

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.skip + self.workspace

    def describe(self) -> str:
        mib = 1 << 20
        return (f"{self.total / mib:,.1f} MiB: {self.stage_params:,} parameters "
                f"({self.weights / mib:,.1f} MiB with gradients and Adam state) and "
                f"{self.activations / mib:,.1f} MiB of activations; the whole model has "
                f"{self.model_params:,} parameters")


def stage_memory(spec: ModelSpec, segment_cuts: tuple[int, ...], index: int, batch_size: int,
                 in_flight: int = 1) -> StageMemory:
    """The training memory of segment `index` (0 the head, i the i-th trainer's stage) of
    `spec` cut at `segment_cuts`, with `batch_size` samples a step and `in_flight` batches
    received ahead, from the resolved shapes alone (`ModelSpec.params`, `acts`): weights +
    gradients + Adam state (4 x its parameters) + activations (its input for each batch in
    flight and its gradient, ACT_FACTOR x every layer output inside it) in float32 bytes,
    plus the skip buffer and WORKSPACE. Measured against the peak RSS growth of a stage built
    and trained for 5 steps (torch 2.13, one thread): small-cnn and resnet-8 stages at batch
    128 to 1024 and vgg-small's first stage at batch 256 took 35% to 104% of the estimate (the
    same case varies by up to 25% from run to run: the allocator)."""
    bounds = (0, *segment_cuts, len(spec.layers))
    a, b = bounds[index], bounds[index + 1]
    params = sum(spec.params[a:b])
    per_sample = math.prod(spec.shapes[a]) * (in_flight + 1) + ACT_FACTOR * sum(spec.acts[a:b])
    skip = min(sum(random_draws(la) for la in spec.layers[:a]), SKIP_CHUNK) * FLOAT_BYTES
    return StageMemory(sum(spec.params), params, 4 * params * FLOAT_BYTES,
                       per_sample * batch_size * FLOAT_BYTES, skip)


def _over_budget(spec: ModelSpec, segment_cuts: tuple[int, ...], index: int, batch_size: int,
                 in_flight: int, limit_mb: int) -> tuple[StageMemory, str | None]:
    """(stage `index`'s estimate, why it is over `limit_mb` MiB or None)."""
    need = stage_memory(spec, segment_cuts, index, batch_size, in_flight)
    if need.total <= limit_mb << 20:
        return need, None
    return need, (f"stage {index} at batch_size {batch_size} needs about {need.describe()}; "
                  f"the limit is [run] trainer_memory_mb = {limit_mb} MiB: a smaller batch_size "
                  f"or a shorter stage (more trainers, other cuts) needs less")


def check_stage_memory(spec: ModelSpec, plan: Plan, index: int, limit_mb: int) -> StageMemory:
    """A trainer's budget: the memory stage `index` (1: the first trainer) of `plan` needs
    (`stage_memory`) against `limit_mb` MiB ([run] trainer_memory_mb). Returns the estimate.
    Raises RosterError naming the stage, the estimate and the limit when it is over."""
    need, why = _over_budget(spec, plan.segment_cuts, index, plan.batch_size, plan.in_flight,
                             limit_mb)
    if why:
        raise RosterError(f"the roster's plan needs more memory than this trainer allows: {why} "
                          f"(ask the owner, or raise the limit in this trainer's config)")
    return need
