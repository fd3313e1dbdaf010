"""Envelopes and the Verifier: every rejection of DESIGN.md's wire rules, each with its own
typed error naming sender and field, and a verifier that keeps serving afterwards."""

from __future__ import annotations

import hashlib
import time
import tracemalloc

import msgpack
import numpy as np
import pytest

from clicooper_bus.errors import (
    BadSignature,
    BadTensor,
    BodyHashMismatch,
    BrokenChain,
    MalformedMessage,
    OversizeFrame,
    RejectedMessage,
    ReplayedSeq,
    SeqGap,
    TopicMismatch,
    UnknownKey,
    UnknownKind,
    UnknownVersion,
    WrongRun,
)
from clicooper_bus.ml.tensors import tensor
from clicooper_bus.net import codec
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import DOMAIN, ZERO_HASH, Limits, Sender, parse_header


@pytest.fixture
def owner(ids, roster):
    return Sender(ids["owner"], "run-1", nonce=roster.nonce)


@pytest.fixture
def verifier(roster):
    return Verifier(roster, "run-1")


def _fields(ident: Identity, body: bytes = b"", **over) -> dict:
    f = {"v": 1, "run": "run-1", "kind": "hello", "from": ident.key_id, "to": "all", "seq": 1,
         "prev": ZERO_HASH, "ts": time.time_ns(), "len": len(body),
         "sha256": hashlib.sha256(body).digest()}
    f.update(over)
    return {k: v for k, v in f.items() if v is not ...}


def _frames(ident: Identity, header: bytes, body: bytes = b"", topic: str = "run/run-1/hello/all/"):
    """Frames carrying arbitrary header bytes, validly signed by `ident`."""
    return [topic.encode(), header, ident.sign(DOMAIN + header), body]


def _reject(verifier, frames, exc_type, field=None):
    before = dict(verifier._state)
    with pytest.raises(exc_type) as info:
        verifier.verify_frames(frames)
    assert verifier._state == before, "a rejected message changed the verifier's state"
    if field is not None:
        assert info.value.field == field
        assert f"'{field}'" in str(info.value)
    return info.value


def test_round_trip_tensor_zero_copy(owner, verifier):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    env = verifier.verify_frames(owner.seal_array("fwd", "trainer-1", arr, step=3).frames())
    out = env.array()
    assert out.dtype == np.float32 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert np.shares_memory(out, np.frombuffer(env.body, dtype=np.uint8))
    t = tensor(env)
    assert tuple(t.shape) == (2, 3, 4) and float(t.sum()) == float(arr.sum())
    assert env.header.step == 3 and env.topic == "run/run-1/fwd/trainer-1/"


def test_a_received_tensor_lives_in_torchs_own_memory(owner, verifier):
    """Copied out of the frame: computing on the frame's buffer in place made BLAS results
    depend on its alignment (the bus drifted 2.4e-5 from the reference in 50 steps)."""
    env = owner.seal_array("fwd", "t", np.ones((4, 4), np.float32))
    frames = env.frames()
    frames[3] = bytearray(bytes(frames[3]))
    got = verifier.verify_frames(frames)
    t = tensor(got)
    t[0, 0] = 7.0
    assert got.array()[0, 0] == 1.0 and t[0, 0] == 7.0  # its own memory
    assert t.data_ptr() % 64 == 0  # torch's allocator aligns


def test_all_whitelisted_dtypes_and_big_endian_input(owner, verifier):
    for dt in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64",
               "bool"):
        arr = (np.arange(6) % 2).astype(dt)
        env = verifier.verify_frames(owner.seal_array("fwd", "t", arr).frames())
        np.testing.assert_array_equal(env.array(), arr)
    be = np.arange(5, dtype=">i4")
    env = verifier.verify_frames(owner.seal_array("fwd", "t", be).frames())
    assert env.header.dtype == "int32"
    np.testing.assert_array_equal(env.array(), be)
    with pytest.raises(BadTensor):
        owner.seal_array("fwd", "t", np.zeros(3, np.complex64))


def test_documents(owner, verifier):
    env = verifier.verify_frames(owner.seal_document("hello", "all", {"name": "x"}).frames())
    assert env.document() == {"name": "x"}


def test_unknown_key(ids, roster):
    stranger = Sender(Identity.generate("stranger"), "run-1", nonce=roster.nonce)
    v = Verifier(roster, "run-1")
    exc = _reject(v, stranger.seal("hello", "all", b"").frames(), UnknownKey, "from")
    assert exc.sender == stranger.identity.key_id


def test_bad_signature(owner, verifier, ids):
    frames = owner.seal("hello", "all", b"x").frames()
    frames[2] = ids["trainer-1"].sign(DOMAIN + frames[1])  # signed by someone else
    _reject(verifier, frames, BadSignature, "signature")
    frames[2] = bytes(64)
    _reject(verifier, frames, BadSignature, "signature")
    # a signature over the header without the domain tag does not verify either
    frames[2] = ids["owner"].sign(frames[1])
    _reject(verifier, frames, BadSignature, "signature")


def test_body_hash_mismatch(owner, verifier):
    frames = owner.seal("hello", "all", b"hello").frames()
    frames[3] = b"hellp"
    _reject(verifier, frames, BodyHashMismatch, "sha256")
    frames[3] = b"hello!"
    _reject(verifier, frames, BodyHashMismatch, "len")


def test_replay_gap_and_broken_chain_are_distinct(ids, roster):
    s = Sender(ids["owner"], "run-1", nonce=roster.nonce)
    v = Verifier(roster, "run-1")
    m1, m2, m3, m4 = (s.seal("hello", "all", bytes([i])) for i in range(4))
    v.verify_frames(m1.frames())
    v.verify_frames(m2.frames())
    _reject(v, m2.frames(), ReplayedSeq, "seq")
    _reject(v, m1.frames(), ReplayedSeq, "seq")
    _reject(v, m4.frames(), SeqGap, "seq")
    # same seq 3, but chained to a different predecessor
    fork = Sender(ids["owner"], "run-1", seq=2, prev=hashlib.sha256(b"other").digest(),
                  nonce=roster.nonce)
    _reject(v, fork.seal("hello", "all", b"f").frames(), BrokenChain, "prev")
    v.verify_frames(m3.frames())  # still serving, state intact
    v.verify_frames(m4.frames())
    assert v.last_seq(ids["owner"].key_id) == 4
    assert v.rejected == {"replayed_seq": 2, "seq_gap": 1, "broken_chain": 1}


def test_wrong_run_and_topic(ids, roster, owner):
    other = Sender(ids["owner"], "run-2")
    v = Verifier(roster, "run-1")
    _reject(v, other.seal("hello", "all", b"").frames(), WrongRun, "run")
    # the same run id and keys, but an earlier run (another roster nonce), or no nonce at all
    for nonce in (bytes(16), None):
        earlier = Sender(ids["owner"], "run-1", nonce=nonce).seal("hello", "all", b"")
        exc = _reject(v, earlier.frames(), WrongRun, "nonce")
        assert "another run" in str(exc)
    frames = owner.seal("fwd", "trainer-1", b"", dtype="uint8", shape=[0]).frames()
    frames[0] = b"run/run-1/fwd/trainer-2/"
    _reject(v, frames, TopicMismatch, "topic")


def test_oversize_frames(owner, roster):
    v = Verifier(roster, "run-1", limits=Limits(max_body=1000))
    _reject(v, owner.seal_array("fwd", "t", np.zeros(1001, np.uint8)).frames(), OversizeFrame,
            "len")
    frames = owner.seal("hello", "all", b"").frames()
    frames[3] = b"x" * 1001  # the body itself, whatever the header says
    exc = _reject(v, frames, OversizeFrame, "body")
    assert exc.sender == owner.identity.key_id
    frames = owner.seal("hello", "all", b"").frames()
    frames[0] = b"x" * 300
    _reject(v, frames, OversizeFrame, "topic")
    big = codec.pack({"v": 1, "pad": b"x" * 5000})
    _reject(v, [b"run/run-1/hello/all/", big, bytes(64), b""], OversizeFrame, "header")
    # per-kind cap: a 'hello' document is at most 1 MiB whatever the global limit
    v2 = Verifier(roster, "run-1")
    big = Sender(owner.identity, "run-1", nonce=roster.nonce).seal("hello", "all", b"x" * (2 << 20))
    _reject(v2, big.frames(), OversizeFrame, "len")


def test_unknown_version_and_kind(ids, verifier):
    o = ids["owner"]
    _reject(verifier, _frames(o, codec.pack(_fields(o, v=2))), UnknownVersion, "v")
    hdr = codec.pack(_fields(o, kind="teleport"))
    _reject(verifier, _frames(o, hdr, topic="run/run-1/teleport/all/"), UnknownKind, "kind")


def _dup_key_header(o: Identity) -> bytes:
    """A map with 'seq' twice: the last one would win in a lax reader."""
    f = _fields(o)
    pairs = b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in f.items())
    return bytes([0x80 | (len(f) + 1)]) + pairs + msgpack.packb("seq") + msgpack.packb(5)


@pytest.mark.parametrize("case", [
    "not_msgpack", "truncated", "trailing", "deep_nesting", "huge_declared_array",
    "huge_declared_bin", "not_a_map", "wrong_type_seq", "bool_as_int", "wrong_type_prev",
    "short_prev", "duplicate_key", "non_string_key", "missing_field", "unknown_field",
    "negative_seq", "zero_seq", "bad_from", "ext_type", "timestamp", "invalid_utf8",
])
def test_malformed_headers(ids, verifier, case):
    o = ids["owner"]
    good = codec.pack(_fields(o))
    headers = {
        "not_msgpack": b"\xc1\xc1\xc1",
        "truncated": good[:-5],
        "trailing": good + b"\x00",
        "deep_nesting": b"\x91" * 100_000 + b"\x01",
        "huge_declared_array": b"\xdd\xff\xff\xff\xff",
        "huge_declared_bin": b"\xc6\xff\xff\xff\xff" + b"x" * 10,
        "not_a_map": codec.pack([1, 2, 3]),
        "wrong_type_seq": codec.pack(_fields(o, seq="1")),
        "bool_as_int": codec.pack(_fields(o, seq=True)),
        "wrong_type_prev": codec.pack(_fields(o, prev="00" * 32)),
        "short_prev": codec.pack(_fields(o, prev=b"\x00" * 31)),
        "duplicate_key": _dup_key_header(o),
        "non_string_key": msgpack.packb({**_fields(o), 7: 1}, use_bin_type=True),
        "missing_field": codec.pack(_fields(o, sha256=...)),
        "unknown_field": codec.pack(_fields(o, extra=1)),
        "negative_seq": codec.pack(_fields(o, seq=-1)),
        "zero_seq": codec.pack(_fields(o, seq=0)),
        "bad_from": codec.pack(_fields(o, **{"from": "XYZ"})),
        "ext_type": msgpack.packb({**_fields(o), "ts": msgpack.ExtType(5, b"x")},
                                  use_bin_type=True),
        "timestamp": msgpack.packb({**_fields(o), "ts": msgpack.Timestamp(1, 0)},
                                   use_bin_type=True),
        "invalid_utf8": good.replace(b"hello", b"hel\xffo"),
    }
    exc = _reject(verifier, _frames(o, headers[case]), RejectedMessage)
    assert isinstance(exc, (MalformedMessage, OversizeFrame)), exc
    assert exc.field is not None


def test_wrong_frame_count_and_signature_length(owner, verifier):
    frames = owner.seal("hello", "all", b"").frames()
    _reject(verifier, frames[:3], MalformedMessage, "frames")
    _reject(verifier, frames + [b""], MalformedMessage, "frames")
    _reject(verifier, [frames[0], frames[1], frames[2][:63], frames[3]], MalformedMessage,
            "signature")


def test_tensor_shape_and_dtype_checks(ids, verifier):
    o = ids["owner"]

    def tensor(dtype, shape, body):
        hdr = codec.pack(_fields(o, body, kind="fwd", dtype=dtype, shape=shape))
        return _frames(o, hdr, body, topic="run/run-1/fwd/all/")

    _reject(verifier, tensor("object", [1], b"x" * 8), BadTensor, "dtype")
    _reject(verifier, tensor("float32", [3], b"x" * 8), BadTensor, "shape")
    _reject(verifier, tensor("float32", [-1], b""), BadTensor, "shape")
    _reject(verifier, tensor("float32", [1] * 9, b"x" * 4), BadTensor, "shape")
    _reject(verifier, tensor("float32", [1.0], b"x" * 4), BadTensor, "shape")
    # a tensor kind without a tensor body
    hdr = codec.pack(_fields(o, b"", kind="fwd"))
    _reject(verifier, _frames(o, hdr, topic="run/run-1/fwd/all/"), BadTensor, "dtype")


def test_declared_huge_tensor_is_rejected_without_allocating(ids, verifier):
    o = ids["owner"]
    body = b"\x00" * 16
    hdr = codec.pack(_fields(o, body, kind="fwd", dtype="float32", shape=[1 << 32],
                             len=(1 << 32) * 4))
    frames = _frames(o, hdr, body, topic="run/run-1/fwd/all/")
    tracemalloc.start()
    try:
        with pytest.raises(RejectedMessage) as info:
            verifier.verify_frames(frames)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak allocation {peak} bytes"
    assert isinstance(info.value, OversizeFrame) and info.value.field == "len"
    # within the body limit, a 2^32-element declaration is still refused before any buffer
    hdr = codec.pack(_fields(o, body, kind="fwd", dtype="float32", shape=[1 << 32, 0], len=0))
    with pytest.raises(BadTensor):
        parse_header(hdr)


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [0] + [2**62] * 7, [0, 2**31], [0, 2**30, 2**30]])
def test_empty_tensors_with_absurd_shapes_are_refused(ids, verifier, shape):
    """An empty body with a shape no array can have would crash whoever reads it."""
    o = ids["owner"]
    hdr = codec.pack(_fields(o, b"", kind="fwd", dtype="float32", shape=shape))
    _reject(verifier, _frames(o, hdr, b"", topic="run/run-1/fwd/all/"), BadTensor, "shape")


def test_no_pickle_anywhere():
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    sources = list((root / "clicooper_bus").rglob("*.py"))
    assert len(sources) > 50  # services and tools live under the package too
    for p in sources:
        text = p.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, p
        assert "torch.load(" not in text or "weights_only=True" in text, p


@pytest.mark.parametrize("body", [b"\xc1", b"\x91" * 100_000 + b"\x01", b"\xdd\xff\xff\xff\xff",
                                  b"\x82\xa1a\x01\xa1a\x02", b"\x81\x01\x02", b"\x80\x00",
                                  b"\xd6\xff\x00\x00\x00\x01"])
def test_hostile_document_bodies_are_refused(owner, verifier, body):
    """A validly signed message whose msgpack body is hostile verifies (the hash matches) but
    cannot be read as a document: `document()` refuses it with a typed error."""
    env = verifier.verify_frames(owner.seal("hello", "all", body).frames())
    with pytest.raises(MalformedMessage) as info:
        env.document()
    assert info.value.field == "body"


def test_a_process_waiting_for_the_roster_takes_nothing_else(ids, roster):
    """Before its roster, a trainer or the notary accepts only a roster: an earlier run's
    message would otherwise advance the owner's seq past the real roster's."""
    v = Verifier({ids["owner"].key_id: ids["owner"].public}, "run-1", roster_first=True)
    old = Sender(ids["owner"], "run-1", seq=7, nonce=bytes(16))
    exc = _reject(v, old.seal("fwd", "trainer-1", b"", dtype="uint8", shape=[0]).frames(),
                  WrongRun, "nonce")
    assert "before the roster" in str(exc)
    real = Sender(ids["owner"], "run-1", nonce=roster.nonce)
    assert v.verify_frames(real.seal("roster", "all", b"\x80").frames()).header.seq == 1
    # what the owner sends right after its roster is taken before the process reads the roster
    assert v.verify_frames(real.seal("beat", "all", b"\x80").frames()).header.seq == 2
    _reject(v, old.seal("beat", "all", b"\x80").frames(), WrongRun, "nonce")
