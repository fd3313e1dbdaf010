"""Replay verification's verdicts (issue 19): per stage, what its replay recomputed of what it
sent, the first message or commitment that differed, and why the replay stopped early; the
form the audit report, the bundle's `replay.json` and `model verify` carry; and the most
threads a replay computes with. Torch-free: `model_replay` reads recorded verdicts with it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def max_threads() -> int:
    """The most torch threads a replay computes with (a trainer's `hello` says its own): more
    would let a member make the audit start thousands of threads."""
    return max(64, 2 * (os.cpu_count() or 1))


@dataclass(frozen=True)
class Divergence:
    """The first thing a stage sent that its replay did not compute: the message `kind` (or
    `snapshot` for a weights commitment), its training `step`, the log `entry`, and what
    differs (`max_abs`: the largest absolute difference of a tensor, None for a digest or a
    count)."""

    kind: str
    step: int | None
    entry: int
    what: str
    max_abs: float | None = None


@dataclass
class StageVerdict:
    """One stage's replay: how many of the messages and weight commitments it sent were
    recomputed (`checked` of `sent`), the first that differed, and why the replay stopped
    early (`stopped`: a missing input body, a rollback to a state it did not reach)."""

    stage: int
    trainer: str
    trainers: list[str] = field(default_factory=list)  # who held the stage, in turn
    sent: int = 0
    checked: int = 0
    steps: set[int] = field(default_factory=set)  # training steps replayed
    trained: set[int] = field(default_factory=set)  # training steps the stage sent for
    first: Divergence | None = None
    stopped: str | None = None
    complete: bool = False  # replayed to the end: nothing stopped it
    rollbacks: int = 0  # rollbacks replayed (the state at their step restored)
    resumed: int = 0  # spans started again from a committed state after inputs not kept
    skipped: int = 0  # steps not re-executed between such a gap and the state after it
    largest: float = 0.0  # the largest absolute difference of any tensor compared

    @property
    def coverage(self) -> float:
        return self.checked / self.sent if self.sent else 0.0

    @property
    def ok(self) -> bool:
        return self.first is None

    def line(self) -> str:
        who = ", then ".join(self.trainers or [self.trainer])
        head = (f"stage {self.stage} ({who}): {self.checked} of {self.sent} messages "
                f"and commitments recomputed ({self.coverage:.0%}), {len(self.steps)} of "
                f"{len(self.trained)} steps re-executed")
        if self.first is not None:
            f = self.first
            diff = f" (largest difference {f.max_abs:.3g})" if f.max_abs is not None else ""
            return (f"{head}; DIVERGES at step {f.step}: its {f.kind} (log entry {f.entry}) "
                    f"{f.what}{diff}")
        if self.rollbacks:
            head += f", across {self.rollbacks} rollback{'s' if self.rollbacks > 1 else ''}"
        if self.resumed:
            head += (f", {self.skipped} not (inputs not kept), started again from "
                     f"{self.resumed} committed state{'s' if self.resumed > 1 else ''}")
        return head + (f"; stopped: {self.stopped}" if self.stopped else "; no divergence")


    def to_json(self) -> dict:
        """The verdict as the audit report and the bundle's `replay.json` carry it."""
        f = self.first
        return {"stage": self.stage, "trainer": self.trainer, "trainers": self.trainers,
                "ok": self.ok,
                "sent": self.sent, "checked": self.checked, "coverage": round(self.coverage, 4),
                "steps": len(self.steps), "trained": len(self.trained),
                "stopped": self.stopped, "complete": self.complete, "largest": self.largest,
                "rollbacks": self.rollbacks, "resumed": self.resumed, "skipped": self.skipped,
                "first": None if f is None else {"kind": f.kind, "step": f.step,
                                                 "entry": f.entry, "what": f.what,
                                                 "max_abs": f.max_abs},
                "line": self.line()}


def replay_markdown(rows: list[dict]) -> list[str]:
    """The audit report's section on replay verification (`StageVerdict.to_json` rows)."""
    lines = ["## Training replay", "",
             "Each trainer's stage re-executed from the log (`clicooper audit "
             "--verify-training`): every message and commitment it sent that the log kept the "
             "inputs of, recomputed bit for bit (tolerance none).", ""]
    return lines + [f"- {'**DIVERGES**' if not r['ok'] else 'ok'}: {r['line']}"
                    for r in rows] + [""]
