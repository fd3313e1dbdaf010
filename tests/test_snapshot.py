"""A stage's snapshot (issue 17 item 1): what it holds, the digests a trainer commits to, and
where it keeps them. Restoring one continues training bit for bit."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from clicooper_bus.errors import ClicooperError
from clicooper_bus.layout import RunLayout
from clicooper_bus.ml.split import SegmentTrainer
from clicooper_bus.services.trainer import snapshot


def _segment(seed: int = 0) -> SegmentTrainer:
    torch.manual_seed(seed)
    return SegmentTrainer(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), lr=0.01)


def _train(seg: SegmentTrainer, steps: range) -> None:
    for s in steps:
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
        seg.forward(x, s)
        seg.loss_backward(y, s)


def test_the_canonical_digest_is_the_documented_serialisation():
    """Recomputed by hand from the module docstring's definition."""
    t = {"b": torch.tensor([1.0, -2.0]), "a": torch.tensor(7, dtype=torch.int64)}
    h = hashlib.sha256(b"clicooper-snapshot-v1\nstep 5\n")
    h.update(b"a\tint64\t\n" + (7).to_bytes(8, "little"))
    h.update(b"b\tfloat32\t2\n" + torch.tensor([1.0, -2.0]).numpy().tobytes())
    assert snapshot.canonical_digest(t, 5) == h.hexdigest()
    assert snapshot.canonical_digest(t, 6) != snapshot.canonical_digest(t, 5)
    assert snapshot.canonical_digest(t) != snapshot.canonical_digest(t, 5)
    # the same numbers under another dtype or shape are another state
    assert snapshot.canonical_digest({**t, "b": torch.tensor([[1.0, -2.0]])}, 5) != \
        snapshot.canonical_digest(t, 5)


def test_a_restored_snapshot_trains_on_bit_for_bit():
    """Weights, Adam's moments and step counts, RNG: a segment restored from a snapshot of
    step 3 and trained to step 8 ends with the weights of one trained straight through."""
    straight = _segment()
    _train(straight, range(8))
    seg = _segment()
    _train(seg, range(3))
    snap = snapshot.take(seg, 3)
    _train(seg, range(3, 6))  # moves on: the snapshot holds copies, not the live tensors
    assert snapshot.take(seg, 6).state != snap.state
    fresh = _segment(seed=1)  # other weights, no Adam state yet
    snapshot.restore(fresh, snap.tensors)
    assert snapshot.take(fresh, 3).state == snap.state
    _train(fresh, range(3, 8))
    for a, b in zip(fresh.module.state_dict().values(), straight.module.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert snapshot.weights_digest(fresh.module) == snapshot.weights_digest(straight.module)
    # the weights digest is the state_dict's, as delivered in a segment
    assert snapshot.take(fresh, 8).weights == snapshot.weights_digest(fresh.module)


def test_a_snapshot_before_the_first_update_restores_an_empty_optimiser():
    seg = _segment()
    snap0 = snapshot.take(seg, 0)
    assert not any(k.startswith("adam/") for k in snap0.tensors)
    _train(seg, range(2))
    snapshot.restore(seg, snap0.tensors)
    assert not seg.optimizer.state and snapshot.take(seg, 0).state == snap0.state


def test_the_store_keeps_two_on_disk_three_in_memory_and_reads_back_what_it_wrote(tmp_path):
    layout = RunLayout(tmp_path).snapshots("trainer-1")
    store = snapshot.Store(layout, {"run_id": "r"})
    seg = _segment()
    taken = {}
    for step in (0, 10, 20, 30):
        _train(seg, range(step, step + 10))
        taken[step] = snapshot.take(seg, step)
        assert store.keep(taken[step]) > 0
    assert layout.steps() == [20, 30]
    assert sorted(store.memory) == [10, 20, 30]
    assert not list(layout.root.glob("*.tmp"))
    again = snapshot.Store(layout, {})  # a restarted process: nothing in memory
    got = again.get(20)
    assert (got.state, got.weights) == (taken[20].state, taken[20].weights)
    assert again.get(10) is None
    store.save_roster(b"roster")  # a new run joined: no file of an earlier run's is kept
    assert layout.roster.read_bytes() == b"roster" and layout.steps() == []
    layout.state(30).write_bytes(b"not safetensors")
    with pytest.raises(ClicooperError, match="cannot be read"):
        again.get(30)


def test_the_store_keeps_round_boundaries_forgets_an_abandoned_timeline_and_its_runs_own(
        tmp_path):
    """Review and resume: the newest two round boundaries stay on disk beside the newest two
    snapshots (a resumed run goes back to the last round snapshot); a rollback forgets the
    snapshots after its step (the abandoned timeline's); a file of another run (another run
    nonce) is never read as ours."""
    layout = RunLayout(tmp_path).snapshots("trainer-1")
    store = snapshot.Store(layout, {"nonce": "aa"}, boundary=lambda s: s % 20 == 0)
    seg = _segment()
    for step in (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50):
        store.keep(snapshot.take(seg, step))
    assert layout.steps() == [20, 40, 45, 50]
    store.drop_after(40)
    assert layout.steps() == [20, 40] and sorted(store.memory) == [40]
    with pytest.raises(ClicooperError, match="of another run"):
        snapshot.Store(layout, {"nonce": "bb"}).get(20)
    store.save_roster(b"roster")
    store.keep(snapshot.take(seg, 60))
    store.clear()  # the run is over: the next run of this id joins instead of rejoining
    assert layout.steps() == [] and not layout.roster.exists() and not store.memory


def test_a_snapshot_of_another_model_is_refused_naming_it():
    snap = snapshot.take(_segment(), 0)
    other = SegmentTrainer(nn.Sequential(nn.Linear(6, 4)), lr=0.01)
    with pytest.raises(ClicooperError, match="does not fit this stage"):
        snapshot.restore(other, snap.tensors)


def test_the_rollback_step_is_the_newest_every_stage_committed_and_the_owner_kept():
    from clicooper_bus.protocol.recovery import Rejoin
    from clicooper_bus.services.owner.rollback import rollback_step

    a, b, c = "aa" * 32, "bb" * 32, "cc" * 32
    stages = ["trainer-1", "trainer-2"]
    rejoin = Rejoin(1, [20, 30], [a, b])
    # trainer-2 is one snapshot ahead; trainer-1 died before announcing 30: its rejoin commits it
    committed = {"trainer-1": {10: c, 20: a}, "trainer-2": {10: c, 20: c, 30: c, 40: c}}
    assert rollback_step("trainer-1", rejoin, committed, stages, {20, 30, 40}) == 30
    # the owner no longer keeps 30: back to 20
    assert rollback_step("trainer-1", rejoin, committed, stages, {20, 40}) == 20
    # a file whose digest is not what the dead process committed is not resumed from
    committed["trainer-1"][30] = c
    assert rollback_step("trainer-1", rejoin, committed, stages, {20, 30}) == 20
    # nothing in common: refused, naming what each holds
    with pytest.raises(ClicooperError, match=r"no step of them .* trainer-2: \[10, 20, 30, 40\]"):
        rollback_step("trainer-1", Rejoin(1, [50], [a]), committed, stages, {20, 30})
    # watermarks on: never behind the end of a claimed round (step 30 here)
    committed["trainer-1"][30] = b
    assert rollback_step("trainer-1", rejoin, committed, stages, {20, 30}, floor=30) == 30
    with pytest.raises(ClicooperError, match="none may come before step 40"):
        rollback_step("trainer-1", rejoin, committed, stages, {20, 30}, floor=40)


def test_only_a_restarted_process_rolls_the_run_back():
    """Review: a live member could say rejoin (up to the cap) and roll the run back for
    nothing. A restarted process's rejoin names a tip of the notary's to it (`after`; without
    it, the rejoin must be the first message after a tip), with at most what its dead process
    could send again from its outbox between the two; anything else is refused (ignored,
    logged, said on the console)."""
    import time
    from types import SimpleNamespace

    from clicooper_bus.net.refill import KEEP_SENT
    from clicooper_bus.protocol.recovery import Rejoin
    from clicooper_bus.services.owner.rejoins import Rejoins

    now = time.monotonic()
    owner = SimpleNamespace(tips={"trainer-2": {30: now, 41: now, 25: now - 100}},
                            cfg=SimpleNamespace(bus=SimpleNamespace(rejoin_timeout_s=30.0)))
    legacy = Rejoin(2, [0], ["0" * 64])
    assert "no tip of the notary's" in Rejoins._not_restarted(owner, "trainer-1", 12, legacy)
    # (a tip counts for one rejoin: the owner forgets it once it took one, `_on_rejoin`)
    assert "does not follow a tip" in Rejoins._not_restarted(owner, "trainer-2", 50, legacy)
    assert Rejoins._not_restarted(owner, "trainer-2", 42, legacy) is None
    assert Rejoins._not_restarted(owner, "trainer-2", 31, legacy) is None  # an earlier tip
    # with an outbox: the dead process's messages between the tip it names and the rejoin
    after = Rejoin(2, [0], ["0" * 64], after=41)
    assert Rejoins._not_restarted(owner, "trainer-2", 50, after) is None
    assert "does not follow a tip" in Rejoins._not_restarted(owner, "trainer-2", 41, after)
    assert "does not follow a tip" in Rejoins._not_restarted(
        owner, "trainer-2", 41 + KEEP_SENT + 2, after)  # more than it could send again
    unseen = Rejoin(2, [0], ["0" * 64], after=45)  # a tip the owner never saw
    assert "does not follow a tip" in Rejoins._not_restarted(owner, "trainer-2", 50, unseen)
    assert Rejoin.parse(after.to_doc()) == after and "after" not in legacy.to_doc()
    # a tip counts for rejoin_timeout_s: one older is a live member's old credit
    assert "does not follow a tip" in Rejoins._not_restarted(owner, "trainer-2", 26, legacy)


def test_a_tip_counts_only_for_a_trainer_we_take_for_silent():
    """Review: the owner kept every tip (a resumed notary's `resend` tips to everyone, one a
    member got by opening a gap on purpose) and a live trainer rejoined on one 146 messages
    later, rolling the run back to a step an honest trainer no longer held. A plain tip (the
    notary found the trainer silent past timeout_s, maybe a moment before we did) counts; a
    `resend` tip counts only for a trainer the owner takes for silent itself."""
    from types import SimpleNamespace

    from clicooper_bus.net.identity import Identity
    from clicooper_bus.net.wire import Sender
    from clicooper_bus.protocol.recovery import ChainTip
    from clicooper_bus.services.owner.rejoins import Rejoins

    class Owner(Rejoins):
        tips: dict = {}
        stages = ["trainer-1", "trainer-2", "trainer-3"]
        kid = {"trainer-1": "k1", "trainer-2": "k2", "trainer-3": "k3"}
        bus = SimpleNamespace(suspected={"k1": 0.0}, last_seen={"k1": 0.0, "k2": 0.0})
        cfg = SimpleNamespace(participants=SimpleNamespace(notary="notary", owner="owner"))
        chain_ready = True

    notary, owner = Sender(Identity.generate("notary"), "run-1"), Owner()
    for member, seq, resend in (("trainer-1", 40, True), ("trainer-2", 44, True),
                                ("trainer-2", 45, False), ("trainer-3", 7, True)):
        owner._on_tip(notary.seal_document("tip", member, ChainTip(
            member, seq, b"\0" * 32, resend=resend).to_doc()))
    assert {n: sorted(t) for n, t in owner.tips.items()} == {"trainer-1": [40],
                                                             "trainer-2": [45]}
    owner.chain_ready = False  # a resumed owner not watching yet: one not heard since counts
    owner._on_tip(notary.seal_document("tip", "trainer-3", ChainTip(
        "trainer-3", 7, b"\0" * 32, resend=True).to_doc()))
    assert sorted(owner.tips["trainer-3"]) == [7]


def _scripted_stage(tmp_path, script):
    """The scripted last stage of tests/test_trainer_order.py (Linear(3, 2), batches of 4),
    snapshotting every 2 steps into `tmp_path`."""
    from types import SimpleNamespace

    from tests.test_trainer_order import _last_stage

    t, bus = _last_stage(script, in_flight=1)
    t.snapshots = RunLayout(tmp_path).snapshots("last")
    t.store = snapshot.Store(t.snapshots, {})
    t.cfg = SimpleNamespace(run=SimpleNamespace(snapshot_every=2))
    t.per, t.segment, t.restored_seen, t.dropped = 0, t.seg.module, {}, 0
    t.roster.standby, t.roster.meta = (), {}
    t.log = SimpleNamespace(warning=lambda *a, **k: None, info=lambda *a, **k: None)
    return t, bus


def _control(kind, sender, doc):
    """A control message of `kind` from `sender`; its header's digest stands for the real
    header's (a `restored` names its rollback by it)."""
    import hashlib
    from types import SimpleNamespace

    digest = hashlib.sha256(repr((kind, sender, sorted(doc.items()))).encode()).digest()
    return SimpleNamespace(header=SimpleNamespace(kind=kind, sender=sender, step=doc["step"],
                                                  digest=digest), document=lambda: doc)


def test_a_stage_rolls_back_drops_stale_data_and_trains_the_step_again(tmp_path):
    """Steps 0 to 2, a rollback to step 2 (snapshotted after step 1), a stale activation from
    the previous stage before it says it restored (dropped), then step 2 again: the stage ends
    with step 2 applied once, as if nothing happened, and says what it restored."""
    from tests.test_trainer_order import OWNER, PREV, _message

    torch.manual_seed(1)
    x = [torch.rand(4, 3) for _ in range(3)]
    y = [torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1])]
    step = [m for s in range(3) for m in (_message("fwd", PREV, s, x[s]),
                                          _message("labels", OWNER, s, y[s]))]
    rollback = _control("rollback", OWNER, {"step": 2, "rejoined": "prev"})
    script = [*step, rollback,
              _message("fwd", PREV, 2, x[2]),  # sent before prev restored: stale
              _control("restored", PREV, {"step": 2, "state": "ab" * 32,
                                          "rollback": rollback.header.digest.hex()}),
              *step[4:], _message("end", OWNER, 0)]
    t, bus = _scripted_stage(tmp_path, script)
    t._serve()
    assert t.dropped == 1
    restored = [(k, m) for k, _, m in bus.sent if k == "restored"]
    assert restored == [("restored", {"step": 2})]
    assert [m["step"] for k, _, m in bus.sent if k == "snapshot"] == [2]
    torch.manual_seed(0)  # `_last_stage`'s weights
    ref = SegmentTrainer(nn.Sequential(nn.Linear(3, 2)), lr=0.1)
    for s in range(3):
        ref.forward(x[s], s)
        ref.loss_backward(y[s], s)
    for a, b in zip(t.seg.module.parameters(), ref.module.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wrong", ["another-step", "an-earlier-rollback", "none-named"])
def test_only_the_restored_answering_our_rollback_lets_a_neighbours_data_in(tmp_path, wrong):
    """A rollback to step 2: the previous stage's `restored` of another step, or one
    answering an earlier rollback to the same step, or naming none, leaves it fenced (its
    step-2 activations dropped: they may come from before it restored); the one naming this
    rollback (its header's digest, which nobody knows before the owner sent it) lifts it."""
    from tests.test_trainer_order import OWNER, PREV, _message

    torch.manual_seed(1)
    x = [torch.rand(4, 3) for _ in range(3)]
    y = [torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1])]
    step = [m for s in range(3) for m in (_message("fwd", PREV, s, x[s]),
                                          _message("labels", OWNER, s, y[s]))]
    state = "ab" * 32
    rollback = _control("rollback", OWNER, {"step": 2, "rejoined": "prev"})
    ours = rollback.header.digest.hex()
    earlier = _control("rollback", OWNER, {"step": 2, "rejoined": "x"}).header.digest.hex()
    bad = {"another-step": {"step": 3, "rollback": ours},
           "an-earlier-rollback": {"step": 2, "rollback": earlier},
           "none-named": {"step": 2}}[wrong]
    script = [*step, rollback,
              _control("restored", PREV, {**bad, "state": state}),
              _message("fwd", PREV, 2, x[2]),  # still fenced: dropped
              _control("restored", PREV, {"step": 2, "state": state, "rollback": ours}),
              *step[4:], _message("end", OWNER, 0)]
    t, bus = _scripted_stage(tmp_path, script)
    t._serve()
    assert t.dropped == 1 and t.trained == 2
    assert [d for k, d in bus.docs if k == "restored"] == [
        {"step": 2, "state": t.store.get(2).state, "rollback": ours}]


def test_a_rollback_to_a_step_never_snapshotted_is_refused_naming_the_owner(tmp_path):
    from clicooper_bus.errors import PoisonedInput
    from tests.test_trainer_order import OWNER

    t, _ = _scripted_stage(tmp_path, [_control("rollback", OWNER, {"step": 7, "rejoined": "x"})])
    with pytest.raises(PoisonedInput, match="no snapshot") as e:
        t._serve()
    assert (e.value.sender, e.value.kind, e.value.step) == ("owner", "rollback", 7)


@pytest.mark.parametrize("noise,done,said", [
    (True, 0, "activation protection on is not built"),
    (False, 3, "already rolled back 3 times"),
])
def test_a_rollback_is_refused_under_noise_and_past_the_limit(noise, done, said):
    """Review: a replayed step's release reuses that step's noise (on a different activation
    the two releases' difference has none), and any member may say rejoin at any time; so the
    owner refuses to roll back a run with activation protection, and after MAX_ROLLBACKS."""
    from types import SimpleNamespace

    from clicooper_bus.protocol.recovery import Rejoin
    from clicooper_bus.services.owner.process import Owner
    from clicooper_bus.services.owner.rejoins import MAX_ROLLBACKS
    from clicooper_bus.services.owner.rollback import Rejoined, RollbackRefused

    assert MAX_ROLLBACKS == 3
    owner = SimpleNamespace(
        cfg=SimpleNamespace(watermark=SimpleNamespace(enabled=False)),
        setup=SimpleNamespace(defences=SimpleNamespace(filter=object() if noise else None)),
        rollbacks=done)
    owner._refuse_rollback = lambda name: Owner._refuse_rollback(owner, name)
    exc = Rejoined("trainer-1", Rejoin(1, [20], ["00" * 32]))
    with pytest.raises(RollbackRefused, match=said) as info:
        Owner._roll_back(owner, exc)
    assert info.value.stopped["rejoined"] == "trainer-1" and owner.rollbacks == done


def test_a_restarted_trainers_usage_carries_the_dead_process_figures(tmp_path):
    """Review: a restarted trainer reported only its new process's CPU. Each snapshot keeps
    the process's usage then; the restarted one carries it on (what the dead process spent
    after its last snapshot is lost with it)."""
    from clicooper_bus.protocol import Usage
    from clicooper_bus.services.usage import CpuMeter

    layout = RunLayout(tmp_path).snapshots("trainer-1")
    store = snapshot.Store(layout, {})
    store.keep(snapshot.take(_segment(), 10), usage=Usage(5.0, 3.0, 4.0, 10).to_doc())
    again = snapshot.Store(layout, {})
    meter = CpuMeter()
    meter.carry(Usage.parse(again.usage_of(10)))
    meter.steps = 10
    meter.step_done()
    got = meter.usage()
    assert got.cpu_s >= 5.0 and 3.0 <= got.train_cpu_s <= got.cpu_s and got.steps == 11
    assert again.usage_of(99) is None
