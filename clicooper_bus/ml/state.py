"""A stage's state as torch holds it, and its digests: what a trainer snapshots and commits to,
what the owner checks a restore and a delivered segment against, and what replay verification
recomputes (`audit.training_replay`). Torch only: no process, no file.

The digests are what a trainer commits to in its signed `snapshot` message (the owner checks a
restore against them, and issue 19's replay verification recomputes them), so they are defined
precisely here, over a canonical serialisation that does not depend on safetensors' file layout:

    canonical_digest(tensors, step) = SHA-256 of
        b"clicooper-snapshot-v1\\n"
        b"step <step>\\n"                                  (only when step is not None)
        for each name in ascending order of its UTF-8 bytes:
            b"<name>\\t<dtype>\\t<d0>,<d1>,...\\n"          (dtype as torch names it without
                                                          "torch.", e.g. float32; shape empty
                                                          for a scalar)
            the tensor's elements in C order, as little-endian bytes

A snapshot's tensors (`stage_state`) are named `weights/<state_dict key>`, `adam/<parameter
name>/<state key>` (`exp_avg`, `exp_avg_sq`, `step`; none before the first update) and
`rng/torch`. Its *state* digest is `canonical_digest(tensors, step)`; its *weights* digest is
`canonical_digest(state_dict)` over the module's `state_dict()` under its own keys, no step:
exactly the tensors a trainer seals in its `segment`, so the delivered weights can be checked
against the last commitment (`weights_digest`).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping

import torch

from clicooper_bus.errors import ClicooperError
from clicooper_bus.ml.split import SegmentTrainer

SCHEME = b"clicooper-snapshot-v1\n"


def canonical_digest(tensors: Mapping[str, torch.Tensor], step: int | None = None) -> str:
    """The SHA-256 (hex) of `tensors` (and `step`) as the module docstring defines it."""
    h = hashlib.sha256(SCHEME)
    if step is not None:
        h.update(f"step {int(step)}\n".encode())
    for name in sorted(tensors, key=lambda n: n.encode()):
        t = tensors[name].detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(f"{name}\t{dtype}\t{','.join(str(d) for d in t.shape)}\n".encode())
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        if sys.byteorder != "little" and t.element_size() > 1:  # defined as little-endian
            raw = t.reshape(-1).numpy().byteswap().tobytes()
        h.update(raw)
    return h.hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """The weights digest of `module`: its `state_dict()` as delivered in a segment."""
    return canonical_digest(module.state_dict())


def stage_state(seg: SegmentTrainer) -> dict[str, torch.Tensor]:
    """Copies of everything `seg` needs to continue bit for bit, named as documented above."""
    out = {f"weights/{k}": v.detach().clone() for k, v in seg.module.state_dict().items()}
    if seg.optimizer is not None:
        names = {id(p): n for n, p in seg.module.named_parameters()}
        for group in seg.optimizer.param_groups:
            for p in group["params"]:
                for key, value in seg.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        out[f"adam/{names[id(p)]}/{key}"] = value.detach().clone()
    out["rng/torch"] = torch.get_rng_state()
    return out


def restore(seg: SegmentTrainer, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put `stage_state`'s `tensors` back into `seg`: weights, Adam's state (none for a
    parameter the snapshot has none of) and torch's RNG. Raises ClicooperError naming what
    does not fit (another model, or a damaged file)."""
    weights = {k.removeprefix("weights/"): v for k, v in tensors.items()
               if k.startswith("weights/")}
    try:
        seg.module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ClicooperError(f"the snapshot does not fit this stage: {exc}") from None
    if seg.optimizer is not None:
        seg.optimizer.state.clear()
        for name, p in seg.module.named_parameters():
            state = {k.split("/")[-1]: v.clone() for k, v in tensors.items()
                     if k.startswith(f"adam/{name}/") and k.count("/") == name.count("/") + 2}
            if state:
                seg.optimizer.state[p] = state
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"].clone())
