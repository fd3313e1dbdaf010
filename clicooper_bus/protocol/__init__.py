"""The protocol page: every topic of a run, and every control message as a typed document.

Topics (`Topics`) are `run/<run id>/<kind>/<to>/`; subscribers filter by prefix, and the closing
`/` keeps the inbox of `trainer-1` from being a prefix of `trainer-10`'s (the broker lets a
trainer subscribe to its own inbox only). Besides the
message topics, four are only ever *subscribed to*, never published on: they are signals a
participant gives by subscribing (the broker forwards subscriptions to every publisher):

| signal                 | who subscribes        | meaning                                             |
| ---------------------- | --------------------- | --------------------------------------------------- |
| `hello/<name>`         | every participant     | its subscriptions are live (the last it makes)      |
| `watching/<name>`      | an auditor following  | keep the run open until it is done                  |
| `done/<name>`          | every participant     | it read all it needs of the run                     |
| `closed/<name>`        | the notary            | it closed the log; lingering peers may leave        |

Control messages (the msgpack bodies of the kinds below; tensors are `fwd`, `bwd`, `labels`,
`eval_fwd`, `eval_out`, documents of the watermark chain are `clicooper_bus.chain.documents`;
those of snapshots, restarts, rollbacks and handovers are in `protocol.recovery`, the notary's
proof of equivocation in `net.equivocation`):

| kind         | from → to            | document                                            |
| ------------ | -------------------- | --------------------------------------------------- |
| `hello`      | trainer → all        | `Hello`: it built the roster's model and schedule   |
| `metrics`    | last stage → owner   | `Metrics`: a training step's loss and correct count |
| `round`      | owner → all          | `Round`: a watermark round starts or ends           |
| `end`        | owner → all          | `End`: training is over, deliver segments (or, with |
|              |                      | `stopped`, the run stops early: deliver nothing)    |
|              | trainer → owner      | `End` with `refused`: it refused poisoned input     |
| `segment`    | trainer → owner      | `Segment`: its weights, sealed to the owner         |
| `usage`      | trainer, notary →    | `Usage`: the CPU seconds it measured, and its steps |
|              | owner; owner → all   | (the owner's own, so the log holds every number)    |
| `ack`        | owner → all          | `Ack`: every segment arrived; the model's digest    |
| `checkpoint` | notary → all         | `CheckpointMessage`: a signed tlog checkpoint note  |
| `wm_cert`    | notary → all         | `WatermarkCertificate`: a certified claim           |
| `beat`       | everyone → all       | `Beat`: liveness, an empty map                      |
| `snapshot`   | trainer → owner      | `Snapshot`: it snapshotted its stage at a step: the |
|              |                      | step and the digests of its weights and its state   |
|              | owner → all          | `Snapshot` of its round snapshot file (`state`: the |
|              |                      | file's SHA-256), which a resumed owner checks       |
| `tip`        | notary → trainer     | `ChainTip`: the last seq and header digest of the   |
|              |                      | trainer the log holds (a restarted one continues),  |
|              |                      | and its watermark chain's newest logged messages    |
| `rejoin`     | trainer → owner      | `Rejoin`: a restarted trainer, with the snapshots   |
|              |                      | (steps, state digests) it can restore               |
| `rollback`   | owner → all          | `Rollback`: everyone restores the step's snapshot;  |
|              |                      | steps from it on are trained (and logged) again     |
| `restored`   | trainer → all        | `Restored`: it restored that step (state digest),   |
|              |                      | naming the rollback by its header's digest          |
| `stage_state`| trainer → owner      | `StageState`: its whole stage state at a round      |
|              |                      | boundary, sealed to the owner (with standbys, or    |
|              |                      | the roster's `states` meta, for replay spans)       |
| `handover`   | owner → all          | `Handover`: a gone trainer's stage goes to a        |
|              |                      | standby, with its committed state sealed to it      |
| `equivocation` | notary → all       | `net.equivocation.Equivocation`: the two signed     |
|              |                      | leaves proving a member signed two messages at one  |
|              |                      | place of its chain (the owner stops the run; the    |
|              |                      | owner's own: the notary does, trainers leave)       |
| `witnessed`  | member → notary      | `recovery.Witnessed`: the leaves of what a member   |
|              |                      | accepted lately, after the notary's `tip` with      |
|              |                      | `resend`, compared with the log (`net.witness`)     |

Each document is parsed strictly from the *verified* body: it must be a map with exactly the
documented fields, each of its exact type (msgpack's True is not an int here, nor 1 a float); an
unknown or missing field is refused with `ProtocolError`, naming the sender, the kind and the
field. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

from clicooper_bus.errors import ClicooperError


class ProtocolError(ClicooperError):
    """A verified message whose document breaks the protocol: names the sender and field."""

    def __init__(self, message: str, *, sender: str | None, kind: str, field_: str | None = None):
        who = sender or "an unknown sender"
        super().__init__(f"{who} sent a malformed {kind} message: {message}")
        self.sender, self.kind, self.field = sender, kind, field_


SIGNALS = ("hello", "watching", "done", "closed")  # the kinds of the signal topics above


@dataclass(frozen=True)
class Topics:
    """Every topic of one run. `Topics("demo").to("fwd", "trainer-1")` is
    `run/demo/fwd/trainer-1/`."""

    run_id: str

    @property
    def all(self) -> str:
        """The prefix of every topic of the run (what the notary subscribes to)."""
        return f"run/{self.run_id}/"

    def kind(self, kind: str) -> str:
        """The prefix of every message of `kind`, whoever it is addressed to."""
        return f"run/{self.run_id}/{kind}/"

    def to(self, kind: str, to: str) -> str:
        """The topic of a `kind` message addressed to `to` (a name, or `all`)."""
        return f"run/{self.run_id}/{kind}/{to}/"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(kind, to) of a whole topic of this run, or None if `topic` is not one."""
        if not topic.startswith(self.all) or not topic.endswith("/"):
            return None
        parts = topic[len(self.all):-1].split("/")
        return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None

    # the signals: subscribed to, never published on
    def hello(self, name: str) -> str:
        return self.to("hello", name)

    def watching(self, name: str) -> str:
        return self.to("watching", name)

    def done(self, name: str) -> str:
        return self.to("done", name)

    def closed(self, name: str) -> str:
        return self.to("closed", name)


M = TypeVar("M", bound="Control")


class Control:
    """A control document: a frozen dataclass whose fields are the map's keys."""

    KIND: ClassVar[str] = ""

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls: type[M], doc: Any, *, sender: str | None = None) -> M:
        """The document `doc` (a decoded msgpack body) as this type.
        Raises ProtocolError naming `sender`, the kind and the field that is wrong."""
        if type(doc) is not dict:
            raise ProtocolError(f"the body is a {type(doc).__name__}, not a map",
                                sender=sender, kind=cls.KIND)
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in doc if k not in known)
        if unknown:
            raise ProtocolError(f"unknown field {unknown[0]!r}", sender=sender, kind=cls.KIND,
                                field_=unknown[0])
        hints = _hints(cls)
        values = {}
        for f in fields(cls):
            if f.name not in doc:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ProtocolError(f"field {f.name!r} is missing", sender=sender,
                                        kind=cls.KIND, field_=f.name)
                continue
            if not _fits(doc[f.name], hints[f.name]):
                raise ProtocolError(f"field {f.name!r} is not {_name(hints[f.name])}",
                                    sender=sender, kind=cls.KIND, field_=f.name)
            values[f.name] = doc[f.name]
        return cls(**values)._checked(sender)

    def _checked(self: M, sender: str | None) -> M:
        """Range checks beyond the types; subclasses raise ProtocolError."""
        return self

    def _refuse(self, message: str, field_: str, sender: str | None) -> ProtocolError:
        return ProtocolError(message, sender=sender, kind=self.KIND, field_=field_)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A class's resolved field types, once (resolving costs ~80 us: metrics come every step)."""
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a decoded msgpack value is exactly of the annotated type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return type(value) is list and all(_fits(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return type(value) is dict and all(_fits(a, k) and _fits(b, v) for a, b in value.items())
    return type(value) is hint


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


@dataclass(frozen=True)
class Hello(Control):
    """A trainer built the roster's model (`model_spec`, its digest) and follows its schedule
    (`in_flight`; a trainer from before pipelining sent none, and means 1). `threads`: the
    torch intra-op threads it computes with, which replay verification must use to compute
    the same bits (`audit.training_replay`); 0 from a trainer that did not say."""

    KIND: ClassVar[str] = "hello"
    ready: bool
    stage: int
    model_spec: str
    in_flight: int = 1
    threads: int = 0

    def _checked(self, sender: str | None) -> Hello:
        if not 0 <= self.threads <= 4096:
            raise self._refuse(f"threads is {self.threads}, not 0..4096", "threads", sender)
        return self


@dataclass(frozen=True)
class Metrics(Control):
    """The last stage's result for one training step (the step is in the header)."""

    KIND: ClassVar[str] = "metrics"
    loss: float
    correct: int

    def _checked(self, sender: str | None) -> Metrics:
        if not math.isfinite(self.loss):
            raise self._refuse(f"loss is {self.loss}", "loss", sender)
        if self.correct < 0:
            raise self._refuse("correct is negative", "correct", sender)
        return self


@dataclass(frozen=True)
class Round(Control):
    """A watermark round (an epoch) starts or ends."""

    KIND: ClassVar[str] = "round"
    round: int
    phase: Literal["start", "end"]

    def _checked(self, sender: str | None) -> Round:
        if self.round < 0:
            raise self._refuse("round is negative", "round", sender)
        return self


@dataclass(frozen=True)
class End(Control):
    """Training is over: from the owner to all, trainers deliver their segments. `stopped`: the
    run stops early instead (a refusal: nothing is delivered, the notary signs a final
    checkpoint over what it logged). From a trainer to the owner, `refused` says what input it
    refused (`PoisonedInput.to_doc`: sender, kind, problem, step), and the owner stops the run.
    Both fields are sent only when set, so a plain end is the map owners always sent."""

    KIND: ClassVar[str] = "end"
    reason: str
    stopped: bool = False
    refused: dict[str, str | int] | None = None

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"reason": self.reason}
        if self.stopped:
            doc["stopped"] = True
        if self.refused is not None:
            doc["refused"] = dict(self.refused)
        return doc

    def _checked(self, sender: str | None) -> End:
        if self.refused is not None and not {"sender", "kind", "problem"} <= set(self.refused):
            raise self._refuse("refused must name sender, kind and problem", "refused", sender)
        return self


@dataclass(frozen=True)
class Segment(Control):
    """A trainer's final weights (safetensors bytes sealed to the owner's key) and how many
    messages of each kind it sent before this one."""

    KIND: ClassVar[str] = "segment"
    stage: int
    sealed: bytes
    sent: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage(Control):
    """The compute a process measured of itself, from the OS: CPU seconds (user + system, every
    thread, `time.process_time()`) from its start until it sent this (`cpu_s`), and over its
    training window, from the start of its first training step to the end of its last
    (`train_cpu_s`, in `train_wall_s` wall seconds, `steps` steps; evaluation between epochs
    falls inside the window, the final one after it). Who measured it is the header's signer:
    the document names nobody, so a sender can report only its own."""

    KIND: ClassVar[str] = "usage"
    cpu_s: float
    train_cpu_s: float
    train_wall_s: float
    steps: int

    def _checked(self, sender: str | None) -> Usage:
        for name in ("cpu_s", "train_cpu_s", "train_wall_s", "steps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise self._refuse(f"{name} is {value}: not a finite number >= 0", name, sender)
        if self.train_cpu_s > self.cpu_s:
            raise self._refuse("train_cpu_s is more than cpu_s: the training window is part of "
                               "the process's life", "train_cpu_s", sender)
        return self

    @property
    def cpu_s_per_step(self) -> float | None:
        """Training-window CPU seconds per step; None for a process that took no step."""
        return self.train_cpu_s / self.steps if self.steps else None


def cpu_table(reports: list[tuple[str, str, Usage | None]]) -> dict[str, Any]:
    """The run's measured CPU, from each process's `Usage` (`reports`: name, roster role and
    its usage, None where none came): a row per process that reported, the names of those that
    did not, and `owner_cpu_share`, the owner's training-window CPU over the owner's and the
    trainers' together (None unless the owner and every trainer reported; the notary and the
    broker run the bus, not the model, and are not in it). The numbers are self-reported: a
    trainer whose step count is not the owner's is listed under `implausible` and the share is
    then None; anything subtler (an inflated CPU time) cannot be told from a true one, so the
    FLOPs share from the signed plan stays the figure an auditor can check."""
    rows, missing = [], []
    for name, role, u in reports:
        if u is None:
            missing.append(name)
            continue
        per_step = u.cpu_s_per_step
        rows.append({"name": name, "role": role, "cpu_s": round(u.cpu_s, 4),
                     "train_cpu_s": round(u.train_cpu_s, 4),
                     "train_wall_s": round(u.train_wall_s, 4), "steps": u.steps,
                     "cpu_s_per_step": None if per_step is None else round(per_step, 6)})
    computing = [(role, u) for _, role, u in reports if role in ("owner", "trainer")]
    owner = sum(u.train_cpu_s for role, u in computing if role == "owner" and u is not None)
    total = sum(u.train_cpu_s for _, u in computing if u is not None)
    whole = all(u is not None for _, u in computing) and any(r == "owner" for r, _ in computing)
    # Each number is its sender's own claim (signed, not verifiable): a trainer could inflate
    # its CPU to shrink the owner's share. What can be checked is that every computing process
    # counted the owner's steps; a report that did not is named and the share is withheld.
    owner_steps = {u.steps for _, role, u in reports if role == "owner" and u is not None}
    implausible = [name for name, role, u in reports if role == "trainer" and u is not None
                   and owner_steps and u.steps not in owner_steps]
    share = owner / total if whole and total > 0 and not implausible else None
    return {"processes": rows, "missing": missing, "implausible": implausible,
            "owner_cpu_share": share}


@dataclass(frozen=True)
class Ack(Control):
    """Every segment arrived; `model_sha256` (hex) puts the assembled model's digest in the log."""

    KIND: ClassVar[str] = "ack"
    segments: list[str]
    model_sha256: str


@dataclass(frozen=True)
class CheckpointMessage(Control):
    """A C2SP checkpoint note signed by the notary. `final`: the owner acknowledged the end of
    training; `closed`: the log is closed, nothing is appended after it."""

    KIND: ClassVar[str] = "checkpoint"
    note: str
    final: bool = False
    closed: bool = False

    def to_doc(self) -> dict[str, Any]:
        doc = {"note": self.note, "final": self.final}
        return {**doc, "closed": True} if self.closed else doc  # as notaries always sent it


@dataclass(frozen=True)
class WatermarkCertificate(Control):
    """The notary's certificate (`clicooper_bus.chain.certificate`) of a stage's round."""

    KIND: ClassVar[str] = "wm_cert"
    stage: int
    round: int
    certificate: bytes


@dataclass(frozen=True)
class Beat(Control):
    KIND: ClassVar[str] = "beat"


def _is_digest(value: str) -> bool:
    """Whether `value` is a SHA-256 digest in lower-case hex (64 characters)."""
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
