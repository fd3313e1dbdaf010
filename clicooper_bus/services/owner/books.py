"""The owner's books: what the control traffic of a run tells it, kept by the handlers of its
receive loop. Trainers' hellos, the last stage's metrics, the notary's checkpoints, the CPU
every trainer and the notary measured of itself, and the watermark chain's commitments, claims
and certificates."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import structlog

from clicooper_bus.chain.certificate import open_certificate
from clicooper_bus.chain.documents import Claim, Commit
from clicooper_bus.errors import ClicooperError, PoisonedInput
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol import (
    CheckpointMessage,
    Hello,
    Metrics,
    ProtocolError,
    Round,
    Usage,
    WatermarkCertificate,
)
from clicooper_bus.protocol.recovery import Restored, Snapshot
from clicooper_bus.tlog.checkpoint import open_checkpoint


@dataclass
class Books:
    stages: list[str]  # trainer names in stage order
    names: dict[str, str]  # key id -> name
    notary_key: PublicIdentity
    origin: str  # the checkpoint origin of the run
    model_spec: str  # the roster's model digest every trainer must have built
    in_flight: int  # the roster's schedule every trainer must follow
    ready: set[str] = field(default_factory=set)
    metrics: dict[int, Metrics] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)
    final_note: str | None = None
    commits: dict[tuple[int, int], Commit] = field(default_factory=dict)
    claims: dict[tuple[int, int], Claim] = field(default_factory=dict)
    # (stage, round) -> SHA-256 of the claim's leaf: what the next round's commitment links to
    claim_digests: dict[tuple[int, int], bytes] = field(default_factory=dict)
    certs: dict[tuple[int, int], bytes] = field(default_factory=dict)
    usage: dict[str, Usage] = field(default_factory=dict)  # name -> the CPU it reported
    sent: int = 0  # training steps the owner has sent (0 .. sent - 1)
    closed: bool = False  # the owner's `end` is out: no step's metrics may come any more
    # each trainer's snapshot commitments (name -> step -> its `snapshot`, or its `rejoin`'s)
    snapshots: dict[str, dict[int, Snapshot]] = field(default_factory=dict)
    restored: dict[str, Restored] = field(default_factory=dict)  # since the last rollback
    fenced: set[str] = field(default_factory=set)  # key ids whose data is stale (a rollback)
    rolled_back: tuple[int, str] | None = None  # the last rollback sent (step, header digest):
    # only its answer lifts a fence
    # (kind, key id, step) -> the body's SHA-256 of the first `fwd` or `bwd` received for it
    received: dict[tuple[str, str, int], bytes] = field(default_factory=dict)
    replayed_steps: int = 0  # steps trained again after rollbacks
    replays_compared: int = 0  # messages received again after a rollback, equal to the first
    replays_differing: int = 0  # ... not equal to it (in_flight > 1 only; else a refusal)
    said: tuple[int, str] | None = None  # the owner's last `round`: (round, phase)

    def _stage(self, env: Envelope) -> int:
        return self.stages.index(self.names[env.header.sender]) + 1

    def on_hello(self, env: Envelope) -> None:
        """A trainer built the roster's model and follows its schedule, or the run stops."""
        name = self.names[env.header.sender]
        hello = Hello.parse(env.document(), sender=name)
        if hello.model_spec != self.model_spec:
            raise ClicooperError(f"{name} built a different model ({hello.to_doc()})")
        if hello.in_flight != self.in_flight:
            raise ClicooperError(
                f"{name} follows a schedule of {hello.in_flight} batch(es) in flight, the "
                f"roster asks for {self.in_flight}: a trainer older than pipelining? Update "
                f"it, or set [run] in_flight = 1")
        self.ready.add(name)

    def on_metrics(self, env: Envelope) -> None:
        """The last stage's loss and count of one step: only for a step the owner sent whose
        metrics have not come, and not after the owner's `end`. Anything else is refused
        naming the sender (a clean stop, `stopped` in the summary), not ignored: the message is
        signed and in the log, so the run's evidence holds a claim about a step that was never
        trained (or a second, different one); the summary must say the run stopped on it
        rather than certify a model beside it."""
        name, step = self.names[env.header.sender], env.header.step
        if self.stale(env):
            return

        def refuse(problem: str) -> PoisonedInput:
            return PoisonedInput(sender=name, kind="metrics", step=step, problem=problem)

        if self.closed:
            raise refuse("metrics after the owner ended training")
        if step is None or not 0 <= step < self.sent:
            raise refuse(f"metrics for a step the owner never sent (steps sent: 0..{self.sent - 1})")
        if step in self.metrics:
            raise refuse("metrics for this step a second time")
        try:  # a non-finite loss is never kept (the summary would carry it): the run stops
            self.metrics[step] = Metrics.parse(env.document(), sender=name)
        except ProtocolError as exc:
            raise PoisonedInput(sender=name, kind="metrics", step=step, problem=str(exc)) from None

    def on_snapshot(self, env: Envelope) -> None:
        """A trainer's commitment to its snapshot of a step (kept: a rollback goes to a step
        every stage committed, and its `restored` must match). The first commitment of a step
        stands until a rollback before it: one from a trainer that has not restored since the
        rollback is stale (dropped), the same one again is ignored, and another one is a
        refusal (PoisonedInput): a trainer could otherwise commit to the state it means to
        restore after the fact."""
        if self.stale(env):
            return
        name = self.names[env.header.sender]
        snap = Snapshot.parse(env.document(), sender=name)
        committed = self.snapshots.setdefault(name, {})
        first = committed.setdefault(snap.step, snap)
        if first != snap:
            raise PoisonedInput(sender=name, kind="snapshot", step=snap.step, problem=(
                f"a second, different commitment to its snapshot of step {snap.step} (state "
                f"sha256 {snap.state[:16]}..., committed {first.state[:16]}...)"))

    def on_restored(self, env: Envelope) -> None:
        """A trainer restored the rollback's snapshot: its data is current again."""
        name = self.names[env.header.sender]
        done = Restored.parse(env.document(), sender=name)
        if self.rolled_back is not None and done.answers(*self.rolled_back):
            self.restored[name] = done
            self.fenced.discard(env.header.sender)

    def compare(self, env: Envelope) -> None:
        """A trainer's `fwd` or `bwd` of a step: kept by its hash the first time; after a
        rollback, the step's is computed again from the same committed state and inputs, so
        with `in_flight` 1 it must be the same message body (counted). Another one is a refusal
        (PoisonedInput): a member answering a step twice differently would learn from the
        owner's two answers (its gradients, its tail's) more than one step releases. With
        `in_flight` > 1 the window restarts empty, so a step trained again may honestly differ:
        counted as differing, not refused."""
        h = env.header
        if h.kind not in ("fwd", "bwd") or h.step is None:
            return
        key = (h.kind, h.sender, h.step)
        first = self.received.get(key)
        if first is None:
            self.received[key] = h.body_sha256
            return
        if first != h.body_sha256 and self.in_flight > 1:
            self.replays_differing += 1
            return
        if first != h.body_sha256:
            raise PoisonedInput(sender=self.names[h.sender], kind=h.kind, step=h.step, problem=(
                f"after the rollback it sent another {h.kind} of step {h.step} than before "
                f"(sha256 {h.body_sha256.hex()[:16]}..., first {first.hex()[:16]}...): a step "
                f"trained again from the committed state computes the same"))
        self.replays_compared += 1

    def stale(self, env: Envelope) -> bool:
        """Whether `env` comes from a trainer that has not restored since the rollback: sent
        before it, about steps that will be trained again (dropped, logged)."""
        if env.header.sender not in self.fenced:
            return False
        structlog.get_logger("clicooper.owner").info(
            "stale message dropped", sender=self.names[env.header.sender], kind=env.header.kind,
            step=env.header.step)
        return True

    def on_usage(self, env: Envelope) -> None:
        """A trainer's or the notary's measured CPU (the route admits only them; each signs
        its own). A second report from the same sender is ignored: the first is the evidence.
        An unreadable one is ignored too (logged), never a reason to stop the run."""
        name = self.names[env.header.sender]
        try:
            usage = Usage.parse(env.document(), sender=name)
        except ProtocolError as exc:
            # The report is only its sender's word about itself and nothing depends on it:
            # stopping here would let one trainer throw away a finished run. It is left out of
            # the table (listed as missing), and the log keeps the signed message as sent.
            structlog.get_logger("clicooper.owner").warning("unreadable usage report ignored",
                                                            sender=name, problem=str(exc))
            return
        if name in self.usage:
            structlog.get_logger("clicooper.owner").warning("repeated usage report ignored",
                                                            sender=name)
            return
        self.usage[name] = usage

    def on_checkpoint(self, env: Envelope) -> None:
        msg = CheckpointMessage.parse(env.document(), sender=self.names[env.header.sender])
        open_checkpoint(msg.note, self.notary_key, self.origin)
        self.checkpoints.append(msg.note)  # trainers key their marks to these roots
        if msg.final:
            self.final_note = msg.note

    def on_commit(self, env: Envelope) -> None:
        c = self._document(env, Commit)
        self.commits[(self._stage(env), c.round)] = c

    def on_claim(self, env: Envelope) -> None:
        """A trainer's claim of a round: taken only for the round the owner ended last (its
        `round end`, `said`), once per stage. The same claim again is ignored; a claim of
        another round, or a second different one, is a refusal (PoisonedInput): a claim of a
        far round would move the earliest step a rollback may go to past the run's end."""
        c = self._document(env, Claim)
        key, name = (self._stage(env), c.round), self.names[env.header.sender]
        digest = hashlib.sha256(env.leaf).digest()
        if key in self.claims:
            if self.claims[key] != c:
                raise PoisonedInput(sender=name, kind="wm_claim", step=None, problem=(
                    f"a second, different claim of round {c.round}"))
            return
        if self.said != (c.round, "end"):
            asked = f"round {self.said[0]} {self.said[1]}" if self.said else "no round yet"
            raise PoisonedInput(sender=name, kind="wm_claim", step=None, problem=(
                f"a claim of round {c.round}, but the owner's last word was {asked}"))
        self.claims[key] = c
        self.claim_digests[key] = digest

    def on_round(self, env: Envelope) -> None:
        """The owner's own `round` as logged (a resumed owner replaying its log): which
        round's claims are taken now, as when it said it."""
        r = Round.parse(env.document(), sender=self.names[env.header.sender])
        self.said = (r.round, r.phase)

    def on_certificate(self, env: Envelope) -> None:
        msg = WatermarkCertificate.parse(env.document(), sender=self.names[env.header.sender])
        try:
            cert, _ = open_certificate(msg.certificate, self.notary_key, self.origin)
        except ClicooperError as exc:
            raise ClicooperError(f"the notary sent a certificate that does not verify: "
                                 f"{exc}") from None
        self.certs[(cert.stage, cert.round)] = bytes(msg.certificate)

    def _document(self, env: Envelope, cls):
        try:
            return cls.from_doc(env.document())
        except ValueError as exc:
            raise ClicooperError(f"{self.names[env.header.sender]} sent a malformed "
                                 f"{env.header.kind} message: {exc}") from None

    def have(self, table: dict, round_: int) -> bool:
        """Whether every stage's entry of `round_` is in `table` (commits or claims)."""
        return {(k, round_) for k in range(1, len(self.stages) + 1)} <= set(table)
