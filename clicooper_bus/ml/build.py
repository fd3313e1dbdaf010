"""Building a model's segments from its resolved spec, with deterministic weights: the whole
model is initialised from the run seed in one process-independent order, and a trainer builds
only its own stage, drawing and dropping the random numbers of the layers before it
(`build_segment`). Weights files are read back into segments (`segments_from_state_dict`)."""

from __future__ import annotations

import torch
from torch import nn

from clicooper_bus.errors import ConfigError
from clicooper_bus.ml.spec import Layer, ModelSpec, _module, shape_str

SKIP_CHUNK = 1 << 20  # random numbers drawn at a time when skipping layers (4 MiB)


def random_draws(layer: Layer) -> int:
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
        _skip_draws(sum(random_draws(layer) for layer in spec.layers[:a]))
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
