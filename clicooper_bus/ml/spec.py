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
stages start from the same weights everywhere (`ml.build`). A trainer builds only its own stage
(`build_segment`): the random numbers of the layers before it are drawn and dropped in chunks
(torch's CPU `uniform_` draws one number per element, so the stream is the same), never
allocated as layers.

Limits (a trainer runs whatever spec its owner signs, so a careless or hostile one must be an
error, not a crash): residuals nest at most `plan.MAX_NESTING` deep, a model has at most
`plan.MAX_LAYERS` layers (nested ones included) and `MAX_PARAMS` parameters, an integer
parameter is at most `MAX_INT_PARAM`, and at every cut a batch of activations (forward) and of
their gradients (backward) must fit the wire's largest message body (`net.wire.Limits.max_body`,
`ml.limits.check_wire`). A trainer also refuses a stage that needs more memory than it allows
(`ml.limits.stage_memory`, `[run] trainer_memory_mb`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clicooper_bus.errors import ConfigError
from clicooper_bus.plan import MAX_LAYERS, MAX_NESTING

MAX_INT_PARAM = 1 << 24  # an integer layer parameter (out, kernel, stride, ...) at most
MAX_PARAMS = 1 << 28  # parameters of a whole model at most (1 GiB of float32 weights)
FLOAT_BYTES = 4  # every weight, activation and gradient is float32

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
