"""The owner's side of a resumed run, as a part of `process.Owner`: `clicooper run --resume
RUN_DIR` after the whole run was interrupted, or an owner process started again with
`--resume` after a crash while the others wait for it.

At every round boundary (each epoch's end, and step 0) the owner writes its state to
`RUN_DIR/snapshots/<owner>/step-NNNNNNNNN.safetensors` (`RoundStore`: its head and tail with
their optimiser state, the finished epochs' rows, and the row of an epoch whose training is
done but whose round end or evaluation is not), the newest two kept; trainers keep their
newest two round boundaries on disk too. A resumed owner (`_resume`) takes the roster from the
run's log (the same run nonce, so every member's messages stay bound to it), reads the log
for what its books held (each trainer's snapshot commitments, the watermark chain, the
checkpoints; `_replay_log`), continues its own signed chain after the last message its dead
process signed (its outbox, `net.outbox`), sends again what of those the notary's log misses
(after the notary's `tip`: only the notary knows which reached the log) and counts them as
logged (`_replay_own`), waits
until it has heard every trainer (a live one's beats, a restarted one's messages sent again and,
up to `timeout_s` more, its `rejoin`), and rolls
everyone back to the newest round boundary it holds that every trainer committed and can
restore: the same `rollback` as for a trainer's restart. With in_flight 1 and no privacy
filter the resumed run's model is bit for bit an uninterrupted run's.

Not resumable: a run with privacy defences (the run key behind the noise and the pseudo-labels
is drawn fresh in memory and never stored, by design), a finished or stopped run (its log holds
the final checkpoint), a run whose log did not keep the bodies replayed here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from clicooper_bus.errors import ClicooperError, ConfigError
from clicooper_bus.layout import SnapshotLayout, write_atomic
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.net.roster import Roster
from clicooper_bus.protocol.recovery import ChainTip, Rejoin, Snapshot
from clicooper_bus.services.owner.log_replay import LogReplay
from clicooper_bus.services.owner.rollback import Rejoined
from clicooper_bus.services.owner.subscriptions import subscribe
from clicooper_bus.services.trainer import snapshot
from clicooper_bus.services.trainer.snapshot import safe_open_metadata
from clicooper_bus.tlog.log import ProvenanceLog

KEEP = 2  # round snapshots of the owner kept on disk


@dataclass
class Saved:
    """The owner at one round boundary."""

    step: int
    head: dict[str, torch.Tensor]
    tail: dict[str, torch.Tensor] | None
    rows: list[dict]  # the finished epochs' rows
    pending: dict | None  # the row of an epoch trained but not finished (round end, evaluation)


class RoundStore:
    """The owner's round snapshots in `layout`, tied to the run by its nonce."""

    def __init__(self, layout: SnapshotLayout, nonce: str):
        self.layout, self.nonce = layout, nonce

    def write(self, step: int, head: SegmentTrainer, tail: SegmentTrainer | None,
              rows: list[dict], pending: dict | None) -> str:
        """Write the snapshot of `step`; returns the SHA-256 (hex) of the file's bytes, which
        the owner commits to in the log (`Resumes._save_round`)."""
        tensors = {f"head/{k}": v for k, v in snapshot.stage_state(head).items()}
        if tail is not None:
            tensors.update({f"tail/{k}": v for k, v in snapshot.stage_state(tail).items()})
        meta = {"nonce": self.nonce, "step": str(step), "rows": json.dumps(rows),
                "pending": json.dumps(pending)}
        self.layout.root.mkdir(parents=True, exist_ok=True)
        raw = st_save(tensors, metadata=meta)
        write_atomic(self.layout.state(step), raw, mode=0o600)
        for old in self.layout.steps()[:-KEEP]:
            self.layout.state(old).unlink(missing_ok=True)
        return hashlib.sha256(raw).hexdigest()

    def digest(self, step: int) -> str | None:
        """The SHA-256 (hex) of the snapshot file of `step` as it is on disk; None if unread."""
        try:
            return hashlib.sha256(self.layout.state(step).read_bytes()).hexdigest()
        except OSError:
            return None

    def steps(self) -> list[int]:
        return self.layout.steps()

    def read(self, step: int) -> Saved:
        """The snapshot of `step`. Raises ClicooperError naming a file that cannot be read or
        is of another run."""
        path = self.layout.state(step)
        try:
            raw = path.read_bytes()
            meta, tensors = safe_open_metadata(raw), st_load(raw)
            rows, pending = json.loads(meta["rows"]), json.loads(meta["pending"])
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise ClicooperError(f"the owner's round snapshot {path} cannot be read: {exc}") \
                from None
        if meta.get("nonce") != self.nonce:
            raise ClicooperError(f"{path} is of another run (nonce {meta.get('nonce')})")
        part = {p: {k.removeprefix(p): v for k, v in tensors.items() if k.startswith(p)}
                for p in ("head/", "tail/")}
        return Saved(step, part["head/"], part["tail/"] or None, rows, pending)


def resumed_roster(log_dir, owner_ident, fresh: Roster) -> tuple[Roster, bytes]:
    """The roster of the run whose log is in `log_dir`, checked: signed by us, and signing the
    same plan, model and config as `fresh` (what this config builds now). Raises ConfigError
    naming what differs (resume with the run's own config.toml)."""
    with ProvenanceLog.open(log_dir) as plog:
        raw = plog.roster_bytes
    roster = Roster.open(raw, owner=owner_ident.public)
    for key in ("plan", "model_spec", "config", "watermark"):
        if roster.meta.get(key) != fresh.meta.get(key):
            raise ConfigError(f"the run's roster signed another {key} than this config gives: "
                              f"resume with the run's own config.toml, unchanged")
    return roster, raw


class Resumes(LogReplay):
    """The resume methods of `process.Owner` (a mixin: it uses the owner's bus, loop, books,
    training, layout and stages; its books come from the log, `LogReplay`)."""

    def _save_round(self, step: int, pending: dict | None = None) -> None:
        """Our state at round boundary `step` (see `RoundStore`), committed in a signed
        `snapshot` to all (the log keeps it): a resumed owner takes up only a file whose bytes
        are what it committed, so what it resumes from is evidence too."""
        digest = self.rounds_store.write(step, self.setup.head, self.setup.tail, self.per_epoch,
                                         pending)
        doc = Snapshot(step, snapshot.weights_digest(self.setup.head.module), digest).to_doc()
        self.bus.send_doc("snapshot", "all", doc, step=step)

    def _resume(self) -> tuple[int, int]:
        """Take the run up again (see the module docstring). Returns (epoch, batch) to train
        from. Raises ClicooperError when it cannot be resumed, naming why."""
        cfg, bus = self.cfg, self.bus
        owner = cfg.participants.owner
        steps = self.rounds_store.steps()
        if not steps:
            raise ClicooperError(f"no round snapshot of the owner in "
                                 f"{self.rounds_store.layout.root}: nothing to resume from")
        self._replay_log()
        if self.handovers:  # standbys hold stages now: the routes and the ends follow them
            self._stages_changed()
        # whatever a trainer sends before it restored for our rollback is of the dead owner's
        # timeline (its last steps' outputs, in flight when we died): dropped, not judged
        self.books.fenced = {self.kid[n] for n in self.stages}
        subscribe(bus, owner)
        print(f"owner: resuming run '{cfg.run.id}' (round snapshots on disk of steps {steps}): "
              f"waiting for the notary's chain tip", flush=True)
        wait = cfg.bus.join_timeout_s + cfg.bus.rejoin_timeout_s
        self.loop.until(lambda: self.own_tip is not None, timeout_s=wait, timed_out=lambda: (
            f"no chain tip from the notary within {wait:.0f} s: is its notary running (started "
            f"with --resume)?"))
        # after the last message our dead process signed; what the log missed of them is sent
        # again and counts as if logged (a round snapshot committed, a handover said)
        resent = bus.take_up(self.own_tip.seq, self.own_tip.prev)
        self.chain_ready = True
        self._replay_own(resent)
        steps = self._committed_steps(steps)
        if resent:
            print(f"owner: sent again {len(resent)} message(s) our dead process signed after "
                  f"the log's seq {self.own_tip.seq}", flush=True)
        bus.start_beating()
        everyone = [*self.stages, cfg.participants.notary]
        bus.watch({self.kid[n]: n for n in everyone})
        rejoined: dict[str, Rejoin] = {}
        digests: list[str] = []  # their headers', which our rollback names
        self.loop.route("rejoin", {self.kid[n] for n in self.stages},
                        lambda env: self._resume_rejoin(env, rejoined, digests))
        self.loop.route("hello", {self.kid[n] for n in self.stages}, self._late_hello)
        heard = lambda: all(self.kid[n] in bus.last_seen for n in self.stages)  # noqa: E731
        self.loop.until(heard, timeout_s=cfg.bus.join_timeout_s, timed_out=lambda: (
            f"trainers {[n for n in self.stages if self.kid[n] not in bus.last_seen]} were not "
            f"heard within {cfg.bus.join_timeout_s:.0f} s of resuming"))
        # a restarted trainer is heard first by what it sends again, its rejoin right behind:
        # up to timeout_s more lets that rejoin into this resume (a later one gets a rollback
        # of its own); a resume with live trainers waits that long once
        self.loop.until(lambda: len(rejoined) == len(self.stages), timeout_s=cfg.bus.timeout_s,
                        timed_out=None)
        step, states = self._resume_step(steps, rejoined)
        saved = self.rounds_store.read(step)
        self.per_epoch[:] = saved.rows
        self.pending_row = saved.pending
        self.evaluations = sum("accuracy" in row for row in saved.rows)
        self.rounds = len(saved.rows) if cfg.watermark.enabled else 0
        self.training.snapshots.kept[step] = (saved.head, saved.tail)
        self.loop.route("rejoin", {self.kid[n] for n in self.stages}, self._on_rejoin)
        try:
            return self._rollback_to(step, owner, states, digests or None)
        except Rejoined as exc:
            # a restarted trainer sends again what its dead process signed before its rejoin,
            # so it may have been heard before its rejoin came; or one died during our
            # rollback: either way a rollback of its own follows (`_train`)
            exc.in_resume = True
            self.pending_rejoin = exc
            return 0, 0
        finally:
            self.tips = {}  # the log's last seqs counted for the trainers restarted with us

    def _on_own_tip(self, tip: ChainTip) -> None:
        """The notary's tip to us: where a resumed owner's chain goes on from (before it
        beats); to a live one, from a notary started again after a crash, what to send again
        (`Bus.refill`: BusError when it cannot: the log cannot be complete), and what we
        accepted meanwhile, for the notary to compare with its log."""
        if self.resume and not self.bus.beating:
            self.own_tip = tip
            return
        if not tip.resend:
            return
        sent, shown = self.bus.refill(tip.seq, tip.prev, self.cfg.participants.notary)
        if sent:
            print(f"owner: sent {sent} message(s) again for the notary, which had our chain up "
                  f"to seq {tip.seq}", flush=True)
        self.log.info("refilled", sent=sent, shown=shown, tip=tip.seq)

    def _resume_rejoin(self, env, rejoined: dict[str, Rejoin], digests: list[str]) -> None:
        """A restarted trainer's `rejoin` while we resume: noted (the rollback comes once
        everyone is heard)."""
        name = self.books.names[env.header.sender]
        rejoin = Rejoin.parse(env.document(), sender=name)
        why = self._not_restarted(name, env.header.seq, rejoin)
        if why:
            self.log.warning("rejoin refused", trainer=name, problem=why)
            return
        del self.tips[name]  # one rejoin a tip
        rejoined[name] = rejoin
        digests.append(env.header.digest.hex())
        print(f"owner: {name} rejoined with snapshots of steps {rejoin.steps}", flush=True)

    def _committed_steps(self, steps: list[int]) -> list[int]:
        """Of our round snapshot files (`steps`), those whose bytes are what we committed to
        in the log (a file written by a process killed before its commitment went out, or
        changed on disk since, is not taken up). Raises ClicooperError naming each file when
        none is."""
        ok = [s for s in steps if self.committed_rounds.get(s) is not None and
              self.rounds_store.digest(s) == self.committed_rounds[s]]
        if not ok:
            raise ClicooperError(
                "no round snapshot of the owner in " + str(self.rounds_store.layout.root) +
                " is what the log says it committed to (" + "; ".join(
                    f"step {s}: file sha256 {(self.rounds_store.digest(s) or 'unreadable')[:16]}"
                    f", logged {(self.committed_rounds.get(s) or 'none')[:16]}" for s in steps) +
                "): the run cannot be resumed")
        return ok

    def _resume_step(self, steps: list[int], rejoined: dict[str, Rejoin]
                     ) -> tuple[int, dict[str, dict[int, str]]]:
        """The newest of our round snapshots (`steps`) that every trainer committed (a
        restarted one: among its `rejoin`'s, the digest matching any earlier commitment),
        at or after the end of the newest watermark round claimed; with each trainer's
        committed state digests by step. Raises ClicooperError naming each trainer's steps."""
        states = {n: {k: v.state for k, v in self.books.snapshots.get(n, {}).items()}
                  for n in self.stages}
        for n, r in rejoined.items():
            for s, d in zip(r.steps, r.states, strict=True):
                states[n].setdefault(s, d)
        floor = self._claimed_floor()
        for step in sorted(steps, reverse=True):
            ok = step >= floor and all(step in states[n] for n in self.stages)
            for n, r in rejoined.items():
                ok = ok and step in r.steps and states[n][step] == r.states[r.steps.index(step)]
            if ok:
                return step, states
        raise ClicooperError(
            f"no round snapshot of the owner (steps {steps}) that every trainer committed"
            + (f" at or after step {floor} (the end of the newest watermark round claimed)"
               if floor else "") + ": "
            + "; ".join(f"{n}: {sorted(states[n])[-4:]}" for n in self.stages)
            + "; the run cannot be resumed")
