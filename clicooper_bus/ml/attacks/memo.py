"""Pure steps that several attacks of one audit repeat on the same inputs, computed once.

The three extraction attacks fit the same head simulator before they differ in how many
labels name its outputs. Each such step is a deterministic function of its inputs (arrays,
seeds, settings), so its result is kept under a SHA-256 digest of them, and a second attack
gets the first one's result instead of recomputing it. The cache is per process and small
(`LIMIT` entries, oldest dropped first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
LIMIT = 16
_cache: OrderedDict[bytes, Any] = OrderedDict()


def digest(*parts: Any) -> bytes:
    """SHA-256 over arrays (dtype, shape and bytes) and plain values (their repr)."""
    h = hashlib.sha256()
    for p in parts:
        if hasattr(p, "detach"):  # a torch tensor
            p = p.detach().cpu().numpy()
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
        else:
            h.update(repr(p).encode())
        h.update(b"\x00")
    return h.digest()


def once(key: bytes, compute: Callable[[], T]) -> T:
    """`compute()`, or what it returned before under `key`."""
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    value = compute()
    _cache[key] = value
    while len(_cache) > LIMIT:
        _cache.popitem(last=False)
    return value


def clear() -> None:
    """Forget everything (between audits of different runs in one process)."""
    _cache.clear()
