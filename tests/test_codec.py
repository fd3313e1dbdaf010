"""`[bus] codec` (issue 18): how float tensors travel. Each codec's round-trip error bound, the
bytes int8 saves, overflow that saturates instead of turning infinite, the signed plan carrying
the codec, the receive check refusing a tensor in another encoding (or a malformed or
non-finite one) naming its sender, the bus encoding what it sends and stamping what it hands
out, and one short int8 run over the bus whose log verifies."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import numpy as np
import pytest

from clicooper_bus.config import BusSection
from clicooper_bus.errors import BadTensor, PoisonedInput, RosterError
from clicooper_bus.ml.tensors import Expected, received
from clicooper_bus.net.bus import Bus, BusAddress
from clicooper_bus.net.encoding import CODECS, F16_MAX, decode, encode, plan_codec, wire_dtype
from clicooper_bus.net.forwarder import Forwarder
from clicooper_bus.net.identity import Identity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import DEFAULT_LIMITS, Sender, parse_header, split_leaf
from clicooper_bus.plan import Plan

SAMPLE = (8, 14, 14)  # one row of the demo's trainer-1 -> trainer-2 activations: 1,568 floats
WANT = Expected("float32", SAMPLE, max_rows=128)
# per element: |x - x'| <= REL * |x| + ABS (fp16's subnormals are spaced 2**-24)
BOUNDS = {"fp32": (0.0, 0.0), "fp16": (2.0 ** -11, 2.0 ** -25), "bf16": (2.0 ** -8, 0.0)}


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """A 128-row batch of the demo's shape, spanning magnitudes, with a row of zeros."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, *SAMPLE)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-6, 4, size=(128, 1, 1, 1)).astype(np.float32)
    x[5] = 0.0
    return x


def _round_trip(x: np.ndarray, codec: str) -> np.ndarray:
    enc = encode(x, codec)
    assert enc.dtype == wire_dtype("float32", codec) and enc.shape == x.shape
    out = decode(enc.dtype, enc.shape, bytes(enc.body))
    assert out.dtype == np.float32 and out.shape == x.shape
    return out


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_round_trips_within_its_bound(batch, codec):
    out = _round_trip(batch, codec)
    err = np.abs(out - batch)
    if codec == "int8":  # half a step of the row's scale, the scale being max |x| / 127
        peak = np.abs(batch).reshape(128, -1).max(axis=1)
        assert (err.reshape(128, -1).max(axis=1) <= peak / 254 * (1 + 1e-6)).all()
    else:
        rel, tiny = BOUNDS[codec]
        assert (err <= rel * np.abs(batch) + tiny).all()
    assert (out[5] == 0).all()  # a row of zeros decodes to exact zeros (int8: scale 0)


def test_int8_rounds_half_to_even_per_row():
    """Scale = max |x| / 127 per row (here 1 and 0.5); values round half to even."""
    x = np.array([[127, 0.5, 1.5, 2.5, -0.5, -127], [63.5, 0.25, 0.75, 0, 0, 0]], np.float32)
    out = _round_trip(x, "int8")
    assert out.tolist() == [[127, 0, 2, 2, 0, -127], [63.5, 0, 1.0, 0, 0, 0]]


def test_int8_sends_four_times_fewer_bytes_at_the_demo_shape(batch):
    fp32 = len(encode(batch, "fp32").body)
    assert fp32 == 128 * 1568 * 4
    for codec in ("fp16", "bf16"):
        assert len(encode(batch, codec).body) * 2 == fp32
    int8 = len(encode(batch, "int8").body)
    assert int8 == 128 * 4 + 128 * 1568  # a float32 scale per row, a byte per value
    assert fp32 / int8 >= 3.5  # 3.99


def test_overflow_saturates_counted_and_non_finite_stays_non_finite():
    x = np.array([[1e5, -7e4, 65504.0, 3.0, np.inf, np.nan]], np.float32)
    enc = encode(x, "fp16")
    out = decode(enc.dtype, enc.shape, bytes(enc.body))
    assert enc.clamped == 2 and out[0, :4].tolist() == [F16_MAX, -F16_MAX, F16_MAX, 3.0]
    assert out[0, 4] == np.inf and np.isnan(out[0, 5])  # the receiver refuses these
    big = np.array([[3.4e38, -3.4028235e38, 1.0, np.inf, np.nan]], np.float32)
    enc = encode(big, "bf16")
    out = decode(enc.dtype, enc.shape, bytes(enc.body))
    assert enc.clamped == 2 and np.isfinite(out[0, :3]).all() and out[0, 2] == 1.0
    assert out[0, 3] == np.inf and np.isnan(out[0, 4])
    enc = encode(np.array([[1.0, np.nan], [np.inf, 2.0], [1e-45, 0.0]], np.float32), "int8")
    scale = np.frombuffer(bytes(enc.body), "<f4", count=3)
    assert np.isnan(scale[0]) and scale[1] == np.inf and scale[2] >= 0  # refused on receipt


def test_tiny_and_empty_rows_encode_to_what_the_receiver_takes():
    """A row whose peak is under 127 x the smallest float32 gets scale 0: it must decode as
    zeros, not be refused as "non-zero values in a row of scale 0" (which would blame an
    honest sender for a gradient a malicious neighbour made tiny). A batch of no rows
    encodes and decodes too."""
    peaks = np.float32(10.0) ** np.arange(-45, -37).astype(np.float32)
    rows = np.outer(peaks, np.linspace(-1, 1, 6)).astype(np.float32)
    got = received(_sent(rows, "int8", "int8"), Expected("float32", (6,), max_rows=16), "o")
    assert np.abs(got.numpy() - rows).max() < 1e-38
    for codec in CODECS:
        empty = encode(np.zeros((0, 3), np.float32), codec)
        assert decode(empty.dtype, empty.shape, bytes(empty.body)).shape == (0, 3)


def test_an_encoded_shape_is_bounded_by_its_decoded_size():
    """An int8 body decodes to 4 times its size: its float32 size is held to the body limit,
    so a message within the limit on the wire cannot decode into 4 times it."""
    s = Sender(Identity.generate("owner"), "r")
    rows = DEFAULT_LIMITS.max_body // 4 // 1000 + 1  # float32 just over the limit
    with pytest.raises(BadTensor, match="decodes to more float32 than the body limit"):
        s.seal("fwd", "t", bytes(4 * rows + 1000 * rows), dtype="int8/row", shape=[rows, 1000])
    ok = rows - 2
    s.seal("fwd", "t", bytes(4 * ok + 1000 * ok), dtype="int8/row", shape=[ok, 1000])


def test_the_header_checks_an_encoded_body_against_its_shape():
    s = Sender(Identity.generate("owner"), "r")
    assert s.seal("fwd", "t", bytes(4 * 2 + 6), dtype="int8/row", shape=[2, 3]).header.body_len == 14
    with pytest.raises(BadTensor, match="needs 14 bytes, header says 12"):
        s.seal("fwd", "t", bytes(12), dtype="int8/row", shape=[2, 3])
    with pytest.raises(BadTensor, match="at least one dimension"):
        s.seal("fwd", "t", bytes(5), dtype="int8/row", shape=[])
    with pytest.raises(BadTensor, match="needs 12 bytes"):
        s.seal("fwd", "t", bytes(8), dtype="bfloat16", shape=[2, 3])
    with pytest.raises(BadTensor, match="not in the whitelist"):
        s.seal("fwd", "t", bytes(6), dtype="int4/row", shape=[2, 3])


# --- the signed plan ---------------------------------------------------------------------------

def _plan(cuts=(3, 7), **kw) -> Plan:
    return Plan("small-cnn", (1, 28, 28), 10, cuts, 0, 1e-3, 128, **kw)


def test_the_codec_is_part_of_the_signed_plan():
    assert set(CODECS) == set(next(f for f in fields(BusSection)
                                   if f.name == "codec").metadata["choices"])
    meta = _plan(codec="int8").to_meta()
    assert Plan.from_meta(meta).codec == "int8" and plan_codec({"plan": meta}) == "int8"
    old = json.loads(meta)
    del old["codec"]  # a plan from before the codec was carried travels as fp32
    assert Plan.from_meta(json.dumps(old)).codec == "fp32" == plan_codec({"plan": json.dumps(old)})
    assert plan_codec({}) == "fp32"
    assert "codec" not in json.loads(_plan().to_meta())  # fp32 plans read as they did before
    with pytest.raises(RosterError, match="codec 'int4' is not one of fp32, fp16, bf16, int8"):
        _plan(codec="int4")
    old["codec"] = "int4"
    with pytest.raises(RosterError, match="codec 'int4'"):
        plan_codec({"plan": json.dumps(old)})


# --- the receive check -------------------------------------------------------------------------

def _sent(array, codec: str, plan_codec_: str, kind: str = "fwd"):
    """What `owner` sends with `codec`, verified and handed out by a receiver whose plan says
    `plan_codec_`."""
    owner = Identity.generate("owner")
    env = Sender(owner, "r").seal_array(kind, "trainer-1", array, codec=codec, step=3)
    verifier = Verifier({owner.key_id: owner.public}, "r")
    return verifier.verify_frames(env.frames()).expecting(plan_codec_)


@pytest.mark.parametrize("codec", CODECS)
def test_a_tensor_in_the_plans_codec_is_decoded_to_float32(batch, codec):
    got = received(_sent(batch, codec, codec), WANT, "owner")
    assert got.dtype.is_floating_point and str(got.dtype) == "torch.float32"
    rows, want = got.numpy().reshape(128, -1), batch.reshape(128, -1)
    if codec == "int8":  # per row: the batch spans 1e-6 to 1e3
        bound = np.abs(want).max(axis=1, keepdims=True) / 254 * (1 + 1e-6)
    else:
        rel, floor = BOUNDS[codec]
        bound = rel * np.abs(want) + floor
    assert (np.abs(rows - want) <= bound).all()
    labels = received(_sent(np.arange(128, dtype=np.int64), codec, codec, "labels"),
                      Expected("int64", (), max_rows=128), "owner")
    assert labels.tolist() == list(range(128))  # integers travel as they are


@pytest.mark.parametrize(("sent", "plan"), [("fp16", "int8"), ("fp32", "int8"), ("int8", "fp32"),
                                            ("bf16", "fp16")])
def test_a_tensor_in_another_codec_is_refused_naming_its_sender(batch, sent, plan):
    with pytest.raises(PoisonedInput) as info:
        received(_sent(batch, sent, plan), WANT, "trainer-7")
    err = info.value
    assert (err.sender, err.kind, err.step) == ("trainer-7", "fwd", 3)
    assert f"a tensor of {wire_dtype('float32', sent)} " in err.problem
    if plan != "fp32":
        assert f"sent as {wire_dtype('float32', plan)} (the signed plan's codec {plan})" in err.problem


def _int8_body(scales, values) -> bytes:
    return np.asarray(scales, "<f4").tobytes() + np.asarray(values, np.int8).tobytes()


@pytest.mark.parametrize(("scales", "values", "problem"), [
    ([3e38, 1.0], [[127, 1], [1, 1]], "1 infinite values among 4"),  # finite scale, inf decoded
    ([-1.0, 1.0], [[1, 1], [1, 1]], r"scale\(s\) not finite or negative"),
    ([float("nan"), 1.0], [[1, 1], [1, 1]], r"scale\(s\) not finite or negative"),
    ([1.0, 1.0], [[-128, 1], [1, 1]], "value -128"),
    ([0.0, 1.0], [[3, 0], [1, 1]], "non-zero values in a row of scale 0"),
])
def test_a_malformed_or_non_finite_int8_tensor_is_refused_naming_its_sender(scales, values,
                                                                           problem):
    owner = Identity.generate("owner")
    env = Sender(owner, "r").seal("fwd", "t", _int8_body(scales, values), dtype="int8/row",
                                  shape=[2, 2], step=9)
    env = Verifier({owner.key_id: owner.public}, "r").verify_frames(env.frames())
    with pytest.raises(PoisonedInput, match=problem) as info:
        received(env.expecting("int8"), Expected("float32", (2,), max_rows=4), "trainer-3")
    assert (info.value.sender, info.value.step) == ("trainer-3", 9)


def test_the_bus_sends_in_its_rosters_codec_and_stamps_what_it_hands_out(batch):
    """Two buses through a plaintext forwarder, bound to a roster whose plan says int8."""
    fwd = Forwarder("tcp://127.0.0.1:0", "tcp://127.0.0.1:0").start()
    owner, trainer = Identity.generate("owner"), Identity.generate("trainer-1")
    roster = Roster.build("r", owner=owner.public, trainers=[trainer.public],
                          meta={"plan": _plan(cuts=(3,), codec="int8").to_meta()})
    addr = BusAddress(fwd.pub_addr, fwd.sub_addr)
    buses = [Bus(who, "r", addr, Verifier(roster, "r", partial=True), timeout_s=30)
             for who in (owner, trainer)]
    try:
        assert all(b.codec == "fp32" for b in buses)
        for b in buses:
            b.bind(roster)
        sender, reader = buses
        assert sender.codec == reader.codec == "int8"
        reader.subscribe(reader.topics.to("fwd", "trainer-1"))
        reader.announce()
        sender.wait_for_subscribers("hello", ["trainer-1"], 10)
        sent = sender.send_array("fwd", "trainer-1", batch[:16], step=0)
        assert sent.header.dtype == "int8/row" and sent.header.body_len == 16 * (4 + 1568)
        env = reader.recv(10)
        assert env is not None and env.float_codec == "int8"
        assert received(env, WANT, "owner").shape == (16, *SAMPLE)
    finally:
        for b in buses:
            b.close()
        fwd.close()


# --- a run over the bus ------------------------------------------------------------------------

def test_a_short_int8_run_trains_and_its_log_verifies(tmp_path):
    from clicooper_bus.tlog.log import ProvenanceLog
    from clicooper_bus.tools.run import run
    from tests.busrun import write_config

    path = write_config(tmp_path, run_id="int8", trainers=2, run={"max_steps": 24},
                        bus={"codec": "int8"}, log={"retention": "*=all"})
    assert run(str(path), echo=False, free_ports=False, timeout_s=120) == 0  # log verified
    run_dir = tmp_path / "runs" / "int8"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and math.isfinite(summary["per_epoch"][0]["loss"])
    assert summary["test_accuracy"] > 0.2  # it trains: 10 balanced classes
    kinds: dict[str, set[str]] = {}
    with ProvenanceLog.open(run_dir / "log") as plog:
        assert Plan.from_meta(Roster.open(plog.roster_bytes).meta["plan"]).codec == "int8"
        for i in range(plog.size):
            h = parse_header(split_leaf(plog.leaf(i))[0], plog.limits)
            if h.dtype is not None:
                kinds.setdefault(h.kind, set()).add(h.dtype)
                assert plog.body(h.body_sha256) is not None  # the log keeps what was sent
    for kind in ("fwd", "bwd", "eval_fwd", "eval_out"):
        assert kinds[kind] == {"int8/row"}, kinds
    # the auditor reads what the receivers computed on: the decoded int8 bodies
    from clicooper_bus.audit.channels import read_channels
    from clicooper_bus.audit.replay import replay

    released = replay(run_dir / "log").released
    assert released and all(b.array.dtype == np.float32 for b in released)
    with ProvenanceLog.open(run_dir / "log") as plog:
        first = next(h for h in (parse_header(split_leaf(plog.leaf(i))[0], plog.limits)
                                 for i in range(plog.size)) if h.kind == "fwd")
        want = decode(first.dtype, first.shape, bytes(plog.body(first.body_sha256)))
    assert np.array_equal(released[0].array, want)
    ch = read_channels(run_dir / "log", 2000, 500, {"fwd", "bwd"})
    assert ch.undecodable == 0 and ch.of("trainer-2")["fwd"].x.dtype == np.float32
    assert kinds["labels"] == {"int64"}
