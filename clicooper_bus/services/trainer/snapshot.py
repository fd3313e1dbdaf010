"""A stage's snapshot: everything a segment needs to go on training bit for bit (weights, Adam's
state, torch's RNG state, the step), its digests, and where a trainer keeps them.

The digests a trainer commits to in its signed `snapshot` message, and the tensors a snapshot
holds, are defined in `ml.state` (`canonical_digest`, `weights_digest`, `stage_state`,
`restore`), which this module re-exports.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import SnapshotLayout, write_atomic
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.state import SCHEME, canonical_digest, restore, stage_state, weights_digest

__all__ = ["canonical_digest", "restore", "stage_state", "weights_digest"]

KEEP_ON_DISK = 2  # the newest may have no commitment in the log (killed before sending it)
KEEP_IN_MEMORY = 3  # neighbours may be one snapshot ahead of a stage that died
# ... and the newest round boundaries (epoch ends) besides: a resumed run goes back to the last
# round snapshot the owner kept (`clicooper run --resume`), which may be one round behind
KEEP_BOUNDARIES = 2


def safe_open_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` map of safetensors bytes (the header is a length-prefixed JSON
    object); empty when there is none. Raises SafetensorError when the header is not one."""
    try:
        (n,) = struct.unpack_from("<Q", raw)
        meta = json.loads(raw[8:8 + n]).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError) as exc:
        raise SafetensorError(f"unreadable safetensors header: {exc}") from None
    return meta if isinstance(meta, dict) else {}


@dataclass(frozen=True)
class Taken:
    """One snapshot: its step, its digests, and its tensors (kept in memory)."""

    step: int
    weights: str
    state: str
    tensors: dict[str, torch.Tensor]


def take(seg: SegmentTrainer, step: int) -> Taken:
    """A snapshot of `seg` at training step `step` (the state after steps 0 .. step - 1)."""
    tensors = stage_state(seg)
    weights = canonical_digest({k.removeprefix("weights/"): v for k, v in tensors.items()
                                if k.startswith("weights/")})
    return Taken(step, weights, canonical_digest(tensors, step), tensors)


class Store:
    """A trainer's snapshots: the last `KEEP_IN_MEMORY` in memory (a rollback restores from
    them), the last `KEEP_ON_DISK` and the last `KEEP_BOUNDARIES` round boundaries
    (`boundary(step)`) in its `SnapshotLayout` (a restarted process, or a resumed run, does),
    and the roster it joined with. Every file carries the roster's run nonce (`metadata`), and
    one of another run is never read as ours."""

    def __init__(self, layout: SnapshotLayout, metadata: Mapping[str, str],
                 boundary: Callable[[int], bool] = lambda step: False):
        self.layout, self.metadata, self.boundary = layout, dict(metadata), boundary
        self.memory: dict[int, Taken] = {}

    def save_roster(self, roster: bytes) -> None:
        """A new run joined: its roster, and no file of an earlier run's (a run of the same
        id) left beside it, which a restart would otherwise take for its own."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        for old in self.layout.steps():
            self.layout.state(old).unlink(missing_ok=True)
        write_atomic(self.layout.roster, roster, mode=0o600)

    def clear(self) -> None:
        """The run is over (finished or stopped: neither is resumed): every file of ours goes,
        so that a process of the next run of the same id (a remote trainer's directory stays)
        joins it instead of trying to rejoin this one."""
        self.memory.clear()
        for step in self.layout.steps():
            self.layout.state(step).unlink(missing_ok=True)
        self.layout.roster.unlink(missing_ok=True)

    def drop_after(self, step: int) -> None:
        """Forget every snapshot after `step` (a rollback to it: they are of a timeline that
        was abandoned, and the same steps will be snapshotted again)."""
        for s in [s for s in self.memory if s > step]:
            del self.memory[s]
        for s in self.layout.steps():
            if s > step:
                self.layout.state(s).unlink(missing_ok=True)

    def keep(self, snap: Taken, *, write: bool = True, usage: Mapping | None = None) -> int:
        """Keep `snap` in memory and (`write`) on disk, atomically, dropping the oldest beyond
        the limits; `usage`: the process's `Usage` document then, kept in the file's metadata
        (`usage_of`). Returns the bytes written."""
        self.memory[snap.step] = snap
        for old in sorted(self.memory)[:-KEEP_IN_MEMORY]:
            del self.memory[old]
        if not write:
            return 0
        meta = {**self.metadata, "step": str(snap.step), "weights_sha256": snap.weights,
                "state_sha256": snap.state, "digest": SCHEME.decode().strip()}
        if usage is not None:
            meta["usage"] = json.dumps(dict(usage))
        raw = st_save(snap.tensors, metadata=meta)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.layout.state(snap.step), raw, mode=0o600)
        steps = self.layout.steps()
        keep = {*steps[-KEEP_ON_DISK:], *[s for s in steps if self.boundary(s)][-KEEP_BOUNDARIES:]}
        for old in steps:
            if old not in keep:
                self.layout.state(old).unlink(missing_ok=True)
        return len(raw)

    def usage_of(self, step: int) -> dict | None:
        """The `Usage` document kept with the snapshot of `step` on disk, or None."""
        try:
            raw = safe_open_metadata(self.layout.state(step).read_bytes()).get("usage")
            return json.loads(raw) if raw else None
        except (OSError, SafetensorError, ValueError):
            return None

    def get(self, step: int) -> Taken | None:
        """The snapshot of `step`, from memory or else from disk (its digests recomputed from
        the file's tensors, so a damaged file shows as a digest that does not match its
        commitment); None if there is none."""
        if step in self.memory:
            return self.memory[step]
        path = self.layout.state(step)
        if not path.exists():
            return None
        try:
            raw = path.read_bytes()
            tensors = st_load(raw)
            nonce = safe_open_metadata(raw).get("nonce")
        except (OSError, SafetensorError) as exc:
            raise ClicooperError(f"snapshot {path} cannot be read: {exc}; remove it to "
                                 f"resume from an older one") from None
        if nonce != self.metadata.get("nonce"):
            raise ClicooperError(f"snapshot {path} is of another run (nonce {nonce}, this run's "
                                 f"{self.metadata.get('nonce')}): remove it")
        weights = canonical_digest({k.removeprefix("weights/"): v for k, v in tensors.items()
                                    if k.startswith("weights/")})
        return Taken(step, weights, canonical_digest(tensors, step), tensors)
