"""Models: the built-in specs, where a run cuts them, and the one import point for the rest.

The pieces, each its own module:
- `ml.spec`: a model as data (`ModelSpec`), the ops and how a spec is resolved and checked;
- `ml.limits`: what a plan may ask of the wire (`check_wire`) and of a trainer's memory
  (`stage_memory`);
- `ml.build`: the segments built from a spec with deterministic weights, and read back;
- here: the built-in models (`clicooper_bus/ml/zoo/`), the cuts (`default_cuts`,
  `check_cuts`, `configured_split`, what `clicooper run`, `clicooper plan` and the owner take
  a run's split from) and `plan_spec` (what a signed plan describes).
"""

from __future__ import annotations

import math
from typing import Any

from clicooper_bus.config import RunConfig
from clicooper_bus.errors import ConfigError
from clicooper_bus.ml.build import (  # noqa: F401  (the package's import point)
    WeightsMismatch,
    assemble,
    build_segment,
    build_segments,
    segments_from_state_dict,
    state_dict_with_prefix,
)
from clicooper_bus.ml.limits import (  # noqa: F401
    StageMemory,
    _over_budget,
    check_stage_memory,
    check_wire,
    stage_memory,
)
from clicooper_bus.ml.spec import (  # noqa: F401
    FLOAT_BYTES,
    MAX_INT_PARAM,
    MAX_PARAMS,
    Layer,
    ModelSpec,
    resolve_layers,
    resolve_spec,
    shape_str,
)
from clicooper_bus.model_spec import ZOO, builtin_models, read_spec_file
from clicooper_bus.plan import Plan


def builtin_spec(name: str) -> dict[str, Any]:
    """A built-in spec's data (`read_spec_file` of `clicooper_bus/ml/zoo/NAME.toml`). Raises
    ConfigError for an unknown name."""
    if name not in builtin_models():
        raise ConfigError(f"model {name!r} is not one of the built-in models "
                          f"{', '.join(builtin_models())}")
    return read_spec_file(ZOO / f"{name}.toml")


def model_spec(name: str, input_shape: tuple[int, int, int], classes: int) -> ModelSpec:
    """The built-in model `name` resolved on `input_shape` (C, H, W) with `classes` outputs,
    at its default cut. Raises ConfigError for an unknown name or a shape it does not fit."""
    doc = builtin_spec(name)
    return resolve_spec(name, doc["layers"], input_shape, classes, doc["default_cut"] or 1)


# --- cuts --------------------------------------------------------------------------------------

def tail_start(spec: ModelSpec) -> int:
    """Where an owner's tail (U-shaped split) starts: the model's last layer."""
    return len(spec.layers) - 1


def default_cuts(spec: ModelSpec, stages: int, tail: int = 0) -> tuple[int, ...]:
    """Cut after the head, then split the remaining layers (up to the owner's tail, if any)
    into `stages` near-equal runs."""
    rest = (tail or len(spec.layers)) - spec.head_end
    if not 1 <= stages <= rest:
        raise ConfigError(f"model {spec.name!r} can be cut into 1 to {rest} stages after its "
                          f"head (default cut {spec.head_end}), not {stages}")
    sizes = [rest // stages + (i < rest % stages) for i in range(stages)]
    cuts, at = [], spec.head_end
    for size in sizes[:-1]:
        at += size
        cuts.append(at)
    return (spec.head_end, *cuts)


def check_cuts(spec: ModelSpec, cuts: tuple[int, ...], stages: int,
               tail: int = 0) -> tuple[int, ...]:
    """Cuts are the first top-level layer index of each stage (a residual block is one
    layer): strictly increasing, inside the model (before the owner's tail, if any)."""
    cuts = tuple(cuts)
    end = tail or len(spec.layers)
    if len(cuts) != stages or list(cuts) != sorted(set(cuts)) or not (
            0 < cuts[0] and cuts[-1] < end):
        raise ConfigError(f"cuts {list(cuts)} must be {stages} strictly increasing top-level "
                          f"layer indices in 1..{end - 1} (one per stage; model "
                          f"{spec.name!r} has {len(spec.layers)} layers"
                          f"{', the last kept by the owner' if tail else ''})")
    return cuts


def configured_split(cfg: RunConfig, input_shape: tuple[int, ...], classes: int
                     ) -> tuple[ModelSpec, tuple[int, ...], int]:
    """What a run config asks for on a dataset of `input_shape` (C, H, W) and `classes`: the
    resolved model spec (with `label_gamma` outputs per class), the trainers' cuts, and the
    first layer of the owner's tail (0: none). The one place the owner, `clicooper run`'s
    checks and `clicooper plan` take it from. Raises ConfigError, prefixed `[model]`, for a
    bad model, layer, shape or cut, a spec over the limits, activations at a cut too large for
    the wire at [run] batch_size (`check_wire`), or a stage over [run] trainer_memory_mb."""
    pv, m, stages = cfg.privacy, cfg.model, len(cfg.participants.trainers)
    outputs = classes * pv.label_gamma
    try:
        if m.layers:
            spec = resolve_spec(m.name, m.layers, tuple(input_shape), outputs,
                                m.default_cut or 1)
        else:
            doc = builtin_spec(m.name)
            spec = resolve_spec(m.name, doc["layers"], tuple(input_shape), outputs,
                                m.default_cut or doc["default_cut"] or 1)
        tail = tail_start(spec) if pv.owner_tail else 0
        cuts = check_cuts(spec, tuple(m.cuts), stages, tail) if m.cuts \
            else default_cuts(spec, stages, tail)
        seg_cuts = (*cuts, tail) if tail else cuts
        check_wire(spec, seg_cuts, cfg.run.batch_size)
        _check_release(pv.mechanism, spec, cuts[0])
        for index in range(1, stages + 1):  # what trainers started from this config allow
            why = _over_budget(spec, seg_cuts, index, cfg.run.batch_size, cfg.run.in_flight,
                               cfg.run.trainer_memory_mb)[1]
            if why:
                raise ConfigError(f"a trainer would refuse this plan: {why}")
    except ConfigError as exc:
        raise ConfigError(f"[model] on {shape_str(input_shape)} images, {outputs} outputs: "
                          f"{exc}") from None
    return spec, cuts, tail


def _check_release(mechanism: str, spec: ModelSpec, cut: int) -> None:
    """The privacy mechanism can release the head's activations (`lattice.check_dim`)."""
    from clicooper_bus.ml.privacy.lattice import check_dim

    try:
        check_dim(mechanism, math.prod(spec.shapes[cut]))
    except ValueError as exc:
        raise ConfigError(f"[privacy] at cut {cut}: {exc}") from None


def plan_spec(plan: Plan) -> ModelSpec:
    """The model spec a signed plan describes (what every trainer builds its stage from): its
    resolved layers, re-resolved on its input shape (so checked). A plan from before specs were
    data (no layers) names a built-in model. Raises ConfigError if the layers do not build, are
    over the limits, or a batch of activations at a cut does not fit the wire (`check_wire`)."""
    if plan.layers:
        spec = resolve_spec(plan.model, list(plan.layers), plan.input_shape, plan.n_outputs,
                            plan.cuts[0] if plan.cuts else 1)
    else:
        spec = model_spec(plan.model, plan.input_shape, plan.n_outputs)
    if plan.segment_cuts[-1] >= len(spec.layers):
        raise ConfigError(f"cuts {list(plan.segment_cuts)} do not fit model {spec.name!r} of "
                          f"{len(spec.layers)} layers")
    check_wire(spec, plan.segment_cuts, plan.batch_size)
    return spec
