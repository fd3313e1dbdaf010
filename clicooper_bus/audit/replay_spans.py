"""Replay verification across gaps (issue 19, sampled retention), a part of
`training_replay._Stage`: after an input whose body the log did not keep, the replay starts
again from the stage's next round-boundary state, sealed to the owner (`StageState`) and
checked against its `snapshot` commitment; the steps between are not re-executed, and what
the stage sent for them is set aside (the replay is then not complete)."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load

from clicooper_bus.audit.replay_verdict import Divergence
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.ml.state import canonical_digest, restore
from clicooper_bus.net.codec import unpack
from clicooper_bus.protocol.recovery import Snapshot, StageState


class SpanStarts:
    """The gap-crossing methods of `training_replay._Stage` (a mixin: it uses the stage's log,
    index, segment, verdict and the owner's `unseal`)."""

    def _resume(self, step: int, why: str) -> bool:
        """An input of `step` whose body the log did not keep (`why`): start again from the
        next round boundary whose state the stage sent sealed to the owner
        (`protocol.recovery.StageState`) and committed to in its `snapshot`; the steps between
        are not re-executed, nor what it sent for them compared. False, stopped, when no such
        state follows or the owner's key is not at hand; a state that is not the one committed
        diverges."""
        ix = self.index
        if ix.abandoned(step):  # the rollback after this span trains it again: nothing lost
            self.ran_out = True
            return False
        kept = self.plog.entry
        later = sorted(b for b in ix.states if b > step and b in ix.snapshot_at
                       and (ix.end is None or b <= ix.end) and kept(ix.states[b])[2] is not None
                       and kept(ix.snapshot_at[b])[2] is not None)
        if not later:
            self._stop(why)
            return False
        if self.unseal is None:
            self._stop(f"{why}; the stage's sealed state of step {later[0]} would start the "
                       f"replay again with the owner's key")
            return False
        b, i = later[0], ix.states[later[0]]
        committed = Snapshot.parse(unpack(self._doc(ix.snapshot_at[b])), sender=self.name)
        try:
            raw = self.unseal(StageState.parse(unpack(self._doc(i)), sender=self.name).sealed)
            tensors = st_load(raw)
            digest = canonical_digest(tensors, b)
        except Exception as exc:  # noqa: BLE001  (safetensors raises KeyError for some dtypes)
            self.verdict.first = Divergence("stage_state", b, i, f"cannot be opened with the "
                                                                 f"owner's key ({exc})")
            return False
        if digest != committed.state:
            self.verdict.first = Divergence("stage_state", b, i, f"is not the state it "
                                                                 f"committed for step {b}")
            return False
        self._fresh(tensors)
        self._skip(step, b)
        self.skip_to = b
        # its commitment of b holds the state restored: checked above, not recomputed
        self.unverified += len(ix.sent.pop(("snapshot", b), []))
        self._state_reached(b)
        return self.verdict.first is None

    def _fresh(self, state: dict[str, torch.Tensor]) -> None:
        """A fresh segment trainer (nothing pending, as a trainer's after a rollback) holding
        `state` (`ml.state.stage_state`)."""
        self.seg = SegmentTrainer(self.seg.module, lr=self.seg.optimizer.defaults["lr"]
                                  if self.seg.optimizer is not None else 0.0,
                                  seed=self.seg.seed)
        self.seg.regularizer = lambda: self.mark.add_grad() if self.mark is not None else None
        restore(self.seg, state)

    def _skip(self, step: int, b: int) -> None:
        """Steps `step` .. `b` - 1 are not re-executed: what the stage sent for them, and the
        evaluations and claims at states between, are set aside (the replay not complete)."""
        ix, v = self.index, self.verdict
        v.resumed += 1
        v.skipped += b - step
        for key in [k for k in ix.sent if self._between(k, step, b)]:
            self.unverified += len(ix.sent.pop(key))
        for at, i in [e for e in ix.evals if step < e[0] < b]:
            ix.evals.remove((at, i))
            h = self.plog.header(i)
            self.unverified += len(ix.sent.pop(("eval", h.epoch, h.step), []))
        kept = [c for c in self.claims if not step < (c[0] + 1) * (self.per or 1) < b]
        self.unverified += len(self.claims) - len(kept)
        self.claims = kept

    @staticmethod
    def _between(key: tuple, step: int, b: int) -> bool:
        if key[0] == "snapshot":
            return step < key[1] < b
        return key[0] != "eval" and step <= key[1] < b
