"""Equivocation (review of issue 17): a roster member that says two different things where it
may say one. Two signed messages at one place of its chain (to show its receivers one and the
log the other) are proven by the notary, named by the owner, which stops the run, and by
`log verify` (exit 3); a message sent again (a restart's resend) is no equivocation, and a proof
that proves nothing is refused. Two snapshot commitments of one step, two answers to one step
trained again after a rollback, and a claim of a round the owner did not end (or a second
claim) are refusals naming the member."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import structlog

from clicooper_bus.layout import RunLayout
from clicooper_bus.net.equivocation import Equivocation, proven
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Sender
from clicooper_bus.net.witness import Witness
from clicooper_bus.protocol import ProtocolError
from clicooper_bus.protocol.recovery import Witnessed
from clicooper_bus.services.notary_evidence import NotaryEvidence
from clicooper_bus.tlog.logverify import verify_log
from tests.busrun import processes, write_config

RUN = "equiv"
IDS = {n: Identity.generate(n) for n in ("owner", "trainer-1", "trainer-2", "notary")}
ROSTER = Roster.build(RUN, owner=IDS["owner"].public,
                      trainers=[IDS["trainer-1"].public, IDS["trainer-2"].public],
                      notary=IDS["notary"].public)


def _sender(name: str = "trainer-1", run: str = RUN) -> Sender:
    sender = Sender(IDS[name], run)
    sender.nonce = ROSTER.nonce
    return sender


def _at_seq_3(sender: Sender, value: float):
    for step in range(2):
        sender.seal_array("fwd", "trainer-2", np.zeros((2, 3), np.float32), step=step)
    return sender.seal_array("fwd", "trainer-2", np.full((2, 3), value, np.float32), step=2)


def test_two_messages_at_one_seq_are_proven_and_the_conflicting_one_named():
    a, b = _at_seq_3(_sender(), 0.0), _at_seq_3(_sender(), 1.0)
    assert a.header.seq == b.header.seq == 3
    h, what = proven(Equivocation("trainer-1", a.leaf, b.leaf), ROSTER)
    assert (h.kind, h.step) == ("fwd", 2)
    assert what.startswith("trainer-1 signed two different messages at seq 3")


def test_a_message_that_follows_another_than_the_logged_one_is_a_fork():
    s = _sender()
    a = _at_seq_3(s, 0.0)
    s.prev = hashlib.sha256(b"another").digest()
    b = s.seal_array("fwd", "trainer-2", np.zeros((2, 3), np.float32), step=3)
    _, what = proven(Equivocation("trainer-1", a.leaf, b.leaf), ROSTER)
    assert "forked its chain at seq 3" in what
    honest = _sender()
    a = _at_seq_3(honest, 0.0)
    nxt = honest.seal_array("fwd", "trainer-2", np.zeros((2, 3), np.float32), step=3)
    with pytest.raises(ProtocolError, match="do not conflict"):
        proven(Equivocation("trainer-1", a.leaf, nxt.leaf), ROSTER)


@pytest.mark.parametrize("case, match", [
    ("same", "do not conflict"),  # one message twice: a resend
    ("other key", "is not signed by trainer-1's key"),
    ("other run", "of run 'elsewhere'"),
    ("garbage", "is not a message header"),
    ("stranger", "'mallory' is not in the roster"),
])
def test_a_proof_that_proves_nothing_is_refused_naming_its_sender(case, match):
    a = _at_seq_3(_sender(), 0.0)
    b = {"same": a, "other key": _at_seq_3(_sender("trainer-2"), 1.0),
         "other run": _at_seq_3(_sender(run="elsewhere"), 1.0)}.get(case, _at_seq_3(_sender(), 1.0))
    leaf = b"\x01" * 80 if case == "garbage" else b.leaf
    member = "mallory" if case == "stranger" else "trainer-1"
    with pytest.raises(ProtocolError, match=match) as info:
        proven(Equivocation(member, a.leaf, leaf), ROSTER, sender="notary")
    assert str(info.value).startswith("notary sent a malformed equivocation message")


class _Log:
    def __init__(self):
        self.leaves: list[bytes] = []

    def leaf(self, index: int) -> bytes:
        return self.leaves[index]


class _Bus:
    def __init__(self):
        self.verifier = Verifier(ROSTER, RUN)
        self.inbox = []  # verified, not yet logged


class _Notary(NotaryEvidence):
    """The notary's evidence methods over a log of what its verifier accepted."""

    def __init__(self):
        self.roster, self.ident, self.bus = ROSTER, IDS["notary"], _Bus()
        self.plog, self.logged_at, self.accused, self.evidence = _Log(), {}, set(), []
        self.ahead, self.log = {}, structlog.get_logger("test")
        self.witness_docs, self.compared = {}, set()

    def take(self, env) -> bool:
        """Whether the verifier accepted `env` (logged); else it is compared (`_conflict`)."""
        try:
            self.bus.verifier.verify_frames(env.frames())
        except Exception:
            self._conflict(env)
            return False
        self.logged_at[env.header.sender, env.header.seq] = len(self.plog.leaves)
        self.plog.leaves.append(env.leaf)
        self._filled(env)  # as `Notary._append` does
        return True


def test_the_notary_accuses_a_conflict_once_and_never_a_resend():
    notary, s = _Notary(), _sender()
    sent = [s.seal_array("fwd", "trainer-2", np.zeros((2, 3), np.float32), step=i)
            for i in range(3)]
    assert all(notary.take(env) for env in sent)
    assert not notary.take(sent[1]) and not notary.evidence  # sent again: the same message
    s.seq, s.prev = 1, sent[0].header.digest
    other = s.seal_array("fwd", "owner", np.ones((2, 3), np.float32), step=1)  # seq 2 again
    assert not notary.take(other) and not notary.take(other)
    (ev,) = notary.evidence  # one proof for the member, however often it repeats itself
    assert ev.logged == sent[1].leaf and ev.conflicting == other.leaf
    assert "signed two different messages at seq 2" in proven(ev, ROSTER)[1]


def test_a_message_refused_ahead_of_a_gap_must_be_the_one_that_fills_its_place():
    """Review of issue 17 (found live): a trainer sent its real `fwd` at seq s + 2, skipping
    s + 1 (the notary refused it for the gap, trainer-2 took it), then a beat at s + 1 and zeros
    at s + 2, which the notary logged: the log held an input trainer-2 never used, and nothing
    was refused. A message refused ahead of a gap is now kept (its header) and compared with
    the one that later fills its place; the same one again (a resend) is no equivocation."""
    notary, s = _Notary(), _sender()
    beat = s.seal_document("beat", "all", {})  # seq 1, held back
    real = s.seal_array("fwd", "trainer-2", np.ones((2, 3), np.float32), step=0)  # seq 2
    assert not notary.take(real)  # a gap: kept, not yet judged
    assert not notary.evidence
    s.seq, s.prev = beat.header.seq, beat.header.digest
    zeros = s.seal_array("fwd", "trainer-2", np.zeros((2, 3), np.float32), step=0)  # seq 2
    assert notary.take(beat) and notary.take(zeros)
    (ev,) = notary.evidence
    assert ev.logged == zeros.leaf and ev.conflicting == real.leaf
    assert "two different messages at seq 2" in proven(ev, ROSTER)[1]
    honest, t = _Notary(), _sender()
    first, second = (t.seal_document("beat", "all", {}) for _ in range(2))
    assert not honest.take(second) and honest.take(first) and honest.take(second)  # resent
    assert not honest.evidence and not honest.ahead[second.header.sender]


def test_a_conflict_with_a_message_verified_but_not_yet_logged_is_proven():
    """The two messages of an equivocation can arrive in one receive pass: the first is then
    verified and waiting in the inbox when the second is refused (a live run found it: the
    notary compared with nothing and proved only the fork that followed)."""
    notary, s = _Notary(), _sender()
    first = s.seal_array("fwd", "owner", np.zeros((2, 3), np.float32), step=0)
    notary.bus.verifier.verify_frames(first.frames())
    notary.bus.inbox.append(first)
    s.seq, s.prev = 0, bytes(32)
    other = s.seal_array("fwd", "trainer-2", np.ones((2, 3), np.float32), step=0)
    assert not notary.take(other)
    (ev,) = notary.evidence
    assert ev.logged == first.leaf and "two different messages at seq 1" in proven(ev, ROSTER)[1]


def _window():
    """Trainer 1's chain while the notary was down: seqs 1 and 2 logged, then seq 3 sent to
    trainer 2 only (the real activations), and the other message it sends again at seq 3 for
    the log once the notary is back (zeros)."""
    s = _sender()
    logged = [s.seal_document("beat", "all", {}) for _ in range(2)]
    real = s.seal_array("fwd", "trainer-2", np.ones((2, 3), np.float32), step=0)
    s.seq, s.prev = logged[-1].header.seq, logged[-1].header.digest
    again = s.seal_array("fwd", "trainer-2", np.zeros((2, 3), np.float32), step=0)
    return logged, real, again


def _shows(notary, leaves, presenter: str = "trainer-2", tipped: bool = True):
    """`presenter`'s `witnessed` document with `leaves`, logged and taken by the notary (after
    its `tip` with `resend` to the presenter, unless not `tipped`)."""
    kid = IDS[presenter].public.key_id
    if tipped:
        notary.witness_docs[kid] = notary.witness_docs.get(kid, 0) + 1
    env = _sender(presenter).seal_document("witnessed", "notary", Witnessed(leaves).to_doc())
    notary._witnessed(env)
    return env


@pytest.mark.parametrize("shown_first", [False, True])
def test_what_a_receiver_took_while_the_notary_was_down_is_compared_with_the_log(shown_first):
    """Issue 17's first gap: while the notary is down, messages reach their receivers and not
    the log, and a sender could send other ones again for the log. After the notary's `tip`
    with `resend`, each member shows it the leaves of what it accepted (`witnessed`); one that
    differs from the log's message at its place proves equivocation, whether the log has that
    place already or fills it later."""
    notary = _Notary()
    logged, real, again = _window()
    assert all(notary.take(env) for env in logged)
    if shown_first:
        _shows(notary, [real.leaf])
        assert not notary.evidence  # the log has no seq 3 yet: kept
        assert notary.take(again)
    else:
        assert notary.take(again)
        _shows(notary, [real.leaf])
    (ev,) = notary.evidence
    assert ev.member == "trainer-1" and ev.logged == again.leaf and ev.conflicting == real.leaf
    assert "two different messages at seq 3" in proven(ev, ROSTER)[1]


def test_what_a_receiver_shows_proves_nothing_when_it_is_what_the_log_holds_or_forged():
    """The honest case (the same message sent again) and leaves that are not a member's signed
    headers of this run (forged, another run's, garbage) prove nothing: no accusation."""
    notary = _Notary()
    logged, real, again = _window()
    assert all(notary.take(env) for env in [*logged, real])  # sent again: the same one
    _shows(notary, [real.leaf, logged[0].leaf])
    forged = bytearray(again.leaf)
    forged[-1] ^= 1  # its signature broken
    elsewhere = _sender(run="another").seal_array("fwd", "trainer-2", np.zeros((2, 3), np.float32),
                                                  step=0)
    _shows(notary, [bytes(forged), elsewhere.leaf, b"x" * 100])
    assert not notary.evidence and not notary.ahead.get(real.header.sender)


def _flood(notary, name: str = "trainer-1", base: int = 10**9):
    """Review of issue 17: a member's signed headers at places it will never reach, each
    refused by the notary as ahead of a gap, as many as the notary keeps places for."""
    from clicooper_bus.services.notary_evidence import MAX_AHEAD

    far = _sender(name)
    for i in range(MAX_AHEAD):
        far.seq = base + i - 1
        assert not notary.take(far.seal_document("usage", "notary", {}))


def test_a_flood_of_far_headers_leaves_both_comparisons_working():
    """Review of issue 17 (found live: every process exited 0 with the log holding zeros the
    receiver never used): a member filled the notary's table of places ahead of its chain with
    headers at seqs it would never reach, and neither a message refused ahead of a gap nor a
    receiver's shown leaf was compared any more. Only places within reach are kept now."""
    notary, s = _Notary(), _sender()
    first = s.seal_document("beat", "all", {})
    assert notary.take(first)
    _flood(notary)
    held = s.seal_document("beat", "all", {})  # seq 2, held back
    real = s.seal_array("fwd", "trainer-2", np.ones((2, 3), np.float32), step=0)  # seq 3
    assert not notary.take(real)
    s.seq, s.prev = held.header.seq, held.header.digest
    zeros = s.seal_array("fwd", "trainer-2", np.zeros((2, 3), np.float32), step=0)
    assert notary.take(held) and notary.take(zeros)
    assert [ev.member for ev in notary.evidence] == ["trainer-1"]
    shown, (logged, real, again) = _Notary(), _window()
    assert all(shown.take(env) for env in logged)
    _flood(shown)
    _shows(shown, [real.leaf])
    assert shown.take(again)
    assert [ev.member for ev in shown.evidence] == ["trainer-1"]


def test_two_different_headers_shown_at_one_place_prove_at_once():
    """No need to wait for the log to fill the place: two signed headers of one sender at one
    seq are the proof (a cheater could otherwise hold the place open past the notary's life)."""
    notary, (logged, real, again) = _Notary(), _window()
    assert all(notary.take(env) for env in logged)
    _shows(notary, [real.leaf, again.leaf])
    (ev,) = notary.evidence
    assert {ev.logged, ev.conflicting} == {real.leaf, again.leaf}
    assert "two different messages at seq 3" in proven(ev, ROSTER)[1]


def test_what_a_member_shows_unasked_or_could_not_have_accepted_is_not_compared():
    """Review of issue 17: `witnessed` cost the notary a signature check per leaf, from anyone
    at any time. Now only an answer to its `tip` with `resend` is taken, within a budget of
    documents; leaves that cannot be ones the presenter accepted (its own, one addressed to
    someone else) are skipped before any signature check, and each leaf is compared once."""
    notary, (logged, real, again) = _Notary(), _window()
    assert all(notary.take(env) for env in [*logged, again])
    _shows(notary, [real.leaf], tipped=False)
    assert not notary.evidence  # unasked: not read
    _shows(notary, [real.leaf], presenter="owner")  # addressed to trainer-2, not the owner
    _shows(notary, [real.leaf], presenter="trainer-1")  # its own
    assert not notary.evidence
    _shows(notary, [real.leaf])
    assert [ev.member for ev in notary.evidence] == ["trainer-1"]
    again_shown = _Notary()
    again_shown.compared = set(notary.compared)
    assert all(again_shown.take(env) for env in [*logged, again])
    _shows(again_shown, [real.leaf])
    assert not again_shown.evidence  # compared once already


def test_a_resumed_notary_compares_what_members_showed_its_earlier_life():
    """Review of issue 17: what a member showed lived in the notary's memory only; a notary
    resumed before the sender filled that place compared nothing (the member had shown its
    leaves already). Its `_reopen` reads the logged `witnessed` documents again."""
    notary, (logged, real, again) = _Notary(), _window()
    assert all(notary.take(env) for env in logged)
    doc = _shows(notary, [real.leaf])  # logged; seq 3 not yet in the log
    resumed = _Notary()  # the next life, its log read again
    assert all(resumed.take(env) for env in logged)
    resumed._witnessed(doc, replayed=True)  # as `_reopen` does, without a tip
    assert resumed.take(again)
    assert [ev.member for ev in resumed.evidence] == ["trainer-1"]


def test_a_member_keeps_what_it_accepted_and_shows_it_once_in_bounded_documents():
    """`net.witness`: the leaves of others' messages a member accepted, beats and its own
    left out, at most KEEP_WITNESSED; `Bus.show_witnessed` sends them in documents of at most
    MAX_WITNESSED leaves, each once."""
    from types import SimpleNamespace

    from clicooper_bus.net.bus import Bus

    witness = Witness(IDS["trainer-2"].public.key_id, keep=600)
    s, own, flooder = _sender(), _sender("trainer-2"), _sender("owner")
    witness.note(s.seal_document("beat", "all", {}))
    witness.note(own.seal_document("hello", "all", {}))
    sent = [s.seal_array("fwd", "trainer-2", np.zeros((1, 1), np.float32), step=i)
            for i in range(700)]
    for env in sent:
        witness.note(env)
    for _ in range(1000):  # a colluder's flood cannot push trainer-1's leaves out
        witness.note(flooder.seal_document("checkpoint", "all", {}))
    docs = []
    fake = SimpleNamespace(witness=witness, send_doc=lambda *a, **k: docs.append(a))
    assert Bus.show_witnessed(fake, "notary") == 1200
    assert [len(Witnessed.parse(d[2]).leaves) for d in docs] == [240] * 5
    assert {d[:2] for d in docs} == {("witnessed", "notary")}
    shown = [leaf for d in docs for leaf in Witnessed.parse(d[2]).leaves]
    assert shown[:600] == [env.leaf for env in sent[100:]]  # each sender's last 600, in order
    assert Bus.show_witnessed(fake, "notary") == 0  # shown once
    with pytest.raises(ProtocolError, match="more than 240 leaves"):
        Witnessed.parse({"leaves": [sent[0].leaf] * 241})


@pytest.mark.parametrize("how, said", [("equivocate", "signed two different messages at seq"),
                                       ("fork", "forked its chain at seq")])
def test_an_equivocating_trainer_is_named_and_the_run_stops(tmp_path, how, said):
    """Trainer 1 signs its step-3 activations twice at one seq (zeros to the owner first, which
    the notary logs, then the real ones to trainer 2, which trainer 2 alone receives), or sends
    them after a message it never sent: the notary publishes the proof, the owner checks it and
    stops the run naming trainer 1, and `log verify` says what the log proves."""
    from clicooper_bus.tools.cli import main

    # room for the proof to arrive before training ends: with 12 steps, under a load of 5 on
    # 2 cores, the trainers once left with 0 while the owner stopped (3), most likely because
    # training ended before the proof reached the owner; the stop ends the run early, so more
    # steps cost nothing
    path = write_config(tmp_path, run_id=f"equiv-{how}", trainers=2, run={"max_steps": 48})
    with processes(path, evil=f"{how}:fwd:3", evil_as="trainer-1") as (cfg, tel, procs):
        codes = {n: p.wait(timeout=120) for n, p in procs.items() if n != "broker"}
    assert codes == {"notary": 0, "owner": 3, "trainer-1": 3, "trainer-2": 3}, codes
    layout = RunLayout(cfg.run_dir)
    stopped = json.loads(layout.summary.read_text())["stopped"]
    assert (stopped["by"], stopped["sender"], stopped["kind"], stopped["step"]) == \
        ("owner", "trainer-1", "fwd", 3), stopped
    assert stopped["problem"].startswith(f"trainer-1 {said}"), stopped
    assert not layout.model.exists()
    r = verify_log(layout.log)
    assert r.ok, r.failure
    assert len(r.equivocations) == 1 and said in r.equivocations[0], r.equivocations
    assert main(["log", "verify", str(layout.log)]) == 3


def test_an_equivocating_owner_is_named_and_the_notary_stops_the_run(tmp_path):
    """Issue 17's gap: the owner signs its step-3 activations twice at one seq (zeros to the last
    trainer first, which the notary logs, then the real ones to the first trainer), and ignores
    the proof, as an owner that means it would. Nobody but the notary can stop the run: it
    publishes the proof and a final checkpoint over it, every trainer checks the proof and leaves
    naming the owner, and the log closes complete, with the proof (`log verify` exits 3). The
    owner is left running, for `clicooper run` to stop (one test of the kind: the suite's time)."""
    from clicooper_bus.tools.cli import main

    path = write_config(tmp_path, run_id="owner-deaf", trainers=2, run={"max_steps": 12})
    with processes(path, evil="deaf:3", evil_as="owner") as (cfg, tel, procs):
        codes = {n: p.wait(timeout=120) for n, p in procs.items()
                 if n not in ("broker", "owner")}
        assert procs["owner"].poll() is None
    assert codes == {"notary": 3, "trainer-1": 3, "trainer-2": 3}, codes
    for t in ("trainer-1", "trainer-2"):
        said = (tel / f"{t}.jsonl").read_text()
        assert "owner signed two different messages at seq" in said, t
    r = verify_log(RunLayout(cfg.run_dir).log)
    assert r.ok, r.failure
    assert r.uncovered == 0, "the notary's closing checkpoint covers the whole log"
    assert len(r.equivocations) == 1 and "owner signed two" in r.equivocations[0], \
        r.equivocations
    assert main(["log", "verify", str(RunLayout(cfg.run_dir).log)]) == 3


def test_a_second_different_snapshot_commitment_of_a_step_is_refused():
    """Review of issue 17: a later `snapshot` of a step overwrote the first, so a trainer could
    commit, after the fact, to the state it meant to restore. The first stands until a rollback
    before it; the same one again is ignored; one from a trainer not restored since the
    rollback is stale and dropped."""
    from types import SimpleNamespace

    from clicooper_bus.errors import PoisonedInput
    from clicooper_bus.protocol.recovery import Snapshot
    from clicooper_bus.services.owner.books import Books

    books = Books(["trainer-1"], {"k1": "trainer-1"}, None, "o", "spec", 1)

    def snapshot(step: int, state: str):
        doc = Snapshot(step, "a" * 64, state).to_doc()
        return SimpleNamespace(header=SimpleNamespace(sender="k1", step=step, kind="snapshot"),
                               document=lambda: doc)

    books.on_snapshot(snapshot(4, "b" * 64))
    books.on_snapshot(snapshot(4, "b" * 64))  # the same again: nothing happens
    with pytest.raises(PoisonedInput, match="a second, different commitment") as info:
        books.on_snapshot(snapshot(4, "c" * 64))
    assert (info.value.sender, info.value.step) == ("trainer-1", 4)
    assert books.snapshots["trainer-1"][4].state == "b" * 64
    books.fenced = {"k1"}  # a rollback: until it restores, what it sends is stale
    books.on_snapshot(snapshot(8, "d" * 64))
    assert 8 not in books.snapshots["trainer-1"]


def test_a_step_answered_differently_after_a_rollback_is_refused():
    """Review of issue 17: after a rollback the owner took whatever the trainers sent for the
    steps trained again; a member answering a step twice differently learns from both of the
    owner's answers. The first `fwd` or `bwd` of each step is kept by its hash: the same again
    is counted, another one is a refusal naming the sender and the step (with in_flight 1; a
    pipelined run's window restarts empty, so there it is counted as differing)."""
    from types import SimpleNamespace

    from clicooper_bus.errors import PoisonedInput
    from clicooper_bus.services.owner.books import Books

    books = Books(["trainer-1"], {"k1": "trainer-1"}, None, "o", "spec", 1)

    def data(kind: str, step: int | None, body: bytes):
        return SimpleNamespace(header=SimpleNamespace(sender="k1", step=step, kind=kind,
                                                      body_sha256=hashlib.sha256(body).digest()))

    books.compare(data("bwd", 3, b"gradients"))
    books.compare(data("bwd", 3, b"gradients"))
    books.compare(data("fwd", 3, b"other kind, its own first"))
    books.compare(data("metrics", 3, b"not compared here"))
    books.compare(data("metrics", 3, b"(on_metrics refuses a second)"))
    assert books.replays_compared == 1
    with pytest.raises(PoisonedInput, match="another bwd of step 3 than before") as info:
        books.compare(data("bwd", 3, b"other gradients"))
    assert (info.value.sender, info.value.kind, info.value.step) == ("trainer-1", "bwd", 3)
    pipelined = Books(["trainer-1"], {"k1": "trainer-1"}, None, "o", "spec", 2)
    pipelined.compare(data("bwd", 3, b"gradients"))
    pipelined.compare(data("bwd", 3, b"after a window that restarted empty"))
    assert (pipelined.replays_compared, pipelined.replays_differing) == (0, 1)


def test_a_claim_is_taken_only_for_the_round_the_owner_ended_and_once():
    """Review of issue 17: a claim of any round was taken, so a claim of round 99 put the
    earliest step a rollback may go to past the run's end (every rollback refused), and a
    second claim replaced the first. Now a claim counts only for the round the owner's last
    `round end` named; the same again is ignored; another is a refusal naming the trainer."""
    from types import SimpleNamespace

    from clicooper_bus.chain.documents import Claim
    from clicooper_bus.errors import PoisonedInput
    from clicooper_bus.services.owner.books import Books

    books = Books(["trainer-1"], {"k1": "trainer-1"}, None, "o", "spec", 1)

    def claim(round_: int, errors: int = 0):
        doc = Claim(1, round_, b"c" * 32, b"w" * 32, b"\x00" * 8, 64, errors).to_doc()
        return SimpleNamespace(header=SimpleNamespace(sender="k1", step=None, kind="wm_claim"),
                               document=lambda: doc, leaf=b"leaf %d" % round_)

    def refused(env) -> str:
        with pytest.raises(PoisonedInput) as info:
            books.on_claim(env)
        assert (info.value.sender, info.value.kind) == ("trainer-1", "wm_claim")
        return info.value.problem

    assert "no round yet" in refused(claim(0))
    books.said = (0, "start")
    assert "the owner's last word was round 0 start" in refused(claim(0))
    books.said = (0, "end")
    assert "a claim of round 99" in refused(claim(99))
    books.on_claim(claim(0))
    books.on_claim(claim(0))  # the same claim again (a restarted trainer's): ignored
    assert "a second, different claim of round 0" in refused(claim(0, errors=3))
    assert set(books.claims) == {(1, 0)} and books.claims[(1, 0)].bit_errors == 0


def test_a_resumed_owner_takes_only_the_rejoins_the_live_owner_took():
    """Review of issue 17: a resumed owner replaying its log took every logged `rejoin`'s
    snapshot digests as commitments, including one the live owner had refused (a live member's:
    not after the notary's tip), which a later rollback could then go to. The replay judges
    them as the live owner did: only a rejoin that follows the notary's logged tip commits."""

    from clicooper_bus.protocol.recovery import ChainTip, Rejoin

    owner, tips = _replaying_owner(), {}
    trainer, notary = _sender(), _sender("notary")

    def rejoin(step: int):
        return trainer.seal_document("rejoin", "owner", Rejoin(1, [step], ["e" * 64]).to_doc())

    owner._replayed_rejoin(rejoin(20), tips)  # seq 1: a live member's, never tipped
    owner._replayed_tip(notary.seal_document(
        "tip", "trainer-1", ChainTip("trainer-1", 1, b"\0" * 32).to_doc()), tips)
    owner._replayed_rejoin(rejoin(30), tips)  # seq 2: after the tip, a restarted process's
    owner._replayed_rejoin(rejoin(40), tips)  # seq 3: not the first after the tip
    assert "trainer-1" not in owner.books.snapshots  # held until a rollback names it
    owner._replayed_rollback(_owner_rollback(50, "trainer-1"))  # a log from before `rejoins`
    assert sorted(owner.books.snapshots["trainer-1"]) == [30]


def _replaying_owner():
    """The part of a resumed owner that replays its log (`Resumes`), with empty books."""
    from types import SimpleNamespace

    from clicooper_bus.services.owner.books import Books
    from clicooper_bus.services.owner.resume import Resumes

    class Owner(Resumes):
        def __init__(self):
            self.cfg = SimpleNamespace(participants=SimpleNamespace(notary="notary",
                                                                    owner="owner"))
            self.stages = ["trainer-1", "trainer-2"]
            self.books = Books(self.stages, {IDS[n].key_id: n for n in IDS}, None, "o", "spec", 1)
            self.rollbacks, self.logged_rejoins = 0, {}

    return Owner()


def _owner_rollback(step: int, rejoined: str, rejoins: list[str] | None = None):
    from clicooper_bus.protocol.recovery import Rollback

    return _sender("owner").seal_document("rollback", "all",
                                          Rollback(step, rejoined, None, rejoins).to_doc())


def test_a_resumed_owner_takes_the_commitments_of_the_rejoins_its_rollbacks_name_only():
    """Review: a rejoin the live owner refused (a tip it had used, or heard the trainer since)
    still follows a logged tip, and the replay took its commitments. Each rollback names the
    rejoins it was for (`Rollback.rejoins`, their header digests); the replay takes those."""

    from clicooper_bus.protocol.recovery import ChainTip, Rejoin

    owner, tips = _replaying_owner(), {}
    trainer, notary = _sender(), _sender("notary")
    owner._replayed_tip(notary.seal_document(
        "tip", "trainer-1", ChainTip("trainer-1", 0, b"\0" * 32).to_doc()), tips)
    taken = trainer.seal_document("rejoin", "owner",
                                  Rejoin(1, [30], ["e" * 64], after=0).to_doc())
    refused = trainer.seal_document("rejoin", "owner",
                                    Rejoin(1, [40], ["f" * 64], after=0).to_doc())
    owner._replayed_rejoin(taken, tips)
    owner._replayed_rejoin(refused, tips)  # the same tip again: the live owner refused it
    owner._replayed_rollback(_owner_rollback(60, "broker"))  # another rollback between
    assert not owner.books.snapshots.get("trainer-1")
    owner._replayed_rollback(_owner_rollback(50, "trainer-1", [taken.header.digest.hex()]))
    assert sorted(owner.books.snapshots["trainer-1"]) == [30]
    assert list(owner.logged_rejoins) == [refused.header.digest.hex()]  # never named


def test_a_resumed_owner_replays_its_handovers():
    """Review of issue 17: a resumed owner did not replay its logged `handover`s, so it went on
    with the gone trainer in the stage list (and without the handover in the bundle). Now the
    replay takes the standby over as the live handover did."""
    from types import SimpleNamespace

    from clicooper_bus.protocol.recovery import Handover, Snapshot
    from clicooper_bus.services.owner.books import Books
    from clicooper_bus.services.owner.handover import Handovers
    from clicooper_bus.services.owner.resume import Resumes

    standby = Identity.generate("standby-1")
    names = {**{IDS[n].key_id: n for n in IDS}, standby.key_id: "standby-1"}

    class Owner(Handovers, Resumes):
        def __init__(self):
            self.cfg = SimpleNamespace(participants=SimpleNamespace(owner="owner"))
            self.stages = ["trainer-1", "trainer-2"]
            self.books = Books(self.stages, names, None, "o", "spec", 1)
            self.handovers, self.used_standby = [], set()

    owner = Owner()
    owner.books.snapshots["trainer-2"] = {20: Snapshot(20, "a" * 64, "b" * 64)}
    owner.books.commits = {(1, 1): "commit of round 1", (1, 0): "commit of round 0"}
    env = _sender("owner").seal_document("handover", "all", Handover(
        2, 1, 20, "trainer-2", "standby-1", b"sealed", b"").to_doc(), step=20)
    owner._replayed_handover(env)
    assert owner.stages == ["trainer-1", "standby-1"] == owner.books.stages
    assert owner.books.snapshots["standby-1"] == {20: Snapshot(20, "a" * 64, "b" * 64)}
    assert owner.used_standby == {"standby-1"} and owner.handovers == [[env.leaf, env.body]]
    assert set(owner.books.commits) == {(1, 0)}  # round 1 starts again
    forged = _sender("trainer-1").seal_document("handover", "all", Handover(
        1, 1, 20, "trainer-1", "standby-1", b"sealed", b"").to_doc(), step=20)
    owner._replayed_handover(forged)  # only the owner's own handovers count
    assert owner.stages == ["trainer-1", "standby-1"]
    owner.books.received = {("bwd", "k", 10): b"a", ("bwd", "k", 25): b"b"}
    owner._replayed_handover(_sender("owner").seal_document("handover", "all", Handover(
        1, 1, 20, "trainer-1", "standby-1", b"sealed", b"").to_doc(), step=20))
    # (found live: the standby's round has new watermark keys, so the steps trained again
    # answer differently, and an honest trainer was refused for it)
    assert set(owner.books.received) == {("bwd", "k", 10)}


def test_the_notary_logs_its_own_messages_before_it_publishes_them():
    """Review of issue 17: the notary logged its own messages when they came back from the
    broker, so one killed in between left out of the log a message its peers had received, and
    started again it signed another at that seq (a fork of its own chain, refused by every peer
    as a replay). Now each is taken before it is published, and never read back."""
    from clicooper_bus.net.bus import Bus, BusAddress

    notary = IDS["notary"]
    bus = Bus(notary, RUN, BusAddress("tcp://127.0.0.1:9", "tcp://127.0.0.1:9"),
              Verifier(ROSTER, RUN))
    try:
        order: list[tuple[str, int]] = []
        bus._publish = lambda env: order.append(("published", env.header.seq))
        bus.own_first(lambda env: order.append(("logged", env.header.seq)))
        bus.send_doc("beat", "all", {})
        bus.send_doc("beat", "all", {})
        assert order == [("logged", 1), ("published", 1), ("logged", 2), ("published", 2)]

        class Frame:
            def __init__(self, data):
                self.buffer = data

        ours = Sender(notary, RUN).seal_document("beat", "all", {})
        theirs = _sender().seal_document("beat", "all", {})
        assert bus._ours([Frame(f) for f in ours.frames()])
        assert not bus._ours([Frame(f) for f in theirs.frames()])
    finally:
        bus.close()


def test_a_trainer_that_comes_back_replaced_leaves_naming_its_standby():
    """Review of issue 17: a trainer paused past the rejoin timeout, whose stage went to a
    standby meanwhile, crashed on the owner's `handover` when it continued (it was no longer
    in the stage order). It now leaves, saying who took its stage over and from which step."""
    from types import SimpleNamespace

    from clicooper_bus.protocol.recovery import Handover
    from clicooper_bus.services.trainer.standby import Replaced, Standby

    class Trainer(Standby):
        name, stages = "trainer-2", ["trainer-1", "trainer-2"]
        roster = SimpleNamespace(owner=SimpleNamespace(name="owner"))

    env = _sender("owner").seal_document("handover", "all", Handover(
        2, 1, 20, "trainer-2", "standby-1", b"sealed", b"").to_doc(), step=20)
    with pytest.raises(Replaced, match="over to standby-1 from step 20"):
        Trainer()._on_handover(env)


def test_a_resumed_owner_takes_up_only_the_round_snapshots_it_committed_to(tmp_path):
    """Review of issue 17: `--resume` trusted the owner's round snapshot files as they were on
    disk. Each is now committed in the log (the owner's signed `snapshot`, its file's SHA-256);
    a resumed owner takes up only a file whose bytes are the last it committed for that step,
    and refuses to resume, naming each file, when none is."""
    from clicooper_bus.errors import ClicooperError
    from clicooper_bus.layout import SnapshotLayout
    from clicooper_bus.services.owner.resume import Resumes, RoundStore

    store = RoundStore(SnapshotLayout(tmp_path / "owner"), "nonce")
    store.layout.root.mkdir(parents=True)
    for step, body in ((20, b"round 1"), (40, b"round 2")):
        store.layout.state(step).write_bytes(body)

    class Owner(Resumes):
        rounds_store = store
        committed_rounds = {20: hashlib.sha256(b"round 1").hexdigest(),
                            40: hashlib.sha256(b"round 2").hexdigest()}

    owner = Owner()
    assert owner._committed_steps([20, 40]) == [20, 40]
    store.layout.state(40).write_bytes(b"changed on disk, or written and never committed")
    assert owner._committed_steps([20, 40]) == [20]
    store.layout.state(20).write_bytes(b"changed too")
    with pytest.raises(ClicooperError, match="step 20: file sha256 .*, logged .*the run cannot"):
        owner._committed_steps([20, 40])


def test_proofs_across_runs_and_documents_from_members_prove_nothing(tmp_path):
    """Review of issue 17: two leaves of two runs with the same id but another roster nonce
    made a proof; and a trainer's own `equivocation` document (a member may send any kind)
    failed the whole log in `log verify`, where it is that member's bogus message."""
    from clicooper_bus.tlog.logverify import VerifyResult, _check_equivocation

    a = _at_seq_3(_sender(), 0.0)
    other = Sender(IDS["trainer-1"], RUN)
    other.nonce = b"\x07" * len(ROSTER.nonce)
    b = _at_seq_3(other, 1.0)
    with pytest.raises(ProtocolError, match="but another nonce"):
        proven(Equivocation("trainer-1", a.leaf, b.leaf), ROSTER)
    r = VerifyResult(log="x")
    forged = _sender().seal_document("equivocation", "all", {}).header
    _check_equivocation(None, r, ROSTER, forged, 9)
    assert r.warnings == ["entry 9 is an equivocation document from trainer-1, not the notary: "
                          "not a proof, ignored"] and not r.equivocations


def test_a_resumed_owner_compares_the_answers_its_log_holds(tmp_path):
    """Review of issue 17: a resumed owner's books started with no answer kept, so after an
    owner restart a trainer could answer the steps trained again differently. The replay now
    keeps the hash of every logged `fwd` or `bwd` a trainer sent the owner, as the live owner
    did, and one that answered a step differently after a rollback is refused."""
    from types import SimpleNamespace

    from clicooper_bus.errors import PoisonedInput
    from clicooper_bus.protocol.recovery import Rollback
    from clicooper_bus.services.owner.books import Books
    from clicooper_bus.services.owner.resume import Resumes
    from clicooper_bus.tlog.log import ProvenanceLog

    roster_bytes = ROSTER.sign(IDS["owner"])
    names = {IDS[n].key_id: n for n in IDS}

    def log_of(answers: list[float]) -> SimpleNamespace:
        path = tmp_path / f"log-{len(list(tmp_path.iterdir()))}"
        plog = ProvenanceLog.create(path, roster_bytes=roster_bytes, run_id=RUN,
                                    retention="all", fsync="never", signer=IDS["notary"])
        owner, trainer, verifier = _sender("owner"), _sender(), Verifier(ROSTER, RUN)
        sent = [owner.seal("roster", "all", roster_bytes)]
        for i, value in enumerate(answers):
            if i:
                sent.append(owner.seal_document("rollback", "all", Rollback(0, "trainer-1")
                                                .to_doc(), step=0))
            sent.append(trainer.seal_array("bwd", "owner", np.full((2, 3), value, np.float32),
                                           step=0))
        for env in sent:
            plog.append_envelope(verifier.verify_frames(env.frames()))
        plog.close()
        return SimpleNamespace(log=path)

    class Owner(Resumes):
        def __init__(self, layout):
            self.cfg = SimpleNamespace(participants=SimpleNamespace(owner="owner",
                                                                    notary="notary"))
            self.stages, self.layout, self.tips, self.rollbacks = ["trainer-1", "trainer-2"], \
                layout, {}, 0
            self.books = Books(self.stages, names, None, "o", "spec", 1)
            self.committed_rounds, self.handovers = {}, []

    same = Owner(log_of([0.0, 0.0]))
    same._replay_log()
    assert same.books.replays_compared == 1
    with pytest.raises(PoisonedInput, match="another bwd of step 0 than before"):
        Owner(log_of([0.0, 1.0]))._replay_log()


def test_a_restarted_trainer_learns_the_handovers_it_missed_from_the_rollback():
    """Review of issue 17: a trainer restarted after a standby took another stage over rejoined
    with the stage order of the roster on its disk, and sent its activations to the gone
    trainer. The owner's `rollback` now carries the amended order (only when a handover changed
    it: older logs stay byte for byte), and the trainer takes it, or leaves if it no longer
    holds a stage; an order naming a stranger is refused."""
    from types import SimpleNamespace

    from clicooper_bus.errors import ClicooperError
    from clicooper_bus.protocol.recovery import Rollback
    from clicooper_bus.services.trainer.standby import Replaced, Standby

    assert Rollback(5, "trainer-1").to_doc() == {"step": 5, "rejoined": "trainer-1"}
    amended = Rollback.parse(Rollback(5, "trainer-1", ["trainer-1", "standby-1"]).to_doc())
    assert amended.stages == ["trainer-1", "standby-1"]
    with pytest.raises(ProtocolError, match="names a trainer twice"):
        Rollback.parse({"step": 5, "rejoined": "x", "stages": ["a", "a"]})

    class Trainer(Standby):
        name = "trainer-1"
        roster = SimpleNamespace(stages=("trainer-1", "trainer-2"), standby=("standby-1",),
                                 owner=SimpleNamespace(name="owner"))

        def __init__(self):
            self.stages, self.placed, self.watched = list(self.roster.stages), 0, None
            self.kid = {n: f"k-{n}" for n in ("owner", "trainer-1", "trainer-2", "standby-1")}
            self.bus = SimpleNamespace(watch=lambda peers: setattr(self, "watched", peers))

        def _place(self, roster):
            self.placed += 1
            self.prev, self.next = "owner", self.stages[1]

        def _routes(self):
            pass

    t = Trainer()
    t._restage(["trainer-1", "standby-1"])
    assert t.stages == ["trainer-1", "standby-1"] and t.placed == 1
    assert set(t.watched.values()) == {"owner", "standby-1"}
    with pytest.raises(ClicooperError, match="not one of the roster's 2 stages"):
        t._restage(["trainer-1", "mallory"])
    with pytest.raises(Replaced, match="no longer holds us"):
        t._restage(["standby-1", "trainer-2"])
