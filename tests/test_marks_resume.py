"""A restarted trainer takes its watermark chain up from the notary's tip (issue 17, rejoin with
watermarks on): the notary's register hands over at most three logged messages (its newest
commitment and claim, the previous stage's next commitment), the trainer checks each against
its signer's roster key and recovers the same key, mark and claim digest the dead process had;
a round it committed or claimed is not committed or claimed again. Tampered or misplaced
entries are refused, named."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from clicooper_bus.chain.registry import WatermarkRegistry
from clicooper_bus.chain.resume import MarksRefused, open_marks
from clicooper_bus.ml.watermark.marker import Marker
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.wire import Sender
from clicooper_bus.protocol.recovery import ChainTip
from clicooper_bus.tlog.merkle import EMPTY_ROOT

RUN = "marks"


@pytest.fixture(scope="module")
def chain():
    """Two stages' chain through round 0 and stage 1's commitment of round 1, as registered."""
    ids = {n: Identity.generate(n) for n in ("owner", "trainer-1", "trainer-2", "notary")}
    roster = Roster.build(RUN, owner=ids["owner"].public,
                          trainers=[ids["trainer-1"].public, ids["trainer-2"].public],
                          notary=ids["notary"].public, meta={"watermark": json.dumps(
                              {"bits": 16, "strength": 0.1, "threshold": 0.2, "rounds": 2})})
    raw = roster.sign(ids["owner"])
    roster = Roster.open(raw)
    reg = WatermarkRegistry(roster, raw, root_at=lambda n: EMPTY_ROOT if n == 0 else None)
    send = {n: Sender(ids[n], RUN, nonce=roster.nonce) for n in ids}
    torch.manual_seed(0)
    mods = {1: nn.Linear(4, 3), 2: nn.Linear(3, 2)}
    marker = {k: Marker.from_roster(roster, raw, k, ids[f"trainer-{k}"].public.public_key, mods[k])
              for k in (1, 2)}
    index = [0]

    def log(sender: str, kind: str, doc: dict, **meta):
        env = send[sender].seal_document(kind, "all", doc, **meta)
        index[0] += 1
        reg.observe(env, index[0])
        return env

    def commit(k: int, t: int) -> None:
        marker[k].start(t)
        doc = marker[k].ready_commit().to_doc()
        log(f"trainer-{k}", "wm_commit", doc)
        if k == 1:
            marker[2].saw_previous_commit(doc)

    commit(1, 0)
    commit(2, 0)
    log("owner", "fwd", {}, epoch=0, step=0)  # the round begins (the register's round start)
    for k in (1, 2):
        env = log(f"trainer-{k}", "wm_claim", marker[k].claim(0).to_doc())
        marker[k].claimed(env.leaf)
    commit(1, 1)
    assert not reg.refused, reg.refused
    return roster, reg, marker, mods


def test_a_restarted_stage_recovers_its_key_mark_and_claim(chain):
    roster, reg, marker, mods = chain
    marks = reg.marks_of(1)
    assert len(marks) == 2  # its round-1 commitment and round-0 claim (stage 1 has no previous)
    tip = ChainTip.parse(ChainTip("trainer-1", 9, bytes(32), marks).to_doc())
    state = open_marks(tip.marks, roster, 1)
    fresh = Marker(RUN, b"", 1, roster.by_name("trainer-1").identity.public_key, mods[1], bits=16,
                   strength=0.1)
    fresh.resume(state)
    old = marker[1]
    assert fresh.current == old.current and fresh.last_claim == old.last_claim
    assert torch.equal(fresh.mark.x, old.mark.x) and torch.equal(fresh.mark.b, old.mark.b)
    fresh.start(1)  # the owner says round 1 again after the rollback: already committed
    assert fresh.ready_commit() is None and fresh.has_claimed(0) and not fresh.has_claimed(1)


def test_a_stage_that_had_not_committed_gets_the_previous_stages_commitment(chain):
    roster, reg, marker, mods = chain
    state = open_marks(reg.marks_of(2), roster, 2)  # committed and claimed round 0 only
    assert sorted(state.commits) == [0] and sorted(state.claims) == [0]
    assert state.previous[1].commitment == marker[1].current[0].commitment
    fresh = Marker(RUN, b"", 2, roster.by_name("trainer-2").identity.public_key, mods[2], bits=16,
                   strength=0.1)
    fresh.resume(state)
    fresh.start(1)
    commit = fresh.ready_commit()  # what the dead process would have committed to
    assert commit is not None and commit.prev_link == marker[1].current[0].commitment
    assert commit.prev_round == marker[2].last_claim


@pytest.mark.parametrize("tamper,said", [
    (lambda m: [[m[0][0], m[0][1] + b"\x00"]], "not the one its header names"),
    (lambda m: [[m[0][0][:-1] + bytes([m[0][0][-1] ^ 1]), m[0][1]]], "signature"),
    (lambda m: m * 2, "at most 3"),
])
def test_a_tampered_tip_is_refused(chain, tamper, said):
    roster, reg, *_ = chain
    with pytest.raises(MarksRefused, match=said):
        open_marks(tamper(reg.marks_of(1)), roster, 1)


def test_another_stages_messages_are_refused(chain):
    roster, reg, *_ = chain
    with pytest.raises(MarksRefused, match="not sent by this stage's trainer"):
        open_marks(reg.marks_of(2)[:1], roster, 1)  # stage 2's own commitment, as stage 1's
