"""The protocol page: topics, and control documents parsed strictly from verified bodies."""

from __future__ import annotations

import pytest

from clicooper_bus.net import codec
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.wire import Sender
from clicooper_bus.protocol import (
    CONTROL,
    Ack,
    CheckpointMessage,
    Hello,
    Metrics,
    ProtocolError,
    Round,
    Segment,
    Topics,
)


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
    CheckpointMessage("note\n", closed=True)])
def test_documents_round_trip_through_msgpack(msg):
    doc = codec.unpack(codec.pack(msg.to_doc()))
    assert type(msg).parse(doc, sender="x") == msg


def test_the_encoding_of_control_documents_is_what_peers_always_sent():
    """Logs written before the protocol page carry these exact maps (keys in this order)."""
    assert list(Hello(True, 1, "d", 1).to_doc()) == ["ready", "stage", "model_spec", "in_flight"]
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
    from clicooper_bus.net.kinds import KINDS

    assert set(CONTROL) <= set(KINDS)
    assert all(KINDS[k].body == "msgpack" for k in CONTROL)
