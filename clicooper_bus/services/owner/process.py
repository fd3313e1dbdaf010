"""The owner's process: joins the run and drives it, in the order of the protocol.

It publishes the signed roster (with the training plan), waits until every trainer has
confirmed it, then trains epoch by epoch (a watermark round around each when marks are on),
evaluates, ends training, collects every trainer's sealed segment (each trainer's measured CPU,
a signed `usage` message, comes just before it), assembles the model, puts its own measured CPU
in the log, acknowledges, waits for the notary's final checkpoint (its usage comes just before)
and writes the run's artefacts.
Every message goes through one receive loop (`Dispatcher`) and its handler table (`_routes`).
"""

from __future__ import annotations

import time

from safetensors import SafetensorError
from safetensors.torch import load as st_load

from clicooper_bus.config import RunConfig
from clicooper_bus.errors import ClicooperError, ConfigError, PoisonedInput
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.tensors import check_weights
from clicooper_bus.net.bus import Bus
from clicooper_bus.net.equivocation import Equivocation, proven
from clicooper_bus.net.liveness import PeersGone
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.plan import schedule
from clicooper_bus.protocol import End, Round, Segment
from clicooper_bus.services.common import EXIT_OK, identity, open_bus, public
from clicooper_bus.services.dispatch import Dispatcher, Mailbox
from clicooper_bus.services.owner import artefacts
from clicooper_bus.services.owner.books import Books
from clicooper_bus.services.owner.ending import Ending
from clicooper_bus.services.owner.handover import Handovers
from clicooper_bus.services.owner.rejoins import Rejoins
from clicooper_bus.services.owner.resume import Resumes, RoundStore, resumed_roster
from clicooper_bus.services.owner.rollback import Rejoined, RollbackRefused
from clicooper_bus.services.owner.setup import build
from clicooper_bus.services.owner.subscriptions import subscribe
from clicooper_bus.services.owner.training import EVAL_WINDOW, Training
from clicooper_bus.services.trainer.snapshot import weights_digest
from clicooper_bus.tlog.log import default_origin

MAX_HELD = 4 * EVAL_WINDOW  # data messages kept for later; more means a peer floods the owner


class Refused(ClicooperError):
    """A trainer refused poisoned input (its signed `end` with `refused`): the run stops."""

    def __init__(self, by: str, refused: dict):
        what = PoisonedInput(sender=str(refused["sender"]), kind=str(refused["kind"]),
                             step=refused.get("step"), problem=str(refused["problem"]))
        super().__init__(f"{by} {what}")
        self.stopped = {"by": by, **what.to_doc()}


class Owner(Rejoins, Resumes, Handovers, Ending):
    def __init__(self, cfg: RunConfig, log, resume: bool = False):
        self.cfg, self.log, self.resume = cfg, log, resume
        p = cfg.participants
        self.ident = identity(cfg, p.owner)
        self.notary_key = public(cfg, p.notary)
        self.setup = build(cfg, self.ident, [public(cfg, n) for n in p.trainers], self.notary_key)
        self.layout = RunLayout(cfg.run_dir)
        if resume:  # the run's own roster (its nonce binds every message), from its log
            if cfg.privacy.on:
                raise ConfigError("a run with privacy defences cannot be resumed: the run key "
                                  "behind its noise and pseudo-labels was never stored (by "
                                  "design); start it over with --force")
            self.setup.roster, self.roster_bytes = resumed_roster(self.layout.log, self.ident,
                                                                  self.setup.roster)
        elif self.layout.made():
            raise ConfigError(f"{self.layout.made()[0]} exists: a run with id '{cfg.run.id}' was "
                              f"already made here; choose another run id or remove "
                              f"{self.layout.root}")
        else:
            artefacts.write_config(self.layout, cfg)
            if self.setup.order_key is not None:
                artefacts.write_order_key(self.layout, self.setup.order_key)
        roster = self.setup.roster
        self.bus: Bus = open_bus(cfg, self.ident, Verifier(roster, cfg.run.id, partial=True))
        self.bus.bind(roster)
        self.stages = list(roster.stages)
        self.kid = {m.name: m.key_id for m in roster.members}
        names = {v: k for k, v in self.kid.items()}
        self.books = Books(self.stages, names, self.notary_key, default_origin(cfg.run.id),
                           roster.meta["model_spec"], cfg.run.in_flight)
        self.loop = Dispatcher(self.bus, names, log)
        self.mailbox = Mailbox(names, MAX_HELD)
        self._routes()
        self.training = Training(cfg, self.bus, self.loop, self.mailbox, self.books, self.setup,
                                 self.kid)
        self.rounds = 0
        self.evaluations = 0
        self.rollbacks = 0  # rollbacks so far (at most MAX_ROLLBACKS)
        self.per_epoch: list[dict] = []  # each finished epoch's row (kept for a stopped run)
        self.delivered: set[str] = set()  # trainers whose segment the owner has loaded
        # trainer -> seq of a notary's tip to it while we took it for silent -> when it came
        self.tips: dict[str, dict[int, float]] = {}
        # whether we may sign: a resumed owner only once it took its chain up (`take_up`)
        self.chain_ready = not resume
        self.pending_rejoin = None  # a rejoin that interrupted a resumed owner's rollback
        self.committed_rounds: dict[int, str] = {}  # a resumed owner's: step -> file sha256
        self.own_tip = None  # the notary's tip to us (a resumed owner continues from it)
        self.pending_row: dict | None = None  # a resumed epoch trained but not finished
        self.held_states: dict[str, dict[int, bytes]] = {}  # trainer -> step -> its state
        self.used_standby: set[str] = set()  # standbys that took a stage over
        self.handovers: list[list[bytes]] = []  # [leaf, body] of each handover we said
        self.broker_seen = 0  # broker reconnections the run has rolled back for
        self.rounds_store = RoundStore(self.layout.snapshots(p.owner), roster.nonce.hex())
        # every message of ours on our disk before it is sent: a resumed owner goes on after
        # the last one its dead process signed (`net.outbox`)
        self.bus.keep_sent_in(self.layout.snapshots(p.owner).outbox, restarted=resume)

    def _routes(self) -> None:
        """The handler table: who may send the owner each kind, and what it does with it."""
        k, b = self.kid, self.books

        def fresh(handle):  # data from a trainer that has not restored yet is stale: dropped
            return lambda env: None if b.stale(env) else handle(env)

        @fresh
        def keep(env) -> None:
            b.compare(env)
            self.mailbox.put(env)

        stages = {k[n] for n in self.stages}
        first, last, notary = k[self.stages[0]], k[self.stages[-1]], k[self.cfg.participants.notary]
        route = self.loop.route
        route("hello", stages, b.on_hello)
        if self.setup.tail is None:  # with a tail the owner computes the loss itself
            route("metrics", {last}, fresh(self._on_metrics))
            route("logits", {last}, fresh(lambda env: self.training.own.on_logits(env)))
        route("checkpoint", {notary}, b.on_checkpoint)
        route("wm_commit", stages, b.on_commit)
        route("wm_claim", stages, b.on_claim)
        route("wm_cert", {notary}, b.on_certificate)
        route("bwd", {first}, keep)
        # the last stage's evaluation outputs (only those leave it)
        eval_out = fresh(lambda env: self.training.on_eval_out(env))
        route("eval_out", {last}, eval_out)
        route("segment", stages, keep)
        route("usage", stages | {notary}, b.on_usage)  # each signs its own: nobody else's
        route("end", stages, self._on_refusal)  # a trainer refused poisoned input
        route("snapshot", stages, b.on_snapshot)
        route("restored", stages, b.on_restored)
        route("rejoin", stages, self._on_rejoin)
        route("stage_state", stages, self._on_stage_state)
        route("tip", {notary}, self._on_tip)
        route("equivocation", {notary}, self._on_equivocation)
        if self.setup.tail is not None:  # the last stage's outputs come back to the owner's tail
            route("fwd", {last}, keep)
            route("eval_fwd", {last}, eval_out)

    def _on_metrics(self, env) -> None:
        """The last stage's claim of a step, checked against its logits once both are in."""
        self.books.on_metrics(env)
        if env.header.step is not None:
            self.training.own.check(env.header.step)

    def _on_refusal(self, env) -> None:
        """A trainer's `end` says what input it refused; the run stops (raises Refused). One
        without a refusal means nothing and is ignored."""
        name = self.books.names[env.header.sender]
        end = End.parse(env.document(), sender=name)
        if end.refused is None:
            self.log.warning("an end from a trainer without a refusal ignored", sender=name)
            return
        raise Refused(name, end.refused)

    def _on_equivocation(self, env) -> None:
        """The notary's proof that a member signed two messages at one place of its chain:
        checked here (`net.equivocation.proven`), then the run stops naming the member
        (PoisonedInput). A proof that proves nothing is the notary's malformed message: the
        run stops naming the notary."""
        notary = self.cfg.participants.notary
        ev = Equivocation.parse(env.document(), sender=notary)
        h, what = proven(ev, self.setup.roster, sender=notary)
        raise PoisonedInput(sender=ev.member, kind=h.kind, step=h.step, problem=what)

    def until(self, what: str, ready) -> None:
        self.training.wait(what, ready)

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        t0 = time.perf_counter()
        try:
            try:
                if self.resume:
                    start = self._resume()  # (a rejoin during its rollback: `pending_rejoin`)
                else:
                    self._join()
                    self._save_round(0)
                    start = (0, 0)
                per_epoch, step = self._train(start, self.pending_rejoin)
                sent = self._collect_segments()
                if self.cfg.privacy.evaluate == "owner":  # on the delivered model, nothing released
                    per_epoch[-1]["accuracy"] = self.training.evaluate_locally()
                    print(f"owner: test accuracy of the delivered model "
                          f"{per_epoch[-1]['accuracy']:.4f}", flush=True)
                # a refusal while the owner waits for the notary (a late message) is a clean
                # stop too: `_finish` receives everything before it writes anything certified
                self._finish(per_epoch, step, sent, t0)
            except PoisonedInput as exc:  # refused here
                return self._stop({"by": self.cfg.participants.owner, **exc.to_doc()}, str(exc),
                                  time.perf_counter() - t0)
            except Refused as exc:  # refused by a trainer
                return self._stop(exc.stopped, str(exc), time.perf_counter() - t0)
            except RollbackRefused as exc:  # a trainer came back, but cannot be resumed
                stopped = {"by": self.cfg.participants.owner, **exc.stopped}
                return self._stop(stopped, str(exc), time.perf_counter() - t0)
            except Rejoined as exc:  # outside training (joining, delivering): not built
                stopped = {"by": self.cfg.participants.owner, "rejoined": exc.name,
                           "problem": f"{exc}, outside training: resuming there is not built"}
                return self._stop(stopped, stopped["problem"], time.perf_counter() - t0)
            except PeersGone as exc:  # silent past [bus] rejoin_timeout_s: they will not rejoin
                stopped = {"by": self.cfg.participants.owner, "gone": exc.names,
                           "problem": str(exc)}
                return self._stop(stopped, str(exc), time.perf_counter() - t0, gone=exc.names)
            return EXIT_OK
        finally:
            self.bus.close()

    def _join(self) -> None:
        bus, cfg = self.bus, self.cfg
        owner = cfg.participants.owner
        subscribe(bus, owner)
        everyone = self.stages + [cfg.participants.notary]
        print(f"owner: waiting for {', '.join(everyone + list(cfg.participants.standby))} to "
              f"join run '{cfg.run.id}'", flush=True)
        # standbys too: the roster is published once, and a standby must have it
        bus.wait_for_subscribers("hello", everyone + list(cfg.participants.standby),
                                 cfg.bus.join_timeout_s)
        if cfg.participants.observers:  # so that the notary knows to wait for them
            bus.wait_for_subscribers("watching", cfg.participants.observers, cfg.bus.join_timeout_s)
        self.roster_bytes = self.setup.roster.sign(self.ident)
        bus.send_bytes("roster", "all", self.roster_bytes)
        bus.start_beating()
        bus.watch({self.kid[n]: n for n in everyone})
        self.loop.until(lambda: self.books.ready == set(self.stages),
                        timeout_s=cfg.bus.join_timeout_s, timed_out=lambda: (
                            f"trainers {sorted(set(self.stages) - self.books.ready)} did not "
                            f"confirm the roster in time"))
        self.loop.route("hello", {self.kid[n] for n in self.stages}, self._late_hello)
        self.log.info("everyone joined", trainers=self.stages)
        piped = f", {schedule(cfg.run.in_flight, self.setup.defences.head_fixed)}" \
            if cfg.run.in_flight > 1 else ""
        print(f"owner: {len(self.stages)} trainers joined; training {self.setup.spec.name} on "
              f"{len(self.setup.data.x_train)} {self.setup.data.name} images{piped}", flush=True)

    def _late_hello(self, env) -> None:
        """A hello after everyone joined changes nothing (a trainer's retry): noted, ignored."""
        self.log.warning("hello after the join ignored", sender=self.books.names[env.header.sender])

    def _train_from(self, first: int, start: int) -> tuple[list[dict], int]:
        """Epochs from epoch `first`, its batch `start` on."""
        cfg, wm_on, per_epoch = self.cfg, self.cfg.watermark.enabled, self.per_epoch
        step = first * self.training.per + start
        for epoch in range(first, cfg.run.epochs):
            # every trainer commits to its round key before the round, and claims it once its
            # last step is done; after a rollback, a round every stage committed (or claimed)
            # is not started (or ended) again, and one only some did is said again: those
            # that did ignore it, a restarted stage that had not does it
            if wm_on:
                self._round(epoch, "start", self.books.commits, "commitments")
            if self.pending_row is not None and self.pending_row["epoch"] == epoch:
                row, self.pending_row = self.pending_row, None  # resumed: trained already
            else:
                row, step = self.training.epoch(epoch, step, start if epoch == first else 0)
                self._save_round(step, pending=row)
            if wm_on:
                self._round(epoch, "end", self.books.claims, "claims")
                self.rounds = epoch + 1
            stop = bool(cfg.run.max_steps) and step >= cfg.run.max_steps
            last = stop or epoch == cfg.run.epochs - 1  # the run ends: always evaluate
            every = cfg.run.eval_every
            if cfg.privacy.evaluate == "chain" and (last or (every and (epoch + 1) % every == 0)):
                row["accuracy"] = self.training.evaluate(epoch)
                self.evaluations += 1
            per_epoch.append(row)
            self._save_round(step)
            self.log.info("epoch done", **row)
            print(f"epoch {epoch + 1}/{cfg.run.epochs}: loss {row['loss']:.4f}, "
                  f"train accuracy{' (on pseudo-labels)' if self.setup.defences.codec else ''} "
                  f"{row['train_accuracy']:.4f}, {self._accuracy_text(row)}, "
                  f"{row['wall_s']:.1f} s", flush=True)
            if stop:
                break
        return per_epoch, step

    def _round(self, epoch: int, phase: str, table: dict, what: str) -> None:
        """Say `round {epoch, phase}` and wait for every stage's `what` in `table`, unless
        every stage's is already in (a rollback's replay)."""
        if self.books.have(table, epoch):
            return
        self.training.hold()
        self.books.said = (epoch, phase)  # the claims taken from now on (`Books.on_claim`)
        self.bus.send_doc("round", "all", Round(epoch, phase).to_doc())
        self.until(f"watermark {what} of round {epoch}",
                   lambda: self.books.have(table, epoch))

    def _accuracy_text(self, row: dict) -> str:
        if "accuracy" in row:
            return f"test accuracy {row['accuracy']:.4f}"
        if self.cfg.privacy.evaluate == "owner":
            return "test accuracy at the end, on the owner"
        return "not evaluated this epoch"

    def _collect_segments(self) -> dict[str, int]:
        """End training, load every trainer's sealed segment, save the assembled model.
        Returns the messages sent, by kind, by everyone (as each trainer counted its own)."""
        self.training.hold()
        self.books.closed = True  # every step's metrics are in: none may come from here on
        self.bus.send_doc("end", "all", End("training complete").to_doc())
        sent: dict[str, int] = dict(self.bus.sent)
        for i, name in enumerate(self.stages, start=1):
            env = self.training.receive(f"the segment of {name}", "segment", name)
            seg = Segment.parse(env.document(), sender=name)
            try:
                self.setup.segments[i].load_state_dict(st_load(self.ident.unseal(seg.sealed)),
                                                     strict=True)
            except (RuntimeError, SafetensorError, ClicooperError) as exc:
                raise ClicooperError(f"the segment {name} delivered does not fit stage {i}: "
                                     f"{exc}") from None
            check_weights(self.setup.segments[i].state_dict().items(), sender=name,
                          kind="segment")
            self._check_last_commitment(name, i)
            self.delivered.add(name)
            for k, v in seg.sent.items():  # counted before the segment was sent
                sent[k] = sent.get(k, 0) + v
            sent["segment"] = sent.get("segment", 0) + 1
        own = [self.setup.segments[0], *self.setup.segments[len(self.stages) + 1:]]  # head, tail
        check_weights(((n, v) for seg in own for n, v in seg.state_dict().items()),
                      sender=self.cfg.participants.owner, kind="weights")
        if self.setup.defences.codec is not None:
            artefacts.write_label_groups(self.layout, self.setup.defences.codec.groups)
        self.model_sha = artefacts.write_model(self.layout, self.setup, self.cfg.run.id)
        return sent

    def _check_last_commitment(self, name: str, stage: int) -> None:
        """The weights `name` delivered are those of its last snapshot commitment (its digest
        in the log), or ClicooperError naming it."""
        committed = self.books.snapshots.get(name, {})
        if not committed:
            raise ClicooperError(f"{name} delivered its segment without ever committing a "
                                 f"snapshot (a trainer older than snapshots? update it)")
        last = committed[max(committed)]
        got = weights_digest(self.setup.segments[stage])
        if got != last.weights:
            raise ClicooperError(f"{name} delivered weights (sha256 {got[:16]}...) other than "
                                 f"those of its last committed snapshot, of step {last.step} "
                                 f"({last.weights[:16]}...)")
