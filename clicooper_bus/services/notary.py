"""The notary process: appends every message of the run to the provenance log (its own as it
sends them, before publishing: `Bus.own_first`) and signs checkpoints.

It trusts only the owner's key until the owner's signed roster arrives (the first message of a
run), then the roster's keys. Every message is verified in full (the notary sees every sender's
whole chain) before it is appended. Checkpoints are signed every N entries or T seconds,
published on the bus, and once more, marked final, when the owner acknowledges the end of the
run; just before that final checkpoint it reports its own measured CPU to the owner in a signed
`usage` message (its training window: from the first training message it logged to the last,
`fwd`, `bwd`, `labels` or `metrics`; its steps: the owner's training steps it logged). Once
every participant has signalled it read what it needed (`done`) it closes the log with a
published closing checkpoint over everything it logged; an auditor following the run audits
exactly that log, and the notary stays (logging nothing more) until it is done.

A trainer silent past `[bus] timeout_s` is sent a `tip` every `timeout_s` while it stays
silent: the last seq of its signed chain the log holds and that message's header digest. A
process of that trainer restarted after a crash continues its chain from there (only the notary
knows which of the dead process's last messages reached the log), so the log's chains stay
whole; a paused trainer that resumes ignores them. With watermarks on, a tip also carries the
trainer's newest logged watermark commitment and claim and the previous stage's next
commitment (`WatermarkRegistry.marks_of`), from which the restarted process recovers its
marker (`chain.resume`). The tips are logged like every message.

    python -m clicooper_bus.services.notary --config FILE
"""

from __future__ import annotations

import os
import sys
import time

from clicooper_bus.chain.certificate import Certificate, issue
from clicooper_bus.chain.documents import Commit
from clicooper_bus.chain.registry import WatermarkRegistry
from clicooper_bus.config import RunConfig
from clicooper_bus.errors import ClicooperError, LogFull
from clicooper_bus.layout import RunLayout
from clicooper_bus.net.bus import Bus, BusError
from clicooper_bus.net.equivocation import Equivocation
from clicooper_bus.net.liveness import PeersGone
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Envelope
from clicooper_bus.protocol import CheckpointMessage, End, WatermarkCertificate
from clicooper_bus.services.common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_STOPPED,
    base_parser,
    identity,
    load,
    open_bus,
    open_roster,
    public,
    run_main,
)
from clicooper_bus.services.notary_evidence import NotaryEvidence
from clicooper_bus.services.notary_restarts import NotaryRestarts
from clicooper_bus.services.usage import CpuMeter
from clicooper_bus.tlog.log import ProvenanceLog


class Notary(NotaryRestarts, NotaryEvidence):
    def __init__(self, cfg: RunConfig, log, resume: bool = False):
        self.cfg, self.log, self.resume = cfg, log, resume
        self.ident = identity(cfg, cfg.participants.notary)
        self.owner_key = public(cfg, cfg.participants.owner)
        verifier = Verifier({self.owner_key.key_id: self.owner_key}, cfg.run.id,
                            roster_first=True)
        self.bus: Bus = open_bus(cfg, self.ident, verifier, witness=True)
        self.plog: ProvenanceLog | None = None
        self.roster: Roster | None = None
        self.last_cp_size, self.last_cp_time = 0, time.monotonic()
        self.final_sent = False
        self.acked = False  # the owner's ack came: the final checkpoint once the log has no gap
        self.owner_proven = False  # the owner equivocated: we stop the run (`_stop_for_the_owner`)
        self.log_closed = False  # the closing checkpoint is signed: nothing more is appended
        self.meter = CpuMeter()  # the notary's CPU over the run's training steps (`usage`)
        self.logged_steps: set[int] = set()  # of the owner's training activations
        self.gone: set[str] = set()  # members silent past the rejoin timeout (not the owner)
        self.chains: dict[str, tuple[int, bytes]] = {}  # key id -> (seq, header digest) logged
        self.tipped: dict[str, float] = {}  # key id -> when we last sent it its chain's tip
        self.gap_since: dict[str, float] = {}  # key id -> since when its chain has a gap
        self.logged_at: dict[tuple[str, int], int] = {}  # (key id, seq) -> log index
        self.accused: set[str] = set()  # key ids proven to have equivocated
        self.witness_docs: dict[str, int] = {}  # key id -> `witnessed` documents it may send us
        self.compared: set[bytes] = set()  # SHA-256 of each `witnessed` leaf compared already
        self.evidence: list[Equivocation] = []  # proofs found, not yet published
        # headers refused ahead of a gap: sender -> seq -> (digest, leaf)
        self.ahead: dict[str, dict[int, tuple[bytes, bytes]]] = {}
        self.bus.on_conflict = self._conflict
        self.bus.own_first(self._log_own)

    def run(self) -> int:
        if self.cfg.log.notary_nice:
            # on a shared machine the notary's hashing should not take cores from the chain of
            # training steps; it catches up while they wait on the network
            os.nice(self.cfg.log.notary_nice)
        bus = self.bus
        bus.subscribe(bus.topics.all)
        bus.announce()
        deadline = time.monotonic() + self.cfg.bus.join_timeout_s
        try:
            if self.resume:
                self._reopen()
            else:
                self.log.info("notary waiting for the roster", run_id=self.cfg.run.id)
            while self.roster is None:
                env = bus.recv(1.0)
                if env is not None:
                    self._first(env)
                elif time.monotonic() > deadline:
                    raise BusError("no roster from the owner within the join timeout")
            return self._serve()
        except LogFull as exc:  # the disk is full: say where, how much; the log stays verifiable
            self.log.error("log full", path=exc.path, needed=exc.needed, free=exc.free,
                           entries=exc.entries)
            raise
        finally:
            if self.plog is not None:
                try:  # a last checkpoint over what was logged, if the disk still takes one
                    self._checkpoint(publish=False)
                except LogFull as exc:
                    self.log.warning("no last checkpoint: the disk is full", error=str(exc))
                self.plog.close()
            bus.close()

    def _first(self, env: Envelope) -> None:
        if env.header.kind != "roster":
            self.log.warning("message before the roster ignored", kind=env.header.kind)
            return
        roster = open_roster(env, self.owner_key, self.log)
        if roster is None:
            return
        path = RunLayout(self.cfg.run_dir).log
        self.plog = ProvenanceLog.create(path, roster_bytes=bytes(env.body),
                                         run_id=self.cfg.run.id, retention=self.cfg.log.retention,
                                         fsync=self.cfg.log.fsync, signer=self.ident)
        self.roster = roster
        self.bus.bind(roster)
        self._append(env)
        # signed at once, over the roster alone (before our first beat, which we log as we send
        # it): a notary killed at any later moment leaves a log with a signed checkpoint (a
        # short run's first periodic one came only at its end)
        self._checkpoint()
        plog = self.plog
        self.registry = WatermarkRegistry(
            roster, bytes(env.body), root_at=lambda n: plog.tree.root(n) if n <= plog.size else None)
        self.bus.start_beating()
        self.bus.watch({m.key_id: m.name for m in roster.members if m.role != "notary"})
        self.log.info("log created", path=str(path), members=len(roster.members))

    def _serve(self) -> int:
        bus, roster = self.bus, self.roster
        others = [m for m in roster.members if m.role != "notary"]
        done_wait_until = None
        while True:
            try:
                env = bus.recv(0.2)
            except PeersGone as exc:
                if roster.owner.name in exc.names and not self.owner_proven:
                    # nobody is left to stop the run cleanly
                    self.log.error("peers silent", error=str(exc))
                    print(f"notary: error: {exc}; the log is kept up to here", file=sys.stderr)
                    return EXIT_FAIL
                # the owner stops the run (its `end` with `stopped`): log it, sign, close
                self.log.warning("member gone; logging on until the owner stops the run",
                                 gone=exc.names)
                print(f"notary: {', '.join(exc.names)} gone; logging on until the owner stops "
                      f"the run", flush=True)
                self.gone.update(exc.names)
                bus.unwatch(exc.names)
                continue
            except BusError as exc:
                self.log.error("peers silent", error=str(exc))
                print(f"notary: error: {exc}; the log is kept up to here", file=sys.stderr)
                return EXIT_FAIL
            if self.evidence and self._accuse() and not self.final_sent:
                self._stop_for_the_owner()
            if self._chain_gap():
                # only a genuinely signed message can show a gap: one was lost on its way here,
                # or the broker refused one of the sender's own (an oversized body, say)
                print(f"notary: error: a sender's chain has had a gap for "
                      f"{self.cfg.bus.rejoin_timeout_s:.0f} s (rejoin_timeout_s): messages were "
                      f"lost before reaching the log and not sent again, or the broker refuses "
                      f"one of that sender's own (see its 'message refused' lines), so the log "
                      f"cannot be complete; stopping the run", file=sys.stderr)
                self.log.error("chain gap", rejected=dict(bus.verifier.rejected))
                return EXIT_FAIL
            if env is not None:
                index = self._append(env)
                self._register(env, index)
                self._meter(env)
                if env.header.kind == "witnessed":
                    self._witnessed(env)
                if env.header.kind == "ack" and env.header.sender == roster.owner.key_id:
                    self.acked = True
                elif self._stops(env) and not self.final_sent:
                    # the owner stopped the run early (a refusal): a final checkpoint over what
                    # was logged, then everyone leaves as after a finished run
                    self._checkpoint(final=True)
            if self.acked and not self.final_sent and not self._open_gaps():
                # the final checkpoint only over a log with no gap: what a member sends again
                # for a tip with `resend` comes before everyone leaves (after it, members
                # linger without reading tips); a gap that stays stops the run (`_chain_gap`)
                self._report_usage()
                self._checkpoint(final=True)
            if not self.final_sent:
                self._tips()
            now = time.monotonic()
            if self.plog.size - self.last_cp_size >= self.cfg.log.checkpoint_every or (
                    now - self.last_cp_time >= self.cfg.log.checkpoint_seconds):
                self._checkpoint()
            if self.final_sent:
                done = {bus.topics.done(m.name) for m in others if m.name not in self.gone
                        and m.key_id not in self.accused
                        and now - bus.last_seen.get(m.key_id, bus.started) <= bus.rejoin_timeout_s}
                # (a member silent past the rejoin timeout is gone: its `done` will not come;
                # the watch ended with the final checkpoint, so that is not noticed elsewhere)
                if done <= bus.seen_subscriptions:
                    break
                done_wait_until = done_wait_until or now + self.cfg.bus.join_timeout_s
                if now > done_wait_until:
                    self.log.warning("not everyone confirmed the end; closing anyway")
                    break
        # read whatever is still in flight, close the log with a published checkpoint over
        # everything (an auditor audits exactly that), then tell everyone we are closing: until
        # 0.3 s pass with nothing but beats (participants beat while they wait for us, every
        # 0.25 s in a fast-beating run: waiting for full quiet took the whole 2 s), 2 s at most
        drain_until = time.monotonic() + 2.0
        quiet_until = time.monotonic() + 0.3
        while (left := min(drain_until, quiet_until) - time.monotonic()) > 0:
            env = bus.recv(left)
            if env is None:
                break
            self._append(env)
            if env.header.kind != "beat":
                quiet_until = time.monotonic() + 0.3
        # a member never sent again what we missed: not a complete log (an equivocating member's
        # chain goes on from the message the log refused: the log holds the proof instead)
        gaps = self._open_gaps()
        if gaps:
            print("notary: error: a sender's chain has a gap the log cannot close (messages "
                  "sent while the notary was down and never sent again); not closing the log "
                  "as complete", file=sys.stderr)
            self.log.error("chain gap at closing", senders=gaps,
                           error="a sender's chain has a gap the log cannot close: messages "
                                 "sent while the notary was down were never sent again")
            return EXIT_FAIL
        self._checkpoint(closing=True)
        self._wait_for_observers()
        bus.subscribe(bus.topics.closed(self.cfg.participants.notary))
        time.sleep(0.3)
        self.log.info("notary done", entries=self.plog.size)
        return EXIT_STOPPED if self.owner_proven else EXIT_OK

    def _stop_for_the_owner(self) -> None:
        """The owner was proven to equivocate (the proof is published and logged): nobody but
        us is left to stop the run. A final checkpoint over the proof ends training for every
        trainer (each checks the proof itself and leaves); the log closes as after a stopped
        run, without waiting for the owner's `done`, and we exit EXIT_STOPPED."""
        self.owner_proven = True
        self.log.error("the owner equivocated; stopping the run")
        print("notary: the owner equivocated: stopping the run; the log closes over the proof",
              file=sys.stderr, flush=True)
        self._checkpoint(final=True)

    def _append(self, env: Envelope) -> int:
        """Append `env` to the log (its index), and remember where its sender's chain stands."""
        index = self.plog.append_envelope(env)
        self.chains[env.header.sender] = (env.header.seq, env.header.digest)
        self.logged_at[env.header.sender, env.header.seq] = index
        if self.ahead:
            self._filled(env)
        return index

    def _log_own(self, env: Envelope) -> None:
        """One of our own messages, logged before it is published (`Bus.own_first`); none
        once the log is closed (its closing checkpoint covers everything in it)."""
        if self.plog is not None and not self.log_closed:
            self._append(env)

    def _stops(self, env: Envelope) -> bool:
        """Whether `env` is the owner's `end` that stops the run early."""
        h = env.header
        if h.kind != "end" or h.sender != self.roster.owner.key_id:
            return False
        try:
            end = End.parse(env.document(), sender=self.roster.owner.name)
        except ClicooperError as exc:
            self.log.warning("malformed end from the owner", error=str(exc))
            return False
        if end.stopped:
            self.log.warning("the owner stopped the run", reason=end.reason)
        return end.stopped

    def _meter(self, env: Envelope) -> None:
        """The notary's training window: from the first training message it logs to the last
        (evaluation's are outside it, as they are for the owner and the trainers); a step
        counts once, with the owner's activation that starts it."""
        h = env.header
        if h.kind not in ("fwd", "bwd", "labels", "metrics", "logits"):
            return
        new = h.kind == "fwd" and h.sender == self.roster.owner.key_id and \
            h.step is not None and h.step not in self.logged_steps
        if new:
            self.logged_steps.add(h.step)
        self.meter.step_done(count=new)

    def _report_usage(self) -> None:
        """Our measured CPU, signed, to the owner, before the final checkpoint (which the owner
        waits for), so that its summary has it; it lands in the log like every message."""
        usage = self.meter.usage()
        self.bus.send_doc("usage", self.roster.owner.name, usage.to_doc())
        self.log.info("usage reported", **usage.to_doc())

    def _register(self, env: Envelope, index: int) -> None:
        """Watermark commitments and claims: a claim that holds is certified at once."""
        if env.header.kind == "handover":
            self._handed_over(env)
        refused = len(self.registry.refused)
        todo = self.registry.observe(env, index)
        for reason in self.registry.refused[refused:]:
            self.log.warning("watermark message refused", reason=reason)
            print(f"notary: refused a watermark message: {reason}", flush=True)
        if todo is None:
            return
        self._checkpoint(force=True)  # a signed tree that holds the claim
        note = self.plog.latest_note()
        # the tree it signs (the checkpoint message itself is logged after it: `_log_own`)
        size = self.plog.checkpoint_at(self.plog.checkpoint_count - 1).size
        keyed = Commit.from_doc(todo.commit.document()).log_size
        cert = Certificate(self.roster.run_id, todo.stage, todo.round, todo.commit, todo.claim,
                           todo.round_start, note,
                           tuple(self.plog.tree.inclusion_proof(todo.commit.index, size)),
                           tuple(self.plog.tree.inclusion_proof(todo.claim.index, size)),
                           time.time_ns(),
                           # the commitment's log root proven against this checkpoint, so a
                           # verifier needs no other (the owner may have missed the one it
                           # keyed to: published checkpoints travel on a lossy channel)
                           tuple(self.plog.tree.consistency_proof(keyed, size)) if keyed else ())
        self.bus.send_doc("wm_cert", "all", WatermarkCertificate(
            todo.stage, todo.round, issue(self.ident, cert)).to_doc())
        self.log.info("watermark certified", stage=todo.stage, round=todo.round)

    def _wait_for_observers(self) -> None:
        """Keep the run open (logging, beating) while an auditor that follows it audits."""
        bus = self.bus
        deadline = time.monotonic() + self.cfg.bus.audit_timeout_s
        waiting = {n for n in bus.observers() if bus.topics.done(n) not in bus.seen_subscriptions}
        if waiting:
            print(f"notary: keeping the run open for {', '.join(sorted(waiting))} (up to "
                  f"{self.cfg.bus.audit_timeout_s:.0f} s)", flush=True)
        while waiting:
            if time.monotonic() > deadline:
                self.log.warning("observers did not finish in time", observers=sorted(waiting))
                return
            bus.recv(0.5)  # beats on; the log is closed, nothing more is appended
            waiting = {n for n in waiting if bus.topics.done(n) not in bus.seen_subscriptions}

    def _checkpoint(self, *, final: bool = False, closing: bool = False,
                    publish: bool = True, force: bool = False) -> None:
        """Sign (and publish) a checkpoint. `final`: the owner acknowledged the end of
        training; `closing`: the log is closed, nothing is appended after it; `force`: sign
        one even if nothing was appended since the last."""
        self.last_cp_time = time.monotonic()
        if self.plog.size == self.last_cp_size and not (final or closing or force):
            return
        note = self.plog.sign_checkpoint()
        self.last_cp_size = self.plog.size
        self.log_closed = self.log_closed or closing
        if publish:
            self.bus.send_doc("checkpoint", "all", CheckpointMessage(note, final, closing).to_doc())
            if final:  # participants leave after this: their silence is no longer news
                self.final_sent = True
                self.bus.watch({})


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--resume", action="store_true",
                   help="go on with the run's existing log (`clicooper run --resume`, or a "
                        "notary started again after a crash) instead of waiting for a roster")
    args = p.parse_args(argv)

    return run_main("notary", lambda log: Notary(load(args), log, args.resume).run(), argv)


if __name__ == "__main__":
    sys.exit(main())
