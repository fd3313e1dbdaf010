"""The protocol page: topics, and control documents parsed strictly from verified bodies."""

from __future__ import annotations

import pytest

from clicooper_bus.net import codec
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.wire import Sender
from clicooper_bus.protocol import (
    Ack,
    CheckpointMessage,
    Hello,
    Metrics,
    ProtocolError,
    Round,
    Segment,
    Topics,
    Usage,
    cpu_table,
)
from clicooper_bus.protocol.recovery import ChainTip, Rejoin, Restored, Rollback, Snapshot

D = "ab" * 32  # a SHA-256 digest in hex


def test_topics_build_every_kind_of_topic():
    t = Topics("demo")
    assert t.all == "run/demo/"
    assert t.kind("fwd") == "run/demo/fwd/"
    assert t.to("fwd", "trainer-1") == "run/demo/fwd/trainer-1/"
    assert (t.hello("a"), t.watching("b"), t.done("c"), t.closed("notary")) == (
        "run/demo/hello/a/", "run/demo/watching/b/", "run/demo/done/c/", "run/demo/closed/notary/")
    # the closing slash: one member's inbox is never a prefix of another's
    assert not t.to("fwd", "trainer-10").startswith(t.to("fwd", "trainer-1"))
    assert t.parse(t.to("fwd", "trainer-1")) == ("fwd", "trainer-1")
    for not_whole in ("run/demo/fwd/", "run/demo/fwd/a", "run/other/fwd/a/", "run/demo/a/b/c/"):
        assert t.parse(not_whole) is None, not_whole


def test_an_envelope_is_published_on_the_protocol_topic():
    env = Sender(Identity.generate("owner"), "demo").seal_document("round", "all", {})
    assert env.topic == Topics("demo").to("round", "all")


@pytest.mark.parametrize("msg", [
    Hello(True, 2, "ab" * 32, 3), Metrics(0.25, 7), Round(4, "end"), Ack(["t1", "t2"], "00" * 32),
    Segment(1, b"\x00sealed", {"fwd": 3}), CheckpointMessage("note\n", final=True),
    CheckpointMessage("note\n", closed=True), Usage(12.5, 10.25, 11.0, 40),
    Snapshot(50, D, "cd" * 32), ChainTip("trainer-1", 73, b"\x01" * 32),
    Rejoin(1, [10, 20], [D, "cd" * 32]), Rollback(20, "trainer-1"), Restored(20, D)])
def test_documents_round_trip_through_msgpack(msg):
    doc = codec.unpack(codec.pack(msg.to_doc()))
    assert type(msg).parse(doc, sender="x") == msg


def test_the_encoding_of_control_documents_is_what_peers_always_sent():
    """Logs written before the protocol page carry these exact maps (keys in this order)."""
    assert list(Hello(True, 1, "d", 1).to_doc()) == ["ready", "stage", "model_spec", "in_flight",
                                                     "threads"]
    # a hello from before `threads` (issue 19) still reads: 0, "did not say"
    old = {"ready": True, "stage": 1, "model_spec": "d", "in_flight": 1}
    assert Hello.parse(old, sender="t").threads == 0
    assert CheckpointMessage("n", final=False).to_doc() == {"note": "n", "final": False}
    assert CheckpointMessage("n", closed=True).to_doc() == {"note": "n", "final": False,
                                                            "closed": True}


@pytest.mark.parametrize("cls,doc,field", [
    (Metrics, {"loss": "x", "correct": 1}, "loss"),
    (Metrics, {"loss": 1, "correct": 1}, "loss"),  # an int is not a float here
    (Metrics, {"loss": 0.5, "correct": True}, "correct"),  # nor a bool an int
    (Metrics, {"loss": 0.5, "correct": -1}, "correct"),
    (Metrics, {"loss": 0.5}, "correct"),
    (Metrics, {"loss": 0.5, "correct": 1, "extra": 0}, "extra"),
    (Round, {"round": 1, "phase": "middle"}, "phase"),
    (Round, {"round": -1, "phase": "start"}, "round"),
    (Segment, {"stage": 1, "sealed": b"", "sent": {"fwd": "3"}}, "sent"),
    (Ack, {"segments": ["a", 2], "model_sha256": ""}, "segments"),
    (Hello, {"ready": 1, "stage": 1, "model_spec": "d"}, "ready"),
    (Hello, {"ready": True, "stage": 1, "model_spec": "d", "threads": -1}, "threads"),
    (Usage, {"cpu_s": 2, "train_cpu_s": 1.0, "train_wall_s": 1.0, "steps": 3}, "cpu_s"),
    (Usage, {"cpu_s": 2.0, "train_cpu_s": "1", "train_wall_s": 1.0, "steps": 3}, "train_cpu_s"),
    (Usage, {"cpu_s": 2.0, "train_cpu_s": 1.0, "train_wall_s": 1.0, "steps": 3.0}, "steps"),
    (Usage, {"cpu_s": 2.0, "train_cpu_s": 1.0, "train_wall_s": 1.0, "steps": -1}, "steps"),
    (Usage, {"cpu_s": float("nan"), "train_cpu_s": 1.0, "train_wall_s": 1.0, "steps": 3},
     "cpu_s"),
    (Usage, {"cpu_s": 2.0, "train_cpu_s": 1.0, "train_wall_s": -1.0, "steps": 3},
     "train_wall_s"),
    (Usage, {"cpu_s": 1.0, "train_cpu_s": 2.0, "train_wall_s": 1.0, "steps": 3}, "train_cpu_s"),
    (Usage, {"cpu_s": 2.0, "train_cpu_s": 1.0, "train_wall_s": 1.0}, "steps"),
    (Usage, {"cpu_s": 2.0, "train_cpu_s": 1.0, "train_wall_s": 1.0, "steps": 3, "name": "o"},
     "name"),
    (Snapshot, {"step": -1, "weights": D, "state": D}, "step"),
    (Snapshot, {"step": 1, "weights": D.upper(), "state": D}, "weights"),
    (Snapshot, {"step": 1, "weights": D, "state": D[:-2]}, "state"),
    (ChainTip, {"member": "t", "seq": 3, "prev": b"\x00" * 31}, "prev"),
    (ChainTip, {"member": "t", "seq": -3, "prev": b"\x00" * 32}, "seq"),
    (ChainTip, {"member": "t", "seq": 3, "prev": "00" * 32}, "prev"),
    (Rejoin, {"stage": 1, "steps": [20, 10], "states": [D, D]}, "steps"),
    (Rejoin, {"stage": 1, "steps": [10], "states": [D, D]}, "steps"),
    (Rejoin, {"stage": 1, "steps": [], "states": []}, "steps"),
    (Rejoin, {"stage": 1, "steps": [10], "states": ["x"]}, "states"),
    (Rollback, {"step": -1, "rejoined": "t"}, "step"),
    (Rollback, {"step": 1}, "rejoined"),
    (Restored, {"step": 1, "state": "x"}, "state"),
])
def test_a_bad_field_is_refused_naming_sender_kind_and_field(cls, doc, field):
    with pytest.raises(ProtocolError) as e:
        cls.parse(doc, sender="trainer-2")
    assert e.value.field == field and e.value.sender == "trainer-2"
    assert "trainer-2" in str(e.value) and cls.KIND in str(e.value) and field in str(e.value)


def test_a_body_that_is_not_a_map_is_refused():
    with pytest.raises(ProtocolError, match="trainer-1 sent a malformed checkpoint message"):
        CheckpointMessage.parse(["not", "a", "checkpoint"], sender="trainer-1")


def test_an_old_trainer_hello_means_one_batch_in_flight():
    assert Hello.parse({"ready": True, "stage": 1, "model_spec": "d"}).in_flight == 1


def test_every_control_kind_is_a_wire_kind():
    from clicooper_bus.net import equivocation  # noqa: F401 (its document)
    from clicooper_bus.net.kinds import KINDS
    from clicooper_bus.protocol import Control

    kinds = {c.KIND for c in Control.__subclasses__()}
    assert {"hello", "snapshot", "handover", "equivocation"} <= kinds  # every module's
    assert kinds <= set(KINDS)
    assert all(KINDS[k].body == "msgpack" for k in kinds)


def test_the_usage_document_is_what_it_measures():
    """Its encoding (the map a trainer signs), and a process with no step has no per-step CPU."""
    assert Usage(1.5, 1.0, 2.0, 4).to_doc() == {"cpu_s": 1.5, "train_cpu_s": 1.0,
                                                "train_wall_s": 2.0, "steps": 4}
    assert Usage(1.5, 1.0, 2.0, 4).cpu_s_per_step == 0.25
    assert Usage(1.5, 0.0, 0.0, 0).cpu_s_per_step is None


def test_the_cpu_table_shares_the_training_cpu_between_owner_and_trainers():
    table = cpu_table([("owner", "owner", Usage(5.0, 3.0, 9.0, 10)),
                       ("trainer-1", "trainer", Usage(8.0, 6.0, 9.0, 10)),
                       ("trainer-2", "trainer", Usage(4.0, 3.0, 9.0, 10)),
                       ("notary", "notary", Usage(50.0, 40.0, 9.0, 10))])  # not in the share
    assert table["owner_cpu_share"] == pytest.approx(3.0 / 12.0)
    assert table["missing"] == []
    assert [(r["name"], r["role"], r["cpu_s_per_step"]) for r in table["processes"]] == [
        ("owner", "owner", 0.3), ("trainer-1", "trainer", 0.6), ("trainer-2", "trainer", 0.3),
        ("notary", "notary", 4.0)]
    # a trainer that never reported: named, and no share (it would flatter the owner's)
    gap = cpu_table([("owner", "owner", Usage(5.0, 3.0, 9.0, 10)),
                     ("trainer-1", "trainer", None), ("notary", "notary", None)])
    assert gap["missing"] == ["trainer-1", "notary"] and gap["owner_cpu_share"] is None
    assert [r["name"] for r in gap["processes"]] == ["owner"]
    # the numbers are each sender's own claim: one that did not count the owner's steps is
    # named and the share withheld (a reviewer's trainer claimed 1e6 s over 1 step: share 0 %)
    liar = cpu_table([("owner", "owner", Usage(5.0, 3.0, 9.0, 10)),
                      ("trainer-1", "trainer", Usage(1e6, 1e6, 9.0, 1))])
    assert liar["implausible"] == ["trainer-1"] and liar["owner_cpu_share"] is None
    assert table["implausible"] == []
