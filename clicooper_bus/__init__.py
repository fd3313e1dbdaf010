"""CliCooper bus: cooperative split learning under partial trust.

The library knows nothing of processes: `services/` wires it into processes and `tools/` holds
the offline commands. Importing this package does not import torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing the package must not import torch
    from torch import nn

__version__ = "0.1.0"


def load_model(path: str | os.PathLike[str], *,
               label_groups: str | os.PathLike[str] | None = None) -> nn.Module:
    """The delivered model of a run directory or a `model.safetensors` file: a plain
    `torch.nn.Module` in eval mode mapping float32 N x C x H x W images in [0, 1] (uint8 / 255)
    to N x classes scores for the original labels (the owner's release clip and label decoding
    applied). With label obfuscation, `label_groups` is the owner's `label_groups.json` (default:
    the one beside the model). Raises ClicooperError naming the file at fault. See
    `clicooper_bus.ml.delivered.load_model`; torch is imported only when this is called."""
    from clicooper_bus.ml.delivered import load_model as _load

    return _load(path, label_groups=label_groups)
