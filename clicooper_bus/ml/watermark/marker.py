"""A trainer's side of the watermark chain, as a small state machine the process feeds.

Before round t (the owner's `round start`) it commits: once it knows the previous stage's
commitment of round t (stage 1 links to the roster), it derives the key from the chain and the
latest checkpoint it saw, starts embedding that key's mark, and hands back the commitment to
publish. After round t (`round end`) it claims: its weights' hash and the bits they carry.
The owner's roster says whether watermarks are on, and with how many bits and what strength.
A process started again after a crash takes the chain up where the log has it (`resume`).
"""

from __future__ import annotations

import hashlib
import json

import torch

from clicooper_bus.chain import key as wk
from clicooper_bus.chain.documents import Claim, Commit, roster_digest
from clicooper_bus.chain.resume import ChainState
from clicooper_bus.errors import RosterError
from clicooper_bus.ml.watermark import mark as wm
from clicooper_bus.ml.watermark.claim import make_claim
from clicooper_bus.net.roster import Roster
from clicooper_bus.tlog.merkle import EMPTY_ROOT  # before any checkpoint: the empty tree's root


def settings(roster: Roster) -> dict | None:
    """The roster's watermark settings ({bits, strength, threshold, rounds}), or None when
    off. The owner signed them: verification takes its threshold and round count from here."""
    raw = roster.meta.get("watermark")
    if not raw:
        return None
    try:
        doc = json.loads(raw)
        return {"bits": int(doc["bits"]), "strength": float(doc["strength"]),
                "threshold": float(doc["threshold"]), "rounds": int(doc["rounds"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise RosterError(f"the roster's watermark settings are malformed: {exc}") from None


class Marker:
    def __init__(self, run_id: str, roster_bytes: bytes, stage: int, trainer_key: bytes,
                 module: torch.nn.Module, *, bits: int, strength: float):
        self.run_id, self.roster_bytes, self.stage = run_id, roster_bytes, stage
        self.trainer_key, self.module = trainer_key, module
        self.nbits, self.strength = bits, strength
        self.checkpoint = (0, EMPTY_ROOT)
        self.prev_commits: dict[int, bytes] = {}  # round -> the previous stage's commitment
        self.last_claim: bytes | None = None  # digest of our claim of the previous round
        self.pending: int | None = None
        self.current: tuple[Commit, bytes] | None = None
        self.claimed_round = -1  # the newest round this stage claimed
        self.mark: wm.Watermark | None = None

    @classmethod
    def from_roster(cls, roster: Roster, roster_bytes: bytes, stage: int, trainer_key: bytes,
                    module: torch.nn.Module) -> Marker | None:
        s = settings(roster)
        if s is None:
            return None
        return cls(roster.run_id, roster_bytes, stage, trainer_key, module, bits=s["bits"],
                   strength=s["strength"])

    def saw_checkpoint(self, size: int, root: bytes) -> None:
        if size >= self.checkpoint[0]:
            self.checkpoint = (size, root)

    def saw_previous_commit(self, doc: dict) -> None:
        c = Commit.from_doc(doc)
        if c.stage == self.stage - 1:
            self.prev_commits[c.round] = c.commitment

    def start(self, round_: int) -> None:
        """Round `round_` begins: commit once its links are known. A round already committed
        (the owner says `start` again after a rollback, for a restarted stage) is ignored."""
        if self.current is not None and self.current[0].round >= round_:
            return
        self.pending = round_

    def has_claimed(self, round_: int) -> bool:
        return self.claimed_round >= round_

    def resume(self, state: ChainState) -> None:
        """A restarted process: take up the chain where the log has it (`state`, from the
        notary's tip, each message checked by `chain.resume.open_marks`): the newest round we
        committed to, with its key recomputed from the commitment's own inputs (and its mark
        embedded again from there), our newest claim, and the previous stage's commitments.
        Raises ValueError if our logged commitment is not to the key its inputs derive (not
        this trainer's, or not this run's)."""
        for t, c in state.previous.items():
            self.prev_commits[t] = c.commitment
        if state.claims:
            self.claimed_round = max(state.claims)
            self.last_claim = state.claims[self.claimed_round]
        if state.commits:
            commit = state.commits[max(state.commits)]
            key = commit.link(self.run_id, self.trainer_key).key()
            if wk.commitment(key) != commit.commitment:
                raise ValueError(f"the logged commitment of round {commit.round} is not to the "
                                 f"key its inputs derive for this trainer")
            self.current, self.pending = (commit, key), None
            self.saw_checkpoint(commit.log_size, commit.log_root)
            if wm.carrier(self.module) is not None:
                self.mark = wm.Watermark(key, self.module, t=self.nbits, strength=self.strength)

    def ready_commit(self) -> Commit | None:
        """The commitment to publish, once everything it links to is known."""
        t = self.pending
        if t is None or (self.stage > 1 and t not in self.prev_commits):
            return None
        prev_link = roster_digest(self.roster_bytes) if self.stage == 1 else self.prev_commits[t]
        prev_round = wk.ZERO if t == 0 else (self.last_claim or wk.ZERO)
        size, root = self.checkpoint
        link = wk.Link(self.run_id, self.stage, t, self.trainer_key, prev_link, prev_round, root)
        key = link.key()
        commit = Commit(self.stage, t, wk.commitment(key), prev_link, prev_round, size, root)
        self.current, self.pending = (commit, key), None
        if wm.carrier(self.module) is not None:  # a stage without weights carries no mark
            self.mark = wm.Watermark(key, self.module, t=self.nbits, strength=self.strength)
        return commit

    def regularizer(self) -> None:
        """Before every optimiser step: the current round's mark adds its gradient."""
        if self.mark is not None:
            self.mark.add_grad()

    def claim(self, round_: int) -> Claim:
        if self.current is None or self.current[0].round != round_:
            raise ValueError(f"round {round_} ends, but this stage committed to no key for it")
        commit, key = self.current
        return make_claim(commit, key, self.module, self.nbits)

    def void_round(self, round_: int) -> None:
        """Round `round_` starts again (a stage was handed over to a standby): our commitment
        to it, unclaimed, and the previous stage's are void; we commit anew when it starts."""
        if self.current is not None and self.current[0].round == round_ and \
                self.claimed_round < round_:
            self.current, self.mark = None, None
        if self.pending == round_:
            self.pending = None
        self.prev_commits.pop(round_, None)

    def resume_handover(self, round_: int, prev_claim: bytes) -> None:
        """A standby taking this stage over before round `round_`: its chain goes on from the
        stage's claim of the round before (`prev_claim`, its logged digest; empty in round 0),
        which our first commitment links to: the handover is a link of the chain."""
        self.claimed_round = round_ - 1
        self.last_claim = prev_claim or None
        self.current, self.pending, self.mark = None, None, None

    def claimed(self, leaf: bytes) -> None:
        """Our claim of the current round went out as `leaf` (header and signature)."""
        self.last_claim = hashlib.sha256(leaf).digest()
        self.claimed_round = self.current[0].round
