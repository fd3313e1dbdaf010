"""The log's timeline for replay verification (issue 19): which span between rollbacks each
message belongs to, read from its sender's own signed chain, and who held each stage in each
span.

The notary orders each sender's messages (its chain), not messages across senders: a message
that reached the notary late (a resend after a notary restart, one held back) is logged after
messages of others that followed it. So a message's span is not where the log put it but where
its sender's chain does:
- the owner's messages after its `rollback` (to step S) are of the next span;
- a trainer's messages after its `restored` answering that rollback (its step, and the digest
  of its header, which no trainer knows before the owner sent it) are of the span after it.
  What it sent between the owner's rollback and its `restored` was computed before it
  restored: the old span's, as its neighbours treat them (they drop a neighbour's data until
  its `restored` answering the rollback they restored for,
  `services.trainer.restart.Restarts._fenced`). A `restored` that answers no rollback moves
  nothing; one answering a later rollback than the next (a trainer that was gone during a
  rollback and restored only at the one after) moves the trainer past both. Only in a log from
  before `restored` named its rollback (none in it names one) does a `restored` answer the
  next rollback of its step: in any other, one naming none moves nothing (trainers and owner
  ignore it too, and its step is predictable).

A `handover` (owner's chain) gives a stage to a standby from the next span on: the standby
restores the gone trainer's state at the rollback that follows, and says `restored` like every
other trainer (`services.owner.handover`). A standby's messages before that are of the span
before (it sends nothing there but its hello).

Run only on a log that `tlog.verify.verify_log` accepted: this module reads headers and control
documents, it does not check them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.codec import unpack
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import Header
from clicooper_bus.protocol.recovery import Handover, Restored, Rollback
from clicooper_bus.tlog.log import ProvenanceLog


@dataclass(frozen=True)
class Break:
    """Where training starts over: the owner's `rollback` at log `entry` to `step` (the steps
    from there on are trained again)."""

    entry: int
    step: int
    what: str
    digest: str = ""  # its header's SHA-256 (hex), which each `Restored` answering it names


@dataclass(frozen=True)
class Placed:
    """Log entry `entry` (`header`), sent by member `sender` ("?" for a key the roster does
    not hold), in span `span` of its sender's chain."""

    entry: int
    header: Header
    sender: str
    span: int


@dataclass
class Timeline:
    """The run's spans: `breaks[j]` ends span j; `holders[j]` names the trainers of stages
    1..n in span j; `entries` are every log entry placed, grouped by sender, each sender's in
    its chain's order."""

    breaks: list[Break]
    holders: list[tuple[str, ...]]
    entries: list[Placed]

    def start(self, span: int) -> int:
        """The step span `span` starts training from."""
        return 0 if span == 0 else self.breaks[span - 1].step

    def end(self, span: int) -> int | None:
        """The step the rollback after span `span` returns to (None: the last span): the
        span's steps from there on were abandoned."""
        return self.breaks[span].step if span < len(self.breaks) else None


def doc(plog: ProvenanceLog, i: int) -> bytes:
    """The body of control entry `i`. Raises ClicooperError when the log holds none (a log
    that `verify_log` accepted keeps every document: `[log] retention` drops tensors only)."""
    body = plog.entry(i)[2]
    if body is None:
        raise ClicooperError(f"log entry {i} holds no body: the log is not one that "
                             f"verify_log accepted")
    return bytes(body)


def timeline(plog: ProvenanceLog, roster: Roster,
             order: Sequence[int] | None = None) -> Timeline:
    """Place every entry of `plog` (read in `order`, default the log's: any order that keeps
    each sender's places the same) in its span."""
    names = {m.key_id: m.name for m in roster.members}
    chains: dict[str, list[tuple[int, Header]]] = {}
    for i in (range(plog.size) if order is None else order):
        h = plog.header(i)
        chains.setdefault(names.get(h.sender, "?"), []).append((i, h))
    owner = roster.owner.name
    breaks, handovers = _owner_breaks(plog, owner, chains.get(owner, []))
    holders = [tuple(roster.stages)]
    for j in range(1, len(breaks) + 1):
        now = list(holders[-1])
        for at, ho in handovers:
            if at == j and 1 <= ho.stage <= len(now) and now[ho.stage - 1] == ho.replaced:
                now[ho.stage - 1] = ho.by
        holders.append(tuple(now))
    answers = {i: Restored.parse(unpack(doc(plog, i)), sender=who)
               for who, chain in chains.items() for i, h in chain if h.kind == "restored"}
    legacy = not any(done.rollback for done in answers.values())
    entries: list[Placed] = []
    for who, chain in chains.items():
        entries += _placed(who, chain, breaks, _first_span(who, holders, owner), answers,
                           legacy)
    return Timeline(breaks, holders, entries)


def _owner_breaks(plog: ProvenanceLog, owner: str, chain: list[tuple[int, Header]]
                  ) -> tuple[list[Break], list[tuple[int, Handover]]]:
    """The owner's rollbacks, and its handovers with the span each takes effect in."""
    breaks: list[Break] = []
    handovers: list[tuple[int, Handover]] = []
    for i, h in chain:
        if h.kind == "rollback":
            rb = Rollback.parse(unpack(doc(plog, i)), sender=owner)
            breaks.append(Break(i, rb.step, f"a rollback at log entry {i}", h.digest.hex()))
        elif h.kind == "handover":
            handovers.append((len(breaks) + 1, Handover.parse(unpack(doc(plog, i)),
                                                              sender=owner)))
    return breaks, handovers


def _first_span(who: str, holders: list[tuple[str, ...]], owner: str) -> int:
    """The span `who`'s chain starts in: 0, or for a standby the span before the one it first
    holds a stage in (its `restored` there moves it on)."""
    if who == owner:
        return 0
    held = [j for j, names in enumerate(holders) if who in names]
    return max(held[0] - 1, 0) if held else 0


def _placed(who: str, chain: list[tuple[int, Header]], breaks: list[Break], span: int,
            answers: dict[int, Restored], legacy: bool) -> list[Placed]:
    """`who`'s entries in chain order, each with its span (`answers`: every `restored` by
    entry; `legacy`: a log from before `restored` named its rollback)."""
    out = []
    for i, h in chain:
        if span < len(breaks):
            if h.kind == "rollback" and breaks[span].entry == i:  # the owner's own
                span += 1
            elif h.kind == "restored":
                span = _answered(answers[i], breaks, span, legacy)
        out.append(Placed(i, h, who, span))
    return out


def _answered(done: Restored, breaks: list[Break], span: int, legacy: bool = False) -> int:
    """The span a trainer is in after `done`, from span `span`: past the rollback it answers
    (its header digest, and step; in a `legacy` log, the next rollback's step), or still
    `span`."""
    for j in range(span, len(breaks)):
        b = breaks[j]
        if done.rollback and done.answers(b.step, b.digest):
            return j + 1
        if legacy and j == span and b.step == done.step:
            return j + 1
    return span
