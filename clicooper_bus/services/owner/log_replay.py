"""What a resumed owner learns from the run's log (issue 17), as a part of `process.Owner`
(through `resume.Resumes`): its books as the dead process held them (`_replay_log`: each
trainer's snapshot commitments, its own round snapshot commitments, the watermark chain, the
checkpoints, the hellos, the handovers and rollbacks, the rejoins the live owner took), and the
messages its dead process signed that the log missed, sent again from its outbox
(`_replay_own`), counted as if logged."""

from __future__ import annotations

import time

from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol.recovery import ChainTip, Handover, Rejoin, Rollback, Snapshot
from clicooper_bus.services.owner.rejoins import follows_a_tip
from clicooper_bus.tlog.log import ProvenanceLog


class LogReplay:
    """The log-replay methods of `process.Owner` (a mixin: it uses the owner's books, cfg,
    layout, stages, tips, handovers and `_take_over`)."""

    def _replay_log(self) -> None:
        """Our books from the run's log (read only; the notary appends meanwhile): each
        trainer's snapshot commitments (those of a timeline a logged rollback abandoned
        dropped), the watermark chain, the checkpoints, the hellos, each trainer's last logged
        seq (a restarted one's `rejoin` follows it), the rollbacks so far, and the hash of each
        trainer's first answer of every step (`Books.compare`). Raises
        ClicooperError for a run that finished or stopped, or whose log did not keep a body
        needed here."""
        b, owner = self.books, self.cfg.participants.owner
        logged_tips: dict[str, set[int]] = {}  # trainer -> the seqs of the notary's tips to it
        last: dict[str, int] = {}  # trainer -> its last logged seq
        self.logged_rejoins: dict[str, tuple[str, Rejoin]] = {}  # digest -> (trainer, rejoin)
        handlers = {"snapshot": self._replayed_snapshot, "wm_commit": b.on_commit,
                    "wm_claim": b.on_claim,
                    "wm_cert": b.on_certificate, "checkpoint": b.on_checkpoint,
                    "hello": b.on_hello, "rollback": self._replayed_rollback,
                    "round": self._replayed_round,
                    "tip": lambda env: self._replayed_tip(env, logged_tips),
                    "rejoin": lambda env: self._replayed_rejoin(env, logged_tips),
                    "handover": self._replayed_handover}
        with ProvenanceLog.open(self.layout.log) as plog:
            for i in range(plog.size):
                h, sig, body = plog.entry(i)
                name = b.names.get(h.sender)
                if name in self.stages:
                    last[name] = h.seq
                if h.kind == "end" and name == owner:
                    raise ClicooperError(f"the log holds the owner's end (entry {i}): the run "
                                         f"finished or stopped; there is nothing to resume")
                if h.kind in ("fwd", "bwd") and h.to == owner and name in self.stages:
                    b.compare(Envelope(h.topic, h, sig, b""))  # (the header's hash suffices)
                if h.kind not in handlers:
                    continue
                if body is None:
                    raise ClicooperError(f"the log did not keep the body of entry {i} "
                                         f"({h.kind}), which a resumed owner needs ([log] "
                                         f"retention): this run cannot be resumed")
                handlers[h.kind](Envelope(h.topic, h, sig, body))
        for name, seq in last.items():  # a trainer restarted with us goes on from there
            self.tips.setdefault(name, {})[seq] = time.monotonic()  # (until our rollback)
        b.final_note = None

    def _replay_own(self, resent: list[Envelope]) -> None:
        """Our dead process's messages the log missed, sent again from our outbox: they count
        as if logged (`_replay_log`), and an `end` among them means the run had ended. Raises
        ClicooperError for that."""
        handlers = {"snapshot": self._replayed_snapshot, "rollback": self._replayed_rollback,
                    "round": self._replayed_round, "handover": self._replayed_handover}
        handovers = len(self.handovers)
        for env in resent:
            if env.header.kind == "end":
                raise ClicooperError(f"our dead process sent its end (seq {env.header.seq}), "
                                     f"which the log missed: the run finished or stopped; "
                                     f"there is nothing to resume")
            if env.header.kind in handlers:
                handlers[env.header.kind](env)
        if len(self.handovers) > handovers:
            self._stages_changed()

    def _replayed_snapshot(self, env) -> None:
        """A logged `snapshot`: a trainer's commitment (`Books.on_snapshot`), or our own to a
        round snapshot file (the last of a step counts: a step's row is written twice)."""
        owner = self.cfg.participants.owner
        if self.books.names[env.header.sender] != owner:
            self.books.on_snapshot(env)
            return
        snap = Snapshot.parse(env.document(), sender=owner)
        self.committed_rounds[snap.step] = snap.state

    def _replayed_tip(self, env, logged_tips: dict[str, set[int]]) -> None:
        """A logged `tip` of the notary's to a trainer: a `rejoin` that follows it is a
        restarted process's, as the live owner judged (`_not_restarted`)."""
        notary = self.cfg.participants.notary
        if self.books.names[env.header.sender] != notary:
            return
        tip = ChainTip.parse(env.document(), sender=notary)
        if tip.member in self.stages:
            logged_tips.setdefault(tip.member, set()).add(tip.seq)

    def _replayed_rejoin(self, env, logged_tips: dict[str, set[int]]) -> None:
        """A logged `rejoin` that followed the notary's tip to its sender (a restarted
        process's) is held until a logged rollback names it (`_replayed_rollback`): only then
        did the live owner take it, and its snapshot digests are that trainer's commitments
        too. One the live owner refused (a live member's) commits to nothing here either."""
        name = self.books.names[env.header.sender]
        rejoin = Rejoin.parse(env.document(), sender=name)
        if follows_a_tip(rejoin, env.header.seq, logged_tips.get(name, set())):
            self.logged_rejoins[env.header.digest.hex()] = (name, rejoin)

    def _replayed_handover(self, env) -> None:
        """A logged `handover` of ours: the standby holds the stage from then on, as after
        the live handover (`Handovers._take_over`)."""
        owner = self.cfg.participants.owner
        if self.books.names[env.header.sender] != owner:
            return
        h = Handover.parse(env.document(), sender=owner)
        self._take_over(h.stage, h.round, h.step, h.replaced, h.by, env)

    def _replayed_round(self, env) -> None:
        if self.books.names[env.header.sender] == self.cfg.participants.owner:
            self.books.on_round(env)

    def _replayed_rollback(self, env) -> None:
        if self.books.names[env.header.sender] != self.cfg.participants.owner:
            return
        rb = Rollback.parse(env.document(), sender=self.cfg.participants.owner)
        held = self.logged_rejoins  # (from `_replay_log`)
        # the rejoins it names (in a log from before `rejoins`, a rollback for a trainer's
        # rejoin: that trainer's held ones, as then); the others stay held for a later one
        named = rb.rejoins if rb.rejoins is not None else \
            [d for d, (n, _) in held.items() if n == rb.rejoined]
        for digest in named:
            if digest in held:
                name, rejoin = held.pop(digest)
                mine = self.books.snapshots.setdefault(name, {})
                for step, state in zip(rejoin.steps, rejoin.states, strict=True):
                    mine.setdefault(step, Snapshot(step, "", state))
        for n in self.stages:
            self.books.snapshots[n] = {k: v for k, v in self.books.snapshots.get(n, {}).items()
                                       if k <= rb.step}
        self.rollbacks += rb.rejoined != self.cfg.participants.owner  # a resume is not one
