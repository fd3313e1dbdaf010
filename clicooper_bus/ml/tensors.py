"""Tensors from verified envelopes: the one place a message body becomes a torch tensor."""

from __future__ import annotations

import torch

from clicooper_bus.net.wire import Envelope


def tensor(env: Envelope) -> torch.Tensor:
    """The envelope's tensor body (dtype and shape from its verified header) as a torch tensor:
    zero-copy from a writable buffer, else one copy."""
    arr = env.array()
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)
