"""The owner's side of a trainer's restart: its own snapshots (head, and tail if it keeps one),
the step a run rolls back to, and the signal that interrupts training when a trainer rejoins.

A trainer killed and started again says `rejoin` with the snapshots it holds on disk. The run
rolls back to the newest of those steps that every other stage committed a snapshot of (its
`snapshot` message is in the log) and the owner has its own snapshot of; the rejoined trainer's
file must match what it committed, where it committed one. Everyone restores that step and
says `restored`; steps from it on are trained again (and appear a second time in the log,
after the owner's signed `rollback`, which says so).
"""

from __future__ import annotations

from clicooper_bus.errors import ClicooperError
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.protocol.recovery import Rejoin
from clicooper_bus.services.trainer import snapshot

KEEP = 4  # the owner runs ahead of the stages by up to `in_flight` steps: one snapshot more


class Rejoined(ClicooperError):
    """A trainer came back after a restart (its signed `rejoin`): training is interrupted and
    resumes from the rollback step. Outside training (joining, delivering) it stops the run."""

    def __init__(self, name: str, rejoin: Rejoin, digest: str = ""):
        super().__init__(f"{name} rejoined with snapshots of steps {rejoin.steps}")
        self.name, self.rejoin, self.digest = name, rejoin, digest  # (its header's, hex)
        self.in_resume = False  # it came during a resumed owner's rollback: part of the resume


class BrokerBack(ClicooperError):
    """The connection to the broker was lost and came back (a broker killed and started
    again): what was in flight meanwhile is lost, so training is interrupted and the run rolls
    back to a step every stage committed."""


class RollbackRefused(ClicooperError):
    """A rejoined trainer cannot be resumed (no step every stage committed, a restore that is
    not what was committed, a claimed watermark round behind it): the run stops cleanly,
    naming it."""

    def __init__(self, name: str, problem: str):
        super().__init__(problem)
        self.stopped = {"rejoined": name, "problem": problem}


class OwnerSnapshots:
    """The owner's head (and tail) at the steps the trainers snapshot theirs, in memory: the
    last `KEEP`."""

    def __init__(self, head: SegmentTrainer, tail: SegmentTrainer | None):
        self.head, self.tail = head, tail
        self.kept: dict[int, tuple[dict, dict | None]] = {}

    def take(self, step: int) -> None:
        tail = snapshot.stage_state(self.tail) if self.tail is not None else None
        self.kept[step] = (snapshot.stage_state(self.head), tail)
        for old in sorted(self.kept)[:-KEEP]:
            del self.kept[old]

    def restore(self, step: int) -> None:
        """Put the head (and tail) of `step` back. Raises ClicooperError if it is not kept."""
        if step not in self.kept:
            raise ClicooperError(f"the owner keeps its head's snapshots of steps "
                                 f"{sorted(self.kept)}, not of step {step}")
        head, tail = self.kept[step]
        snapshot.restore(self.head, head)
        if tail is not None:
            snapshot.restore(self.tail, tail)


def rollback_step(name: str, rejoin: Rejoin, committed: dict[str, dict[int, str]],
                  stages: list[str], owner_steps: set[int], floor: int = 0) -> int:
    """The step to roll back to when trainer `name` rejoins with `rejoin`: the newest of its
    snapshot steps that every other stage in `stages` committed (`committed`: name -> step ->
    state digest of its `snapshot`) and the owner kept (`owner_steps`), and whose state digest
    is the one `name` committed for it, if it committed one; none before `floor` (the end of
    the newest watermark round claimed). Raises RollbackRefused naming what is missing."""
    mine = committed.get(name, {})
    for step, state in sorted(zip(rejoin.steps, rejoin.states, strict=True), reverse=True):
        if step in mine and mine[step] != state:
            continue  # the file on disk is not what the process committed: not this one
        if step < floor:
            break  # a claimed watermark round would have to be trained (and claimed) again
        others = all(step in committed.get(n, {}) for n in stages if n != name)
        if others and step in owner_steps:
            return step
    raise RollbackRefused(name,
        f"{name} rejoined with snapshots of steps {rejoin.steps}, but no step of them has "
        f"every stage's committed snapshot and the owner's (owner: {sorted(owner_steps)}; "
        + "; ".join(f"{n}: {sorted(committed.get(n, {}))[-4:]}" for n in stages if n != name)
        + (f"; none may come before step {floor}, the end of the newest watermark round "
           f"claimed" if floor else "") + "): the run cannot resume")
