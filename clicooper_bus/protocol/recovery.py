"""The control documents of snapshots, restarts, rollbacks and handovers (issue 17): a
trainer's `Snapshot` commitment, the notary's `ChainTip`, a restarted trainer's `Rejoin`, the
owner's `Rollback` and each trainer's `Restored`, a trainer's sealed `StageState` and the
owner's `Handover` to a standby. Parsed as strictly as every document of the protocol page
(`clicooper_bus.protocol`), whose table lists them; nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from clicooper_bus.protocol import Control, _is_digest

# the roster's `states` meta: every trainer sends its `StageState` at every round boundary, so
# that replay verification can start a span there when the log did not keep every input
STATES_ROUNDS = "rounds"


@dataclass(frozen=True)
class Snapshot(Control):
    """A trainer snapshotted its stage at training step `step` (the state after steps 0 ..
    step - 1: every N steps, `[run] snapshot_every`, at each epoch boundary and at the end of
    training) and commits to it: `weights`, the SHA-256 (hex) of its weights and `state`, of
    its whole state (weights, Adam's moments and step counts, torch's RNG state, the step), each
    over the canonical serialisation `services.trainer.snapshot.canonical_digest` defines. The
    last one's `weights` is the digest of the weights it delivers sealed in its `segment`."""

    KIND: ClassVar[str] = "snapshot"
    step: int
    weights: str
    state: str

    def _checked(self, sender: str | None) -> Snapshot:
        if self.step < 0:
            raise self._refuse("step is negative", "step", sender)
        for name in ("weights", "state"):
            if not _is_digest(getattr(self, name)):
                raise self._refuse(f"{name} is not a SHA-256 digest in hex", name, sender)
        return self


@dataclass(frozen=True)
class ChainTip(Control):
    """The notary to a trainer silent past `[bus] timeout_s`: the last `seq` of `member` the log
    holds and the digest of that message's header (`prev`, 32 bytes). A restarted trainer
    (the same key, a new process) continues its signed chain from there, so the log's chain
    of that sender stays unbroken; only the notary knows which of the dead process's last
    messages reached the log. `marks` (sent only with watermarks on): where the member's
    watermark chain stands, as `[leaf, body]` pairs of logged messages (its newest `wm_commit`
    and `wm_claim`, the previous stage's next `wm_commit`; `chain.resume` checks each).
    `resend` (sent only when true): the log misses what the member sent after `seq` (a notary
    started again, or a gap after a broker restart): a live member sends it again."""

    KIND: ClassVar[str] = "tip"
    member: str
    seq: int
    prev: bytes
    marks: list[list[bytes]] | None = None
    resend: bool = False

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"member": self.member, "seq": self.seq, "prev": self.prev}
        if self.marks is not None:
            doc["marks"] = [list(m) for m in self.marks]
        if self.resend:
            doc["resend"] = True
        return doc

    def _checked(self, sender: str | None) -> ChainTip:
        if self.seq < 0:
            raise self._refuse("seq is negative", "seq", sender)
        if len(self.prev) != 32:
            raise self._refuse("prev is not 32 bytes", "prev", sender)
        if self.marks is not None and (len(self.marks) > 3 or
                                       any(len(m) != 2 for m in self.marks)):
            raise self._refuse("marks must be at most 3 [leaf, body] pairs", "marks", sender)
        return self


@dataclass(frozen=True)
class Rejoin(Control):
    """A restarted trainer of `stage` is back and can restore the snapshots it holds on disk:
    `steps` (ascending) and the `states` digests of each (as in its `Snapshot`s; the newest may
    be one whose `snapshot` message the dead process never sent: this commits to it).
    `after` (sent only by a process that keeps an outbox, `net.outbox`): the seq of the
    notary's tip it took its chain up from; the messages between that tip and this `rejoin` are
    its dead process's, sent again from its outbox. Absent: the rejoin follows the tip."""

    KIND: ClassVar[str] = "rejoin"
    stage: int
    steps: list[int]
    states: list[str]
    after: int | None = None

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"stage": self.stage, "steps": list(self.steps),
                               "states": list(self.states)}
        if self.after is not None:
            doc["after"] = self.after
        return doc

    def follows(self, seq: int) -> int:
        """The seq of the tip this rejoin (at header seq `seq`) takes its chain up from."""
        return seq - 1 if self.after is None else self.after

    def _checked(self, sender: str | None) -> Rejoin:
        if self.after is not None and self.after < 0:
            raise self._refuse("after is negative", "after", sender)
        if len(self.steps) != len(self.states) or not self.steps:
            raise self._refuse("steps and states must be non-empty and of one length", "steps",
                               sender)
        if any(s < 0 for s in self.steps) or self.steps != sorted(set(self.steps)):
            raise self._refuse("steps must be ascending, distinct and >= 0", "steps", sender)
        if not all(_is_digest(d) for d in self.states):
            raise self._refuse("states holds a value that is not a SHA-256 digest in hex",
                               "states", sender)
        return self


@dataclass(frozen=True)
class Rollback(Control):
    """The owner rolls the run back to training step `step` because `rejoined` came back:
    every trainer restores its snapshot of that step and says so (`Restored`); the owner then
    sends steps from `step` on again, so they appear a second time in the log, after this.
    `stages` (sent only after a handover amended the roster's): the stage order from here on,
    for a trainer restarted with the roster on its disk, which knows no handover. `rejoins`
    (sent only when the owner took one): the SHA-256 (hex) of the header of each `rejoin` it
    took for this rollback, so that a resumed owner replaying the log takes the commitments
    of those and no other (one the live owner refused commits to nothing). Each `Restored`
    names the rollback it answers by the digest of its header."""

    KIND: ClassVar[str] = "rollback"
    step: int
    rejoined: str
    stages: list[str] | None = None
    rejoins: list[str] | None = None

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"step": self.step, "rejoined": self.rejoined}
        if self.stages is not None:
            doc["stages"] = list(self.stages)
        if self.rejoins is not None:
            doc["rejoins"] = list(self.rejoins)
        return doc

    def _checked(self, sender: str | None) -> Rollback:
        if self.step < 0:
            raise self._refuse("step is negative", "step", sender)
        if self.stages is not None and len(set(self.stages)) != len(self.stages):
            raise self._refuse("stages names a trainer twice", "stages", sender)
        if self.rejoins is not None and not all(_is_digest(d) for d in self.rejoins):
            raise self._refuse("rejoins holds a value that is not a SHA-256 digest in hex",
                               "rejoins", sender)
        return self


@dataclass(frozen=True)
class Restored(Control):
    """A trainer restored its snapshot of `step` after the owner's `Rollback` whose header's
    SHA-256 (hex) is `rollback`; `state`: that snapshot's state digest (the owner checks it
    against the committed one). Neighbours take the trainer's data again only after the
    `Restored` that answers the rollback they restored for, which a trainer cannot name before
    the owner sent it (the header holds the owner's chain link and clock): two rollbacks to
    one step are told apart, and no `Restored` sent ahead counts (empty in logs from before)."""

    KIND: ClassVar[str] = "restored"
    step: int
    state: str
    rollback: str = ""

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"step": self.step, "state": self.state}
        if self.rollback:
            doc["rollback"] = self.rollback
        return doc

    def answers(self, step: int, rollback: str) -> bool:
        """Whether this answers the rollback to `step` whose header digest is `rollback`."""
        return (self.step, self.rollback) == (step, rollback)

    def _checked(self, sender: str | None) -> Restored:
        if self.step < 0:
            raise self._refuse("step is negative", "step", sender)
        if self.rollback and not _is_digest(self.rollback):
            raise self._refuse("rollback is not a SHA-256 digest in hex", "rollback", sender)
        if not _is_digest(self.state):
            raise self._refuse("state is not a SHA-256 digest in hex", "state", sender)
        return self


@dataclass(frozen=True)
class StageState(Control):
    """A trainer's whole stage state at round boundary `step` (the tensors of its snapshot,
    safetensors bytes sealed to the owner's key), sent after its `Snapshot` of that step when
    the roster has standbys or its `states` meta is `STATES_ROUNDS`: the owner checks it
    against that commitment and keeps it, for a standby to take the stage over if the trainer
    goes for good; replay verification, with the owner's key, starts a span from it
    (`audit.training_replay`)."""

    KIND: ClassVar[str] = "stage_state"
    step: int
    sealed: bytes

    def _checked(self, sender: str | None) -> StageState:
        if self.step < 0:
            raise self._refuse("step is negative", "step", sender)
        return self


@dataclass(frozen=True)
class Handover(Control):
    """The owner hands stage `stage` of `replaced` (gone past rejoin_timeout_s) to standby
    `by` from round boundary `step` (watermark round `round` starts again there, every stage
    committing anew): `sealed` is the stage state `replaced` committed at `step`, sealed to
    `by`'s key; `prev_claim` the digest of the stage's logged claim of the round before (empty
    in round 0), which `by`'s first commitment links to. Signed and logged: the roster's
    amendment, from which every member takes `by` for `replaced`."""

    KIND: ClassVar[str] = "handover"
    stage: int
    round: int
    step: int
    replaced: str
    by: str
    sealed: bytes
    prev_claim: bytes

    def _checked(self, sender: str | None) -> Handover:
        if self.stage < 1 or self.round < 0 or self.step < 0:
            raise self._refuse("stage, round or step out of range", "stage", sender)
        if len(self.prev_claim) not in (0, 32):
            raise self._refuse("prev_claim is not a 32-byte digest", "prev_claim", sender)
        return self


# leaves a member shows the notary at once: a `witnessed` document stays under its kind's cap
# (`net.kinds`, 1 MiB) with headers at their 4 KiB limit
MAX_WITNESSED = 240


@dataclass(frozen=True)
class Witnessed(Control):
    """A member's answer to the notary's `tip` with `resend` (a notary started again, or a gap):
    the leaves (header || signature, each at most 4 KiB + 64 bytes) of the last messages it
    accepted from others, beats aside, since it last sent one (at most `MAX_WITNESSED`). The
    notary compares each with what its log holds, or later fills, at that place of its sender's
    chain (`services.notary_evidence`): a sender that, while the notary was down, sent a
    receiver another message than it then sends again for the log is proven to equivocate."""

    KIND: ClassVar[str] = "witnessed"
    leaves: list[bytes]

    def _checked(self, sender: str | None) -> Witnessed:
        if len(self.leaves) > MAX_WITNESSED:
            raise self._refuse(f"more than {MAX_WITNESSED} leaves", "leaves", sender)
        if not all(isinstance(leaf, bytes) and 64 < len(leaf) <= 4096 + 64
                   for leaf in self.leaves):
            raise self._refuse("a leaf is not a header and a 64-byte signature", "leaves",
                               sender)
        return self
