"""Model specs as data, cut at top-level layer boundaries into the owner's head plus K trainer
stages (and, U-shaped, the owner's tail).

A model is a declarative spec: a list of layer tables, each an `op` and named parameters, in
TOML (the built-ins are files in `clicooper_bus/ml/zoo/`; a run config names one, a file of
its own, or lists the layers inline: `clicooper_bus.config`). `resolve_spec` checks a spec
against a dataset's shape and makes every parameter explicit: input channels and features are
inferred by running each layer on meta tensors (torch's own shape rules, no hand formulas), and
`out = "classes"` becomes the model's output units. The resolved layer list goes into the
signed plan (`Plan.layers`) and its digest, with the cuts, into the roster, so a trainer builds
its stage from the plan alone: nothing is looked up by name and no owner code runs.

Ops (per-sample input shape -> output shape; defaults in brackets):

    conv2d           C x H x W -> out x H' x W'   out, kernel, stride [1], padding [0],
                                                  groups [1], bias [true]; `in` inferred
    linear           F -> out                     out, bias [true]; `in` inferred (needs a
                                                  flat input: flatten first)
    relu, gelu       any -> same
    maxpool, avgpool C x H x W -> C x H' x W'     kernel, stride [kernel], padding [0]
    adaptive_avgpool C x H x W -> C x size x size size [1]
    flatten          any -> features
    dropout          any -> same                  p [0.5]
    groupnorm        C x ... -> same              groups (must divide C), eps [1e-5],
                                                  affine [true]; `channels` inferred
    layernorm        any -> same                  eps [1e-5], affine [true]: over all of a
                                                  sample's values; `shape` inferred
    residual         x -> body(x) + shortcut(x)   body (layers), shortcut (layers) [[]:
                                                  identity]; both must give the same shape

Normalisation is per sample only (GroupNorm, LayerNorm); there is no batch norm: its output
for one sample depends on the other samples of its batch, so an owner's release would depend
on its batch (breaking per-sample privacy accounting: a sample's clipped, noised activation
would leak the statistics of the others), and a trainer's evaluation would differ from the
delivered model's.

Initialisation is deterministic: the whole model is initialised from the run seed in one
process-independent order (layer by layer; a residual's body, then its shortcut), so head and
stages start from the same weights everywhere. A trainer builds only its own stage
(`build_segment`): the random numbers of the layers before it are drawn and dropped in chunks
(torch's CPU `uniform_` draws one number per element, so the stream is the same), never
allocated as layers.

Limits (a trainer runs whatever spec its owner signs, so a careless or hostile one must be an
error, not a crash): residuals nest at most `plan.MAX_NESTING` deep, a model has at most
`plan.MAX_LAYERS` layers (nested ones included) and `MAX_PARAMS` parameters, an integer
parameter is at most `MAX_INT_PARAM`, and at every cut a batch of activations (forward) and of
their gradients (backward) must fit the wire's largest message body (`net.wire.Limits.max_body`,
`check_wire`). A trainer also refuses a stage that needs more memory than it allows
(`stage_memory`, `[run] trainer_memory_mb`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clicooper_bus.config import ZOO, RunConfig, builtin_models, read_spec_file
from clicooper_bus.errors import ConfigError, RosterError
from clicooper_bus.net.wire import DEFAULT_LIMITS
from clicooper_bus.plan import MAX_LAYERS, MAX_NESTING, Plan

MAX_INT_PARAM = 1 << 24  # an integer layer parameter (out, kernel, stride, ...) at most
MAX_PARAMS = 1 << 28  # parameters of a whole model at most (1 GiB of float32 weights)
FLOAT_BYTES = 4  # every weight, activation and gradient is float32
SKIP_CHUNK = 1 << 20  # random numbers drawn at a time when skipping layers (4 MiB)

Layer = dict[str, Any]  # a resolved layer: {"op": ..., every parameter explicit, JSON values}

_REQUIRED = object()
# op -> {parameter: (kind, default)}; kinds: int (>= 1), int0 (>= 0), bool, prob (0 <= p < 1),
# pos (a float > 0), layers (a list of layer tables), out (an int >= 1 or "classes")
_PARAMS: dict[str, dict[str, tuple[str, Any]]] = {
    "conv2d": {"out": ("out", _REQUIRED), "kernel": ("int", _REQUIRED), "stride": ("int", 1),
               "padding": ("int0", 0), "groups": ("int", 1), "bias": ("bool", True)},
    "linear": {"out": ("out", _REQUIRED), "bias": ("bool", True)},
    "relu": {}, "gelu": {}, "flatten": {},
    "maxpool": {"kernel": ("int", _REQUIRED), "stride": ("int", None), "padding": ("int0", 0)},
    "avgpool": {"kernel": ("int", _REQUIRED), "stride": ("int", None), "padding": ("int0", 0)},
    "adaptive_avgpool": {"size": ("int", 1)},
    "dropout": {"p": ("prob", 0.5)},
    "groupnorm": {"groups": ("int", _REQUIRED), "eps": ("pos", 1e-5), "affine": ("bool", True)},
    "layernorm": {"eps": ("pos", 1e-5), "affine": ("bool", True)},
    "residual": {"body": ("layers", _REQUIRED), "shortcut": ("layers", [])},
}
# what shape propagation fills in (and checks, when a resolved spec gives it)
_INFERRED = {"conv2d": "in", "linear": "in", "groupnorm": "channels", "layernorm": "shape"}
_RANK = {"conv2d": 3, "maxpool": 3, "avgpool": 3, "adaptive_avgpool": 3, "linear": 1}
_KINDS = {"int": f"an integer in 1..{MAX_INT_PARAM}", "int0": f"an integer in 0..{MAX_INT_PARAM}",
          "bool": "true or false", "prob": "a number in [0, 1)", "pos": "a finite number > 0",
          "layers": "a non-empty list of layer tables",
          "out": f'an integer in 1..{MAX_INT_PARAM} or "classes"'}


def shape_str(shape: tuple[int, ...] | list[int]) -> str:
    """A per-sample shape as people write it: 32x7x7, 1568."""
    return "x".join(str(v) for v in shape)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: `layers` are what `resolve_spec` returns (every parameter explicit).
    `classes` is the number of output units (classes x label_gamma); `head_end` the default
    cut (the first layer of trainer 1); `shapes[i]` the per-sample input shape of top-level
    layer i (`shapes[-1]`: the output); `params[i]` its parameters and `acts[i]` the values
    per sample of every output inside it (a residual's body, shortcut and sum): what memory
    estimates use. shapes, params and acts are not part of the digest (they follow from the
    rest)."""

    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    classes: int
    layers: tuple[Layer, ...]
    head_end: int  # default cut between the owner's head and the first stage
    shapes: tuple[tuple[int, ...], ...] = field(default=(), compare=False)
    params: tuple[int, ...] = field(default=(), compare=False)
    acts: tuple[int, ...] = field(default=(), compare=False)

    def to_doc(self) -> dict[str, Any]:
        """The spec as JSON-ready data (what a model file's metadata carries)."""
        return {"name": self.name, "input_shape": list(self.input_shape),
                "classes": self.classes, "layers": list(self.layers), "head_end": self.head_end}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ModelSpec:
        """`to_doc`'s inverse, re-resolved (so checked). Raises ConfigError, KeyError or
        TypeError for a malformed document."""
        return resolve_spec(str(doc["name"]), doc["layers"], tuple(doc["input_shape"]),
                            int(doc["classes"]), int(doc["head_end"]))

    def digest(self, cuts: tuple[int, ...]) -> str:
        """SHA-256 over the resolved spec and its cuts: what the roster commits to."""
        doc = {"name": self.name, "input_shape": list(self.input_shape), "classes": self.classes,
               "layers": list(self.layers), "cuts": list(cuts)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def legacy_digest(self, cuts: tuple[int, ...]) -> str | None:
        """The digest rosters carried before specs were data (layers as tuples: conv2d in, out,
        kernel, padding; linear in, out; maxpool kernel), for runs made then; None if a layer
        had no such form."""
        old = []
        for la in self.layers:
            op = la["op"]
            if op == "conv2d" and (la["stride"], la["groups"], la["bias"]) == (1, 1, True):
                old.append([op, la["in"], la["out"], la["kernel"], la["padding"]])
            elif op == "linear" and la["bias"]:
                old.append([op, la["in"], la["out"]])
            elif op == "maxpool" and (la["stride"], la["padding"]) == (la["kernel"], 0):
                old.append([op, la["kernel"]])
            elif op in ("relu", "flatten"):
                old.append([op])
            else:
                return None
        doc = {"name": self.name, "input_shape": list(self.input_shape), "classes": self.classes,
               "layers": old, "cuts": list(cuts)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# --- resolving a spec --------------------------------------------------------------------------

def _param(label: str, key: str, kind: str, value: Any, outputs: int) -> Any:
    small = type(value) is int and value <= MAX_INT_PARAM
    ok = {"int": small and value >= 1, "int0": small and value >= 0,
          "bool": type(value) is bool,
          "prob": type(value) in (int, float) and 0 <= value < 1,
          "pos": type(value) in (int, float) and math.isfinite(value) and value > 0,
          "layers": isinstance(value, list | tuple) and len(value) > 0,
          "out": value == "classes" or small and value >= 1}[kind]
    if key == "shortcut" and isinstance(value, list | tuple):
        ok = True  # an empty shortcut is the identity
    if not ok:
        raise ConfigError(f"{label}: {key} must be {_KINDS[kind]}, got {value!r}")
    if kind == "out" and value == "classes":
        return outputs
    return float(value) if kind in ("prob", "pos") else value


def _params(raw: Any, name: str, outputs: int) -> Layer:
    """A layer table checked against its op's parameters, defaults filled in."""
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
        raise ConfigError(f"{name}: a layer is a table with op = one of {', '.join(_PARAMS)}; "
                          f"got {raw!r:.80}")
    op = raw["op"]
    if op not in _PARAMS:
        raise ConfigError(f"{name}: unknown op {op!r:.40}; ops are {', '.join(_PARAMS)}")
    label, schema = f"{name} ({op})", _PARAMS[op]
    allowed = [*schema, *([_INFERRED[op]] if op in _INFERRED else [])]
    unknown = sorted(set(raw) - {"op", *allowed})
    if unknown:
        raise ConfigError(f"{label}: unknown parameter {', '.join(unknown)}; {op} takes "
                          f"{', '.join(schema) or 'no parameters'}")
    layer: Layer = {"op": op}
    for key, (kind, default) in schema.items():
        if key not in raw:
            if default is _REQUIRED:
                raise ConfigError(f"{label}: missing parameter {key} ({_KINDS[kind]})")
            if default is None:  # a pool's stride: its kernel
                layer[key] = layer["kernel"]
                continue
            layer[key] = list(default) if isinstance(default, list) else default
        else:
            layer[key] = _param(label, key, kind, raw[key], outputs)
    if op in _INFERRED and _INFERRED[op] in raw:
        layer[_INFERRED[op]] = raw[_INFERRED[op]]  # checked against the inferred value
    return layer


def _module(layer: Layer) -> nn.Module:
    """The torch module of a resolved layer (residual: its body and shortcut too)."""
    op = layer["op"]
    if op == "conv2d":
        return nn.Conv2d(layer["in"], layer["out"], layer["kernel"], stride=layer["stride"],
                         padding=layer["padding"], groups=layer["groups"], bias=layer["bias"])
    if op == "linear":
        return nn.Linear(layer["in"], layer["out"], bias=layer["bias"])
    if op in ("maxpool", "avgpool"):
        pool = nn.MaxPool2d if op == "maxpool" else nn.AvgPool2d
        return pool(layer["kernel"], layer["stride"], layer["padding"])
    if op == "adaptive_avgpool":
        return nn.AdaptiveAvgPool2d(layer["size"])
    if op == "dropout":
        return nn.Dropout(layer["p"])
    if op == "groupnorm":
        return nn.GroupNorm(layer["groups"], layer["channels"], layer["eps"], layer["affine"])
    if op == "layernorm":
        return nn.LayerNorm(layer["shape"], layer["eps"], elementwise_affine=layer["affine"])
    if op == "residual":
        return Residual(nn.Sequential(*map(_module, layer["body"])),
                        nn.Sequential(*map(_module, layer["shortcut"])))
    simple = {"relu": nn.ReLU, "gelu": nn.GELU, "flatten": nn.Flatten}
    if op in simple:
        return simple[op]()
    raise ConfigError(f"unknown layer op {op!r}")


class Residual(nn.Module):
    """x -> body(x) + shortcut(x); an empty shortcut is the identity."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Sequential):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _infer(layer: Layer, shape: tuple[int, ...], label: str) -> None:
    """Fill in (or check) what the layer's input shape determines."""
    op = layer["op"]
    rank = _RANK.get(op)
    if rank == 3 and len(shape) != 3:
        raise ConfigError(f"{label} takes C x H x W feature maps, but its input is "
                          f"{shape_str(shape)}")
    if rank == 1 and len(shape) != 1:
        raise ConfigError(f"{label} takes a flat input (features), but its input is "
                          f"{shape_str(shape)}: put {{ op = \"flatten\" }} before it")
    key = _INFERRED.get(op)
    if key is None:
        return
    value = list(shape) if key == "shape" else shape[0]
    given = layer.get(key)
    if given is not None and given != value:
        raise ConfigError(f"{label}: {key} = {given!r}, but its input is {shape_str(shape)} "
                          f"({key} {value!r})")
    layer[key] = value


def _forward_shape(layer: Layer, shape: tuple[int, ...], label: str
                   ) -> tuple[tuple[int, ...], int]:
    """The layer's per-sample output shape and its number of parameters, from torch itself
    on meta tensors (no memory, no arithmetic, no random numbers drawn)."""
    try:
        with torch.device("meta"):
            module = _module(layer)
            out = module(torch.empty((2, *shape)))
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{label} does not fit its input {shape_str(shape)}: {reason}") from None
    return tuple(out.shape[1:]), sum(p.numel() for p in module.parameters())


@dataclass
class _Tally:
    """What `resolve_layers` counts as it goes: layers in all, and per top-level layer its
    parameters and per-sample activation values."""

    layers: int = 0
    params: list[int] = field(default_factory=list)
    acts: list[int] = field(default_factory=list)


def resolve_layers(layers: list | tuple, shape: tuple[int, ...], outputs: int,
                   where: str = "", depth: int = 0, tally: _Tally | None = None
                   ) -> tuple[list[Layer], list[tuple[int, ...]]]:
    """Check `layers` on a per-sample input `shape` and make every parameter explicit.
    Returns (resolved layers, the per-sample shapes: before each layer, then the output).
    `depth`: residuals around these layers; `tally` (if given) gets every layer counted and,
    for these layers, their parameters and activation values appended. Raises ConfigError
    naming the layer (`layer 7 (linear)`, `layer 4.body.1 (conv2d)`) and the shapes involved,
    or for residuals nested more than MAX_NESTING deep or more than MAX_LAYERS layers."""
    tally = tally if tally is not None else _Tally()
    if not isinstance(layers, list | tuple):
        raise ConfigError(f"layers {where or ''}must be a list of layer tables, got "
                          f"{type(layers).__name__}")
    resolved, shapes = [], [tuple(shape)]
    for i, raw in enumerate(layers):
        name = f"layer {where}{i}"
        tally.layers += 1
        if tally.layers > MAX_LAYERS:
            raise ConfigError(f"{name}: the model has more than {MAX_LAYERS} layers (those "
                              f"inside residuals included); the limit is {MAX_LAYERS}")
        layer = _params(raw, name, outputs)
        label = f"{name} ({layer['op']})"
        if layer["op"] == "residual":
            if depth + 1 > MAX_NESTING:
                raise ConfigError(f"{label}: residuals nest more than {MAX_NESTING} deep here; "
                                  f"the limit is {MAX_NESTING} (flatten the nesting: a "
                                  f"residual's body may hold residuals, up to {MAX_NESTING} "
                                  f"levels)")
            inner = _Tally(tally.layers)
            body, bshapes = resolve_layers(layer["body"], shape, outputs, f"{where}{i}.body.",
                                           depth + 1, inner)
            short, sshapes = resolve_layers(layer["shortcut"], shape, outputs,
                                            f"{where}{i}.shortcut.", depth + 1, inner)
            tally.layers = inner.layers
            n_params = sum(inner.params)
            n_acts = sum(inner.acts) + math.prod(bshapes[-1])
            if bshapes[-1] != sshapes[-1]:
                raise ConfigError(
                    f"{label}: its body turns {shape_str(shape)} into {shape_str(bshapes[-1])} "
                    f"but its shortcut into {shape_str(sshapes[-1])}: they are added, so they "
                    f"must match (a shortcut of a 1x1 conv2d with the body's out and stride "
                    f"fits)")
            layer.update(body=body, shortcut=short)
            shape = bshapes[-1]
        else:
            _infer(layer, shape, label)
            shape, n_params = _forward_shape(layer, shape, label)
            n_acts = math.prod(shape)
        resolved.append(layer)
        shapes.append(shape)
        tally.params.append(n_params)
        tally.acts.append(n_acts)
    return resolved, shapes


def resolve_spec(name: str, layers: list | tuple, input_shape: tuple[int, ...], outputs: int,
                 default_cut: int) -> ModelSpec:
    """The resolved spec of `layers` on images of `input_shape` (C, H, W) with `outputs`
    output units; `default_cut` is the first layer of trainer 1 when a config gives no cuts.
    Raises ConfigError for an unknown op, a bad, missing or mistyped parameter, a layer that
    does not fit its input, an output that is not one value per class, a bad default cut, or
    a spec over the limits (nesting, layers, parameters: see the module's docstring)."""
    if not layers:
        raise ConfigError(f"model {name!r} has no layers")
    tally = _Tally()
    try:
        resolved, shapes = resolve_layers(layers, tuple(input_shape), outputs, tally=tally)
    except RecursionError:  # only if the interpreter's stack is smaller than MAX_NESTING needs
        raise ConfigError(f"model {name!r} nests too deep to resolve") from None
    total = sum(tally.params)
    if total > MAX_PARAMS:
        big = max(range(len(resolved)), key=lambda i: tally.params[i])
        raise ConfigError(f"model {name!r} has {total:,} parameters, over the limit of "
                          f"{MAX_PARAMS:,}; its largest layer is layer {big} "
                          f"({resolved[big]['op']}, {tally.params[big]:,} parameters)")
    if shapes[-1] != (outputs,):
        raise ConfigError(f"model {name!r}: its output is {shape_str(shapes[-1])} per sample, "
                          f"but must be {outputs} (one value per output class): end with "
                          f"{{ op = \"linear\", out = \"classes\" }} (after a flatten)")
    if not 1 <= default_cut < len(resolved):
        raise ConfigError(f"model {name!r}: default_cut {default_cut} must be a top-level layer "
                          f"index in 1..{len(resolved) - 1} (the first layer of trainer 1)")
    return ModelSpec(name, tuple(input_shape), outputs, tuple(resolved), default_cut,
                     tuple(shapes), tuple(tally.params), tuple(tally.acts))


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
    skip = min(sum(_draws(la) for la in spec.layers[:a]), SKIP_CHUNK) * FLOAT_BYTES
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


# --- building ----------------------------------------------------------------------------------

def _draws(layer: Layer) -> int:
    """How many random numbers building `layer` draws from torch's generator: its conv2d and
    linear layers' parameters (weights by kaiming_uniform_, biases by uniform_: one draw per
    element); the norms' parameters are ones and zeros."""
    with torch.device("meta"):
        module = _module(layer)
    return sum(p.numel() for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)
               for p in m.parameters(recurse=False))


def _skip_draws(n: int) -> None:
    """Draw and drop `n` float32 uniform numbers from torch's generator, SKIP_CHUNK at a time:
    what building layers with `n` such parameters draws (CPU `uniform_` takes one number per
    element, whatever the tensor's size: tests/test_model_specs.py checks it)."""
    if n <= 0:
        return
    buf = torch.empty(min(n, SKIP_CHUNK))
    while n > 0:
        k = min(n, SKIP_CHUNK)
        buf[:k].uniform_()
        n -= k


def build_segment(spec: ModelSpec, cuts: tuple[int, ...], seed: int, index: int
                  ) -> nn.Sequential:
    """Segment `index` of `build_segments(spec, cuts, seed)` (0 the head, i the i-th stage),
    with the same weights, without building the others: the layers before it only have their
    random numbers drawn (`_skip_draws`), those after it are not needed. Peak memory: the
    segment plus a SKIP_CHUNK buffer."""
    bounds = (0, *cuts, len(spec.layers))
    a, b = bounds[index], bounds[index + 1]
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        _skip_draws(sum(_draws(layer) for layer in spec.layers[:a]))
        return nn.Sequential(*(_module(layer) for layer in spec.layers[a:b]))
    finally:
        torch.random.set_rng_state(gen_state)


def build_segments(spec: ModelSpec, cuts: tuple[int, ...], seed: int) -> list[nn.Sequential]:
    """[head, stage 1, ..., stage K], initialised from `seed` identically in every process
    (the whole model is built in layer order, then cut at the top-level indices `cuts`)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        layers = [_module(layer) for layer in spec.layers]
    finally:
        torch.random.set_rng_state(gen_state)
    bounds = (0, *cuts, len(layers))
    return [nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def assemble(segments: list[nn.Sequential]) -> nn.Sequential:
    """The whole model, head first: what the owner delivers."""
    return nn.Sequential(*(layer for seg in segments for layer in seg))


def state_dict_with_prefix(segments: list[nn.Sequential]) -> dict[str, torch.Tensor]:
    """Tensors of the assembled model keyed `seg<i>.<name>`, for safetensors files."""
    return {f"seg{i}.{k}": v.detach().contiguous() for i, seg in enumerate(segments)
            for k, v in seg.state_dict().items()}


class WeightsMismatch(ConfigError, RuntimeError):
    """Tensors that do not fit a spec (`segments_from_state_dict`). Also a RuntimeError, as
    torch's `load_state_dict` errors were, so callers that wrap those keep naming the file."""


def segments_from_state_dict(spec: ModelSpec, cuts: tuple[int, ...], seed: int,
                             weights: dict[str, torch.Tensor]) -> list[nn.Sequential]:
    """The inverse of `state_dict_with_prefix`: segments built from the plan on the meta
    device (nothing allocated, no random numbers drawn: `seed` is not needed), every tensor's
    name, dtype and shape compared with `weights` first, then `weights` themselves taken as
    the parameters; in eval mode. Raises WeightsMismatch naming a missing, unexpected or
    misshapen tensor."""
    del seed  # the weights are the file's: nothing is initialised
    with torch.device("meta"):
        layers = [_module(layer) for layer in spec.layers]
    bounds = (0, *cuts, len(layers))
    segments = [nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    want = {f"seg{i}.{k}": tuple(v.shape) for i, seg in enumerate(segments)
            for k, v in seg.state_dict().items()}
    missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
    if missing or extra:
        raise WeightsMismatch(
            "the tensors do not match the spec: "
            + "; ".join(f"{what} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                        for what, names in (("missing", missing), ("unexpected", extra))
                        if names))
    for key, shape in want.items():
        got = weights[key]
        if tuple(got.shape) != shape or got.dtype != torch.float32:
            raise WeightsMismatch(f"tensor {key} is {got.dtype} {shape_str(tuple(got.shape))}, but "
                              f"the spec makes it torch.float32 {shape_str(shape)}")
    for i, seg in enumerate(segments):
        prefix = f"seg{i}."
        seg.load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                             if k.startswith(prefix)}, strict=True, assign=True)
        seg.eval()
    return segments


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
