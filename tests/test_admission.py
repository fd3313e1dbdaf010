"""The broker's rules (issue 16, item 2), on their own and on a live CURVE broker: who may
connect, which topics a member may subscribe to, and what it may publish."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from clicooper_bus.errors import ConfigError
from clicooper_bus.net.admission import Admission, Member
from clicooper_bus.net.bus import Bus, BusAddress
from clicooper_bus.net.curve import check_security, make_client, z85_public
from clicooper_bus.net.forwarder import Forwarder
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Sender
from clicooper_bus.protocol import Topics

ROLES = {"owner": "owner", "notary": "notary", "trainer-1": "trainer", "trainer-10": "trainer",
         "auditor": "auditor"}


@pytest.fixture(scope="module")
def people() -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in [*ROLES, "broker", "stranger"]}


@pytest.fixture
def admission(people) -> Admission:
    return Admission.of("r1", [Member(n, r, people[n].public) for n, r in ROLES.items()])


T = Topics("r1")


def test_only_the_members_keys_are_admitted(admission, people):
    assert admission.name_of(z85_public(people["trainer-1"].public)) == "trainer-1"
    assert admission.name_of(z85_public(people["stranger"].public)) is None
    assert admission.name_of(z85_public(people["broker"].public)) is None


@pytest.mark.parametrize("who,topic", [
    ("trainer-1", T.to("fwd", "trainer-1")), ("trainer-1", T.to("bwd", "trainer-1")),
    ("trainer-1", T.kind("beat")), ("trainer-1", T.kind("roster")), ("trainer-1", T.kind("round")),
    ("trainer-1", T.hello("trainer-1")), ("trainer-1", T.done("trainer-1")),
    ("trainer-10", T.to("labels", "trainer-10")),
    ("auditor", T.kind("checkpoint")), ("auditor", T.watching("auditor")),
    ("notary", T.all), ("owner", T.kind("fwd")), ("owner", T.to("bwd", "owner")),
])
def test_a_member_may_subscribe_to_what_its_role_reads(admission, who, topic):
    assert admission.subscribe(who, topic.encode()) is None


@pytest.mark.parametrize("who,topic,reason", [
    ("trainer-1", T.to("fwd", "trainer-10"), "inbox"),  # another trainer's inbox
    ("trainer-10", T.to("fwd", "trainer-1"), "inbox"),
    ("trainer-1", "run/r1/fwd/trainer-1", "inbox"),  # without the closing '/': also trainer-10's
    ("trainer-1", T.kind("fwd"), "inbox"), ("trainer-1", T.all, "inbox"),
    ("trainer-1", "run/r1/f", "inbox"), ("trainer-1", "", "outside the run"),
    ("auditor", T.to("eval_out", "owner"), "inbox"),
    ("trainer-1", T.to("fwd", "owner"), "inbox"),
    ("trainer-1", "run/r0/", "outside the run"),
    ("trainer-1", T.hello("trainer-10"), "presence signal"),  # a fake presence signal
    ("trainer-1", T.watching("auditor"), "presence signal"),
    ("owner", T.done("notary"), "presence signal"),
    ("trainer-1", "run/r1/" + "x" * 300, "longer than a topic"),
    (None, T.kind("beat"), "unknown connection"),
])
def test_everything_else_is_refused_with_its_reason(admission, who, topic, reason):
    got = admission.subscribe(who, topic.encode())
    assert got is not None and reason in got, got
    assert admission.refused[got] == 1 and topic not in admission.held.get(who, set())


def test_a_member_holds_a_bounded_number_of_subscriptions(admission):
    for i in range(admission.max_subscriptions):
        assert admission.subscribe("owner", f"run/r1/x{i}/".encode()) is None
    assert "too many" in admission.subscribe("owner", b"run/r1/y/")
    admission.unsubscribe("owner", b"run/r1/x0/")
    assert admission.subscribe("owner", b"run/r1/y/") is None


def test_a_member_may_publish_only_what_it_signed_for_this_run(admission, people):
    def frames(ident, run="r1", **kw):
        return Sender(ident, run, **kw).seal_array("fwd", "trainer-1", np.ones(3, np.float32)).frames()

    assert admission.publication_refusal("owner", frames(people["owner"])) is None
    assert "another key" in admission.publication_refusal("trainer-1", frames(people["owner"]))
    assert "another run" in admission.publication_refusal("owner", frames(people["owner"], "r2"))
    assert "unknown connection" in admission.publication_refusal(None, frames(people["owner"]))
    forged = frames(people["owner"])
    forged[2] = bytes(64)
    assert "bad signature" in admission.publication_refusal("owner", forged)
    assert "malformed" in admission.publication_refusal("owner", [b"junk"])


def test_plaintext_is_refused_off_loopback():
    check_security("none", "tcp://127.0.0.1:5555", "ipc:///tmp/x")
    check_security("curve", "tcp://0.0.0.0:5555")
    for bad in ("tcp://0.0.0.0:5555", "tcp://10.0.0.2:5556"):
        with pytest.raises(ConfigError, match="loopback"):
            check_security("none", bad)
    with pytest.raises(ConfigError, match="security"):
        check_security("tls", "tcp://127.0.0.1:1")


def test_a_live_curve_broker_applies_the_rules(admission, people):
    """Against a real CURVE broker: a keyless and a wrong-key client get nothing and change
    nothing, a trainer cannot read another's inbox nor fake its presence, and the owner's
    messages reach their addressee."""
    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", identity=people["broker"],
                    admission=admission).start()
    addr = BusAddress(fwd.pub_addr, fwd.sub_addr)
    keys = {i.key_id: i.public for i in people.values()}
    buses = {n: Bus(people[n], "r1", addr, Verifier(keys, "r1", partial=True),
                    broker=people["broker"].public) for n in ("owner", "trainer-1", "trainer-10")}
    ctx = zmq.Context()
    spies = []
    try:
        for key in (None, people["stranger"]):  # keyless, and a CURVE key the roster lacks
            sub = ctx.socket(zmq.SUB)
            if key is not None:
                make_client(sub, key, people["broker"].public)
            sub.connect(fwd.sub_addr)
            sub.subscribe(b"")
            spies.append(sub)
            pub = ctx.socket(zmq.PUB)
            if key is not None:
                make_client(pub, key, people["broker"].public)
            pub.connect(fwd.pub_addr)
            spies.append(pub)
        t1, t10, owner = buses["trainer-1"], buses["trainer-10"], buses["owner"]
        t1.subscribe(T.to("fwd", "trainer-1"))
        t1.announce()
        t10.subscribe(T.to("fwd", "trainer-1"), T.hello("trainer-1"), T.to("fwd", "trainer-10"))
        t10.announce()
        owner.wait_for_subscribers("hello", ["trainer-1", "trainer-10"], 10)
        time.sleep(0.3)
        for spy in spies[1::2]:  # what the spies publish goes nowhere
            spy.send_multipart(owner.sender.seal("fwd", "trainer-1", b"", dtype="uint8",
                                                 shape=[0]).frames())
        owner.send_array("fwd", "trainer-1", np.arange(4, dtype=np.float32))
        got = t1.recv(5)
        assert got is not None and got.header.sender == people["owner"].key_id
        assert np.array_equal(got.array(), np.arange(4, dtype=np.float32))
        assert t1.recv(0.5) is None  # only the owner's one message, nothing the spies sent
        assert t10.recv(0.5) is None  # trainer-10 did not get trainer-1's activations
        assert all(s.poll(200) == 0 for s in spies[0::2])  # the spies received nothing
        assert T.hello("trainer-1") in owner.seen_subscriptions  # from trainer-1 itself
        stats = fwd.stats()
        assert stats["refused"]["topic of another member's inbox"] >= 1
        assert stats["refused"]["presence signal of another member"] == 1
        assert stats["refused"].get("connection with a key the roster does not list", 0) >= 1
    finally:
        for s in spies:
            s.close(0)
        ctx.term()
        for b in buses.values():
            b.close()
        fwd.close()


def test_a_quick_run_gets_a_fresh_id():
    from clicooper_bus.tools.run import fresh_run_id

    ids = {fresh_run_id("quick") for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("quick-") for i in ids)


def test_a_subscriber_that_stops_reading_stalls_the_others_only_once(people, admission):
    """The stall bound: the notary's connection subscribes to the whole run and never reads;
    after one wait of `stall_s` the broker sends on without it, so trainer-1 gets all 400
    messages, in order, and the broker counts the sends that could not wait."""
    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", identity=people["broker"],
                    admission=admission, hwm=4, stall_s=0.3).start()
    addr = BusAddress(fwd.pub_addr, fwd.sub_addr)
    keys = {i.key_id: i.public for i in people.values()}
    owner = Bus(people["owner"], "r1", addr, Verifier(keys, "r1", partial=True),
                broker=people["broker"].public, timeout_s=30)
    reader = Bus(people["trainer-1"], "r1", addr, Verifier(keys, "r1"),
                 broker=people["broker"].public)
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    make_client(stalled, people["notary"], people["broker"].public)
    stalled.connect(fwd.sub_addr)
    stalled.subscribe(T.all)
    stalled.subscribe(T.hello("notary"))
    try:
        reader.subscribe(T.to("fwd", "trainer-1"))
        reader.announce()
        owner.wait_for_subscribers("hello", ["trainer-1", "notary"], 10)
        body = np.zeros(64 << 10, np.uint8)
        got = []
        for i in range(400):
            owner.send_array("fwd", "trainer-1", body, step=i)
            while (env := reader.recv(0.001)) is not None:  # a reader that keeps up
                got.append(env.header.step)
        while len(got) < 400 and (env := reader.recv(5)) is not None:
            got.append(env.header.step)
        assert got == list(range(400))
        assert fwd.stats()["lossy_sends"] > 0  # the stalled one missed what did not fit
    finally:
        stalled.close(0)
        ctx.term()
        owner.close()
        reader.close()
        fwd.close()


def test_a_flood_cannot_keep_a_receiver_from_its_beats(people):
    """Receive passes are bounded: under a flood of messages its verifier refuses, `recv`
    still returns on time and the participant keeps beating."""
    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()  # plaintext: no rules
    addr = BusAddress(fwd.pub_addr, fwd.sub_addr)
    me = Bus(people["trainer-1"], "r1", addr, Verifier({}, "r1", partial=True), beat_s=0.05)
    stop = __import__("threading").Event()

    def flood():
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.connect(fwd.pub_addr)
        frames = Sender(people["stranger"], "r1").seal("beat", "all", b"\x80").frames()
        while not stop.is_set():
            for _ in range(1000):
                try:
                    pub.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    break
        pub.close(0)
        ctx.term()

    flooder = __import__("threading").Thread(target=flood, daemon=True)
    try:
        me.subscribe(T.kind("beat"))
        me.beating = True
        flooder.start()
        deadline = time.monotonic() + 30
        while me.verifier.rejected["unknown_key"] < 5000:  # the flood is arriving
            assert time.monotonic() < deadline, "the flood never arrived"
            me.recv(0.01)
        beats = me.sent.get("beat", 0)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            assert me.recv(0.1) is None
        assert me.sent["beat"] >= beats + 5  # at least 5 beats in a second of flood (beat_s 0.05)
    finally:
        stop.set()
        flooder.join(5)
        me.close()
        fwd.close()


def test_an_observer_publishes_nothing(admission, people):
    env = Sender(people["auditor"], "r1").seal("beat", "all", b"\x80")
    assert "observer publishes nothing" in admission.publication_refusal("auditor", env.frames())
    # a roster member's own odd kinds pass: its receivers refuse or ignore them by name, and
    # dropping them here would leave a gap in its chain that stops the run at the notary
    env = Sender(people["trainer-1"], "r1").seal("checkpoint", "all", b"\x80")
    assert admission.publication_refusal("trainer-1", env.frames()) is None


def test_a_body_over_its_kinds_cap_is_refused_at_the_broker(admission, people):
    fat_beat = Sender(people["trainer-1"], "r1").seal("beat", "all", b"\x80" * 1024)
    assert "cap" in admission.publication_refusal("trainer-1", fat_beat.frames())
    beat = Sender(people["trainer-1"], "r1").seal("beat", "all", b"\x80")
    assert admission.publication_refusal("trainer-1", beat.frames()) is None


def test_a_member_that_keeps_being_refused_is_banned(admission, people):
    for _ in range(15):
        assert not admission.strike("trainer-1")
    assert admission.strike("trainer-1") and "trainer-1" in admission.banned
    assert admission.name_of(z85_public(people["trainer-1"].public)) is None  # ZAP refuses it
    assert not admission.strike("stranger") and not admission.strike(None)


@pytest.mark.parametrize("rogue,how", [("trainer-10", "unsubscribe"), ("auditor", "disconnect")])
def test_no_member_can_unsubscribe_others(people, admission, rogue, how):
    """A member's subscriptions never reach the publishers (the broker takes the whole run
    itself), so a rogue's unsubscription of another's inbox, sent outright or left by libzmq
    when its refused subscription's pipe closes, changes nothing: trainer-1 and the notary
    still get every message."""
    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", identity=people["broker"],
                    admission=admission).start()
    ctx = zmq.Context()

    def connect(kind, name, addr):
        s = ctx.socket(kind)
        make_client(s, people[name], people["broker"].public)
        s.connect(addr)
        return s

    try:
        pub = connect(zmq.PUB, "owner", fwd.pub_addr)
        t1, notary = connect(zmq.SUB, "trainer-1", fwd.sub_addr), connect(zmq.SUB, "notary",
                                                                            fwd.sub_addr)
        t1.subscribe(T.to("fwd", "trainer-1"))
        notary.subscribe(T.all)
        rogue_sock = connect(zmq.XSUB, rogue, fwd.sub_addr)
        time.sleep(0.5)
        for t in (T.to("fwd", "trainer-1"), T.all):
            rogue_sock.send(b"\x01" + t.encode())  # refused
            if how == "unsubscribe":
                rogue_sock.send(b"\x00" + t.encode())
        time.sleep(0.3)
        if how == "disconnect":
            rogue_sock.close(0)
        time.sleep(0.5)
        sender = Sender(people["owner"], "r1")
        for _ in range(5):
            pub.send_multipart(sender.seal("fwd", "trainer-1", b"x" * 8, dtype="uint8",
                                           shape=[8]).frames())
        got = {}
        for name, s in (("trainer-1", t1), ("notary", notary)):
            got[name] = 0
            while s.poll(500):
                s.recv_multipart()
                got[name] += 1
        assert got == {"trainer-1": 5, "notary": 5}, got
    finally:
        ctx.destroy(linger=0)
        fwd.close()


def test_only_a_trainer_may_send_its_own_usage(admission, people):
    """A trainer's measured CPU (`usage`) passes the broker only signed by the trainer whose
    connection it comes on, within its small cap; no other trainer may read it (the owner and
    the notary do); an observer sends none. (The owner's receive loop admits it only from the
    stages and the notary: tests/test_usage.py.)"""
    from clicooper_bus.protocol import Usage

    doc = Usage(3.0, 2.0, 2.5, 40).to_doc()
    own = Sender(people["trainer-1"], "r1").seal_document("usage", "owner", doc)
    assert admission.publication_refusal("trainer-1", own.frames()) is None
    # trainer-10 cannot pass off a report signed by trainer-1, nor one it signed as trainer-1's
    assert "another key" in admission.publication_refusal("trainer-10", own.frames())
    forged = Sender(people["trainer-10"], "r1").seal_document("usage", "owner", doc).frames()
    forged[2] = own.signature
    assert "bad signature" in admission.publication_refusal("trainer-10", forged)
    watcher = Sender(people["auditor"], "r1").seal_document("usage", "owner", doc)
    assert "observer publishes nothing" in admission.publication_refusal("auditor",
                                                                       watcher.frames())
    fat = Sender(people["trainer-1"], "r1").seal_document("usage", "owner", {"pad": "x" * 2000})
    assert "cap" in admission.publication_refusal("trainer-1", fat.frames())
    # one trainer's report is the owner's inbox: another trainer cannot read it
    assert "inbox" in admission.subscribe("trainer-10", T.to("usage", "owner").encode())
    assert "inbox" in admission.subscribe("trainer-10", T.kind("usage").encode())
    assert admission.subscribe("owner", T.to("usage", "owner").encode()) is None
    assert admission.subscribe("notary", T.kind("usage").encode()) is None
