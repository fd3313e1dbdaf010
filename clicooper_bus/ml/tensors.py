"""Tensors from verified envelopes: the one place a message body becomes a torch tensor."""

from __future__ import annotations

import torch

from clicooper_bus.net.wire import Envelope


def tensor(env: Envelope) -> torch.Tensor:
    """The envelope's tensor body (dtype and shape from its verified header) as a torch tensor
    in memory torch allocated (one copy, about 0.1 ms for 0.8 MB).

    Why not zero-copy: a ZeroMQ frame can start at any address, and on an AMD EPYC machine the
    BLAS kernels gave results that differ in the last bits for the same values at a different
    alignment: 50 steps over the bus drifted 2.4e-5 from the in-process reference (which holds
    the same test to 1e-5) when stages computed on the frame's buffer in place, and matched
    once each received tensor was copied into torch's (aligned) memory. Deterministic,
    replayable training needs the copy."""
    return torch.from_numpy(env.array()).clone()
