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

Initialisation is deterministic: the whole model is built from the run seed in one
process-independent order (layer by layer; a residual's body, then its shortcut), and each
process keeps only its own segment, so head and stages start from the same weights everywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clicooper_bus.config import ZOO, RunConfig, builtin_models, read_spec_file
from clicooper_bus.errors import ConfigError
from clicooper_bus.plan import Plan

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
_KINDS = {"int": "an integer >= 1", "int0": "an integer >= 0", "bool": "true or false",
          "prob": "a number in [0, 1)", "pos": "a number > 0",
          "layers": "a non-empty list of layer tables", "out": 'an integer >= 1 or "classes"'}


def shape_str(shape: tuple[int, ...] | list[int]) -> str:
    """A per-sample shape as people write it: 32x7x7, 1568."""
    return "x".join(str(v) for v in shape)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: `layers` are what `resolve_spec` returns (every parameter explicit).
    `classes` is the number of output units (classes x label_gamma); `head_end` the default
    cut (the first layer of trainer 1); `shapes[i]` the per-sample input shape of top-level
    layer i (`shapes[-1]`: the output), not part of the digest (it follows from the rest)."""

    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    classes: int
    layers: tuple[Layer, ...]
    head_end: int  # default cut between the owner's head and the first stage
    shapes: tuple[tuple[int, ...], ...] = field(default=(), compare=False)

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
    ok = {"int": type(value) is int and value >= 1, "int0": type(value) is int and value >= 0,
          "bool": type(value) is bool,
          "prob": type(value) in (int, float) and 0 <= value < 1,
          "pos": type(value) in (int, float) and value > 0,
          "layers": isinstance(value, list | tuple) and len(value) > 0,
          "out": value == "classes" or type(value) is int and value >= 1}[kind]
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
                          f"got {raw!r}")
    op = raw["op"]
    if op not in _PARAMS:
        raise ConfigError(f"{name}: unknown op {op!r}; ops are {', '.join(_PARAMS)}")
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


def _forward_shape(layer: Layer, shape: tuple[int, ...], label: str) -> tuple[int, ...]:
    """The layer's per-sample output shape, from torch itself on meta tensors (no memory, no
    arithmetic, no random numbers drawn)."""
    try:
        with torch.device("meta"):
            module = _module(layer)
            out = module(torch.empty((2, *shape)))
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{label} does not fit its input {shape_str(shape)}: {reason}") from None
    return tuple(out.shape[1:])


def resolve_layers(layers: list | tuple, shape: tuple[int, ...], outputs: int,
                   where: str = "") -> tuple[list[Layer], list[tuple[int, ...]]]:
    """Check `layers` on a per-sample input `shape` and make every parameter explicit.
    Returns (resolved layers, the per-sample shapes: before each layer, then the output).
    Raises ConfigError naming the layer (`layer 7 (linear)`, `layer 4.body.1 (conv2d)`) and
    the shapes involved."""
    resolved, shapes = [], [tuple(shape)]
    for i, raw in enumerate(layers):
        name = f"layer {where}{i}"
        layer = _params(raw, name, outputs)
        label = f"{name} ({layer['op']})"
        if layer["op"] == "residual":
            body, bshapes = resolve_layers(layer["body"], shape, outputs, f"{where}{i}.body.")
            short, sshapes = resolve_layers(layer["shortcut"], shape, outputs,
                                            f"{where}{i}.shortcut.")
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
            shape = _forward_shape(layer, shape, label)
        resolved.append(layer)
        shapes.append(shape)
    return resolved, shapes


def resolve_spec(name: str, layers: list | tuple, input_shape: tuple[int, ...], outputs: int,
                 default_cut: int) -> ModelSpec:
    """The resolved spec of `layers` on images of `input_shape` (C, H, W) with `outputs`
    output units; `default_cut` is the first layer of trainer 1 when a config gives no cuts.
    Raises ConfigError for an unknown op, a bad, missing or mistyped parameter, a layer that
    does not fit its input, an output that is not one value per class, or a bad default cut."""
    if not layers:
        raise ConfigError(f"model {name!r} has no layers")
    resolved, shapes = resolve_layers(layers, tuple(input_shape), outputs)
    if shapes[-1] != (outputs,):
        raise ConfigError(f"model {name!r}: its output is {shape_str(shapes[-1])} per sample, "
                          f"but must be {outputs} (one value per output class): end with "
                          f"{{ op = \"linear\", out = \"classes\" }} (after a flatten)")
    if not 1 <= default_cut < len(resolved):
        raise ConfigError(f"model {name!r}: default_cut {default_cut} must be a top-level layer "
                          f"index in 1..{len(resolved) - 1} (the first layer of trainer 1)")
    return ModelSpec(name, tuple(input_shape), outputs, tuple(resolved), default_cut,
                     tuple(shapes))


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
    bad model, layer, shape or cut."""
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
    except ConfigError as exc:
        raise ConfigError(f"[model] on {shape_str(input_shape)} images, {outputs} outputs: "
                          f"{exc}") from None
    return spec, cuts, tail


# --- building ----------------------------------------------------------------------------------

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


def segments_from_state_dict(spec: ModelSpec, cuts: tuple[int, ...], seed: int,
                             weights: dict[str, torch.Tensor]) -> list[nn.Sequential]:
    """The inverse of `state_dict_with_prefix`: segments built from the plan, loaded strictly
    (a missing or extra tensor, or a wrong shape, raises RuntimeError), in eval mode."""
    segments = build_segments(spec, cuts, seed)
    for i, seg in enumerate(segments):
        prefix = f"seg{i}."
        seg.load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                             if k.startswith(prefix)}, strict=True)
        seg.eval()
    return segments


def plan_spec(plan: Plan) -> ModelSpec:
    """The model spec a signed plan describes (what every trainer builds its stage from): its
    resolved layers, re-resolved on its input shape (so checked). A plan from before specs were
    data (no layers) names a built-in model. Raises ConfigError if the layers do not build."""
    if plan.layers:
        return resolve_spec(plan.model, list(plan.layers), plan.input_shape, plan.n_outputs,
                            plan.cuts[0] if plan.cuts else 1)
    return model_spec(plan.model, plan.input_shape, plan.n_outputs)
