"""The notary's register of watermark commitments and claims, as the log grows.

It sees every message in log order and applies the chain rules (`chain.check_commit`): a
commitment must come from the trainer of its stage, link to the previous stage's commitment
of the round (or the roster) and to its own claim of the previous round, name a log root the
log really had, and arrive before the round's first training activation. A claim must name a
registered commitment of the same trainer and come after the round began. A claim that holds
is returned for certification; anything else is refused with its reason (and stays in the log,
where everyone can see it was refused).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from clicooper_bus.chain.certificate import Logged
from clicooper_bus.chain.documents import Claim, Commit, check_commit
from clicooper_bus.errors import ClicooperError
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import Envelope


@dataclass
class Certifiable:
    stage: int
    round: int
    commit: Logged
    claim: Logged
    round_start: int


@dataclass
class WatermarkRegistry:
    roster: Roster
    roster_bytes: bytes
    root_at: Callable[[int], bytes | None]
    commits: dict[tuple[int, int], tuple[Commit, Logged]] = field(default_factory=dict)
    claims: dict[tuple[int, int], Logged] = field(default_factory=dict)
    round_start: dict[int, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # the stage order, as handovers amend it

    def __post_init__(self) -> None:
        self.stages = list(self.roster.stages)

    def _roster_bits(self) -> int:
        """The marks' bits the owner signed into the roster (0: no watermark metadata)."""
        try:
            return int(json.loads(self.roster.meta.get("watermark") or "{}").get("bits", 0))
        except (ValueError, TypeError, AttributeError):
            return 0

    def _stage_of(self, sender: str) -> int | None:
        m = self.roster.by_key_id(sender)
        if m is None or m.name not in self.stages:
            return None
        return self.stages.index(m.name) + 1

    def hand_over(self, stage: int, round_: int, replaced: str, by: str) -> None:
        """The owner handed `stage` of `replaced` to standby `by` (its logged `handover`):
        from now on the stage's commitments and claims are `by`'s, and round `round_` starts
        again, every stage's commitment of it void (none was claimed: a handover never goes
        behind a claimed round) and its start to be seen again. Raises ValueError when the
        handover does not fit the roster (refused, the stage unchanged)."""
        if not 1 <= stage <= len(self.stages) or self.stages[stage - 1] != replaced:
            raise ValueError(f"a handover of stage {stage} from {replaced}, which is not that "
                             f"stage's trainer")
        if by not in self.roster.standby or by in self.stages:
            raise ValueError(f"a handover to {by}, not a standby of the roster free to take it")
        if any(t == round_ for (_, t) in self.claims):
            raise ValueError(f"a handover restarting round {round_}, which was claimed")
        self.stages[stage - 1] = by
        for key in [key for key in self.commits if key[1] == round_]:
            del self.commits[key]
        self.round_start.pop(round_, None)

    def observe(self, env: Envelope, index: int) -> Certifiable | None:
        """Register one logged message; returns a claim to certify, if it is one that holds."""
        h = env.header
        if h.kind == "fwd" and h.sender == self.roster.owner.key_id and h.epoch is not None:
            self.round_start.setdefault(h.epoch, index)
            return None
        if h.kind not in ("wm_commit", "wm_claim"):
            return None
        logged = Logged(env.leaf, bytes(env.body), index)
        try:
            if h.kind == "wm_commit":
                self._commit(env, logged)
                return None
            return self._claim(env, logged)
        except (ClicooperError, ValueError, TypeError, OverflowError) as exc:
            # whatever a member sends, the notary refuses it and goes on
            self.refused.append(f"{h.kind} at index {index}: {exc}")
            return None

    def marks_of(self, stage: int) -> list[list[bytes]]:
        """What a restarted trainer of `stage` needs of the chain (`chain.resume`), each as
        logged, `[leaf, body]`: its newest registered commitment and claim, and the previous
        stage's commitment of the round after its newest commitment (the one it has yet to
        make). At most three entries, whatever the number of rounds."""
        out: list[list[bytes]] = []
        mine = [t for (k, t) in self.commits if k == stage]
        if mine:
            out.append(self._entry(self.commits[(stage, max(mine))][1]))
        claimed = [t for (k, t) in self.claims if k == stage]
        if claimed:
            out.append(self._entry(self.claims[(stage, max(claimed))]))
        nxt = max(mine) + 1 if mine else 0
        if stage > 1 and (stage - 1, nxt) in self.commits:
            out.append(self._entry(self.commits[(stage - 1, nxt)][1]))
        return out

    @staticmethod
    def _entry(logged: Logged) -> list[bytes]:
        return [logged.leaf, logged.body]

    def _commit(self, env: Envelope, logged: Logged) -> None:
        c = Commit.from_doc(env.document())
        stage = self._stage_of(env.header.sender)
        if stage != c.stage:
            raise ValueError(f"a commitment for stage {c.stage} from the trainer of stage {stage}")
        if (c.stage, c.round) in self.commits:
            raise ValueError(f"stage {c.stage} already committed for round {c.round}")
        if c.round in self.round_start:
            raise ValueError(f"round {c.round} had already begun (index "
                             f"{self.round_start[c.round]})")
        prev = self.commits.get((c.stage - 1, c.round))
        prev_claim = self.claims.get((c.stage, c.round - 1))
        member = self.roster.by_key_id(env.header.sender)
        why = check_commit(c, run_id=self.roster.run_id, trainer_key=member.identity.public_key,
                           roster=self.roster_bytes,
                           prev_commitment=prev[0].commitment if prev else None,
                           prev_claim=prev_claim.digest if prev_claim else None,
                           root_at=self.root_at)
        if why:
            raise ValueError(why)
        self.commits[(c.stage, c.round)] = (c, logged)

    def _claim(self, env: Envelope, logged: Logged) -> Certifiable:
        c = Claim.from_doc(env.document())
        if c.nbits not in (0, self._roster_bits()):
            raise ValueError(f"a claim of {c.nbits} bits, the roster's marks have "
                             f"{self._roster_bits()}")
        registered = self.commits.get((c.stage, c.round))
        if registered is None:
            raise ValueError(f"no commitment of stage {c.stage} for round {c.round}")
        commit, commit_logged = registered
        if commit_logged.header.sender != env.header.sender:
            raise ValueError("the claim is not from the trainer that committed")
        if c.commitment != commit.commitment:
            raise ValueError("the claim names another commitment")
        start = self.round_start.get(c.round)
        if start is None:
            raise ValueError(f"round {c.round} never began")
        if not commit_logged.index < start < logged.index:
            raise ValueError("commitment, round start and claim are out of order")
        if (c.stage, c.round) in self.claims:
            raise ValueError(f"stage {c.stage} already claimed round {c.round}")
        self.claims[(c.stage, c.round)] = logged
        return Certifiable(c.stage, c.round, commit_logged, logged, start)
