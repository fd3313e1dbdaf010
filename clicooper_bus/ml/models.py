"""Sequential model specs, cut at layer boundaries into the owner's head plus K trainer stages.

A spec is data (a list of layer descriptions), so its hash can go in the signed roster and
every process builds exactly the same network from it. Initialisation is deterministic: the
whole model is built from the run seed in one process-independent order, and each process
keeps only its own segment, so head and stages start from the same weights everywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from clicooper_bus.config import RunConfig
from clicooper_bus.errors import ConfigError
from clicooper_bus.plan import Plan

Layer = tuple  # ("conv2d", in, out, kernel, padding) | ("relu",) | ("maxpool", k) | ...


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, int, int]  # C, H, W
    classes: int
    layers: tuple[Layer, ...]
    head_end: int  # default cut between the owner's head and the first stage

    def digest(self, cuts: tuple[int, ...]) -> str:
        """SHA-256 over the spec and its cuts: what the roster commits to."""
        doc = {"name": self.name, "input_shape": list(self.input_shape), "classes": self.classes,
               "layers": [list(layer) for layer in self.layers], "cuts": list(cuts)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _small_cnn(c: int, h: int, w: int, classes: int) -> ModelSpec:
    flat = 32 * (h // 4) * (w // 4)
    layers = (("conv2d", c, 16, 5, 2), ("relu",), ("maxpool", 2),
              ("conv2d", 16, 32, 5, 2), ("relu",), ("maxpool", 2),
              ("flatten",), ("linear", flat, 128), ("relu",), ("linear", 128, classes))
    return ModelSpec("small-cnn", (c, h, w), classes, layers, head_end=6)


def _vgg_small(c: int, h: int, w: int, classes: int) -> ModelSpec:
    flat = 64 * (h // 4) * (w // 4)
    layers = (("conv2d", c, 32, 3, 1), ("relu",), ("conv2d", 32, 32, 3, 1), ("relu",),
              ("maxpool", 2),
              ("conv2d", 32, 64, 3, 1), ("relu",), ("conv2d", 64, 64, 3, 1), ("relu",),
              ("maxpool", 2),
              ("flatten",), ("linear", flat, 256), ("relu",), ("linear", 256, classes))
    return ModelSpec("vgg-small", (c, h, w), classes, layers, head_end=5)


MODELS = {"small-cnn": _small_cnn, "vgg-small": _vgg_small}


def model_spec(name: str, input_shape: tuple[int, int, int], classes: int) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"model {name!r} is not one of {sorted(MODELS)}")
    c, h, w = input_shape
    if h % 4 or w % 4:
        raise ConfigError(f"model {name!r} needs image sides divisible by 4, got {h}x{w}")
    return MODELS[name](c, h, w, classes)


def tail_start(spec: ModelSpec) -> int:
    """Where an owner's tail (U-shaped split) starts: the model's last layer."""
    return len(spec.layers) - 1


def default_cuts(spec: ModelSpec, stages: int, tail: int = 0) -> tuple[int, ...]:
    """Cut after the head, then split the remaining layers (up to the owner's tail, if any)
    into `stages` near-equal runs."""
    rest = (tail or len(spec.layers)) - spec.head_end
    if not 1 <= stages <= rest:
        raise ConfigError(f"model {spec.name!r} can be cut into 1 to {rest} stages after its "
                          f"head, not {stages}")
    sizes = [rest // stages + (i < rest % stages) for i in range(stages)]
    cuts, at = [], spec.head_end
    for size in sizes[:-1]:
        at += size
        cuts.append(at)
    return (spec.head_end, *cuts)


def check_cuts(spec: ModelSpec, cuts: tuple[int, ...], stages: int,
               tail: int = 0) -> tuple[int, ...]:
    """Cuts are the first layer index of each stage: strictly increasing, inside the model
    (before the owner's tail, if any)."""
    cuts = tuple(cuts)
    end = tail or len(spec.layers)
    if len(cuts) != stages or list(cuts) != sorted(set(cuts)) or not (
            0 < cuts[0] and cuts[-1] < end):
        raise ConfigError(f"cuts {list(cuts)} must be {stages} strictly increasing layer indices "
                          f"in 1..{end - 1} (one per stage)")
    return cuts


def configured_split(cfg: RunConfig, input_shape: tuple[int, ...], classes: int
                     ) -> tuple[ModelSpec, tuple[int, ...], int]:
    """What a run config asks for on a dataset of `input_shape` (C, H, W) and `classes`: the
    model spec (with `label_gamma` outputs per class), the trainers' cuts, and the first layer
    of the owner's tail (0: none). The one place the owner and `clicooper plan` take it from.
    Raises ConfigError for a bad model name or cut."""
    pv, stages = cfg.privacy, len(cfg.participants.trainers)
    spec = model_spec(cfg.model.name, tuple(input_shape), classes * pv.label_gamma)
    tail = tail_start(spec) if pv.owner_tail else 0
    cuts = check_cuts(spec, tuple(cfg.model.cuts), stages, tail) if cfg.model.cuts \
        else default_cuts(spec, stages, tail)
    return spec, cuts, tail


def _build(layer: Layer) -> nn.Module:
    op, *args = layer
    if op == "conv2d":
        cin, cout, k, pad = args
        return nn.Conv2d(cin, cout, k, padding=pad)
    if op == "linear":
        return nn.Linear(*args)
    if op == "relu":
        return nn.ReLU()
    if op == "maxpool":
        return nn.MaxPool2d(args[0])
    if op == "flatten":
        return nn.Flatten()
    raise ConfigError(f"unknown layer op {op!r}")


def build_segments(spec: ModelSpec, cuts: tuple[int, ...], seed: int) -> list[nn.Sequential]:
    """[head, stage 1, ..., stage K], initialised from `seed` identically in every process."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        layers = [_build(layer) for layer in spec.layers]
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
    """The model spec a signed plan describes (what every trainer builds its stage from)."""
    return model_spec(plan.model, plan.input_shape, plan.n_outputs)
