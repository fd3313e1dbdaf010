"""Tamper evidence: on a 200-entry log, any single-bit flip anywhere, and any deleted, swapped
or duplicated record (even one re-framed with a valid checksum), makes `log verify` fail."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tlog.records import PREFIX, frame, scan
from tests.conftest import make_log

FILES = ("log.json", "roster.msgpack", "leaves.dat", "bodies.dat", "checkpoints.dat")
RECORD_FILES = ("leaves.dat", "bodies.dat", "checkpoints.dat")


@pytest.fixture(scope="module")
def log200(tmp_path_factory) -> Path:
    log_dir = make_log(tmp_path_factory.mktemp("tamper"), messages=200)
    r = verify_log(log_dir)
    assert r.ok and r.entries == 200 and r.checkpoints == 4, r.failure
    return log_dir


def _positions(log_dir: Path) -> list[tuple[str, int]]:
    """500 random bit positions spread over every file, plus the first and last bit of every
    record and of every record's prefix."""
    rng = random.Random(20261126)
    sizes = {name: (log_dir / name).stat().st_size for name in FILES}
    out = [(name, rng.randrange(sizes[name] * 8)) for name in FILES for _ in range(40)]
    total = sum(sizes.values())
    while len(out) < 500 + 40 * len(FILES):
        pos = rng.randrange(total * 8)
        for name in FILES:
            if pos < sizes[name] * 8:
                out.append((name, pos))
                break
            pos -= sizes[name] * 8
    for name in RECORD_FILES:
        s = scan(log_dir / name, 1 << 40)
        for off, length in zip(s.offsets, s.lengths, strict=True):
            start = off - PREFIX.size
            for byte in (start, start + 3, start + 4, start + 8, start + 12, off,
                         off + length - 1):
                out.append((name, byte * 8 + rng.randrange(8)))
    return out


def _flip(path: Path, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def test_every_single_bit_flip_fails(log200):
    positions = _positions(log200)
    assert len(positions) >= 500 + 2 * 200
    passed = []
    for name, bit in positions:
        path = log200 / name
        _flip(path, bit)
        try:
            r = verify_log(log200)
        finally:
            _flip(path, bit)
        if r.ok:
            passed.append((name, bit))
    assert not passed, f"bit flips that verify still passed: {passed[:10]}"
    assert verify_log(log200).ok


def _records(path: Path) -> list[bytes]:
    s = scan(path, 1 << 40)
    data = path.read_bytes()
    return [data[o:o + n] for o, n in zip(s.offsets, s.lengths, strict=True)]


def _write(path: Path, payloads: list[bytes]) -> None:
    """Rewrite a record file with valid framing, as an attacker who knows the format would."""
    path.write_bytes(b"".join(frame(p) for p in payloads))


def _mutations(name: str, n: int, rng: random.Random):
    i, j = sorted(rng.sample(range(n - 1), 2))
    yield "delete", lambda r: r[:i] + r[i + 1:]
    yield "delete-first", lambda r: r[1:]
    if name != "checkpoints.dat":  # dropping the latest checkpoint needs a witness: see below
        yield "delete-last", lambda r: r[:-1]
    yield "swap", lambda r: r[:i] + [r[j]] + r[i + 1:j] + [r[i]] + r[j + 1:]
    yield "swap-adjacent", lambda r: r[:i] + [r[i + 1], r[i]] + r[i + 2:]
    yield "duplicate", lambda r: r[:i + 1] + [r[i]] + r[i + 1:]
    yield "duplicate-last", lambda r: r + [r[-1]]


@pytest.mark.parametrize("name", RECORD_FILES)
def test_reframed_record_edits_fail(log200, name):
    path = log200 / name
    pristine = path.read_bytes()
    records = _records(path)
    rng = random.Random(name)
    try:
        for label, edit in _mutations(name, len(records), rng):
            _write(path, edit(list(records)))
            r = verify_log(log200)
            assert not r.ok, f"{name}: {label} was not detected"
    finally:
        path.write_bytes(pristine)
    assert verify_log(log200).ok


def test_reframed_header_edit_fails(log200):
    """An attacker who rewrites a header and fixes the checksum still breaks the signature."""
    path = log200 / "leaves.dat"
    pristine = path.read_bytes()
    records = _records(path)
    leaf = bytearray(records[100])
    leaf[leaf.index(b"epoch") + 5] ^= 0x01  # a different epoch number
    try:
        _write(path, records[:100] + [bytes(leaf)] + records[101:])
        r = verify_log(log200)
        assert not r.ok and r.failure.index == 100 and "bad_signature" in r.failure.reason
    finally:
        path.write_bytes(pristine)


def test_dropping_the_latest_checkpoint_needs_a_witness(log200):
    """A log cut back to an earlier checkpoint is self-consistent; the last checkpoint a
    participant saw (`--checkpoint`) is what exposes it."""
    path = log200 / "checkpoints.dat"
    pristine = path.read_bytes()
    records = _records(path)
    witness = records[-1].decode()
    leaves = log200 / "leaves.dat"
    leaves_pristine = leaves.read_bytes()
    try:
        _write(path, records[:-1])
        s = scan(leaves, 1 << 40)
        leaves.write_bytes(leaves_pristine[:s.offsets[150] - PREFIX.size])  # and the tail
        # (bodies of the cut tail are cut too, so only the witness can tell)
        bodies = _records(log200 / "bodies.dat")
        bodies_pristine = (log200 / "bodies.dat").read_bytes()
        _write(log200 / "bodies.dat", bodies[:150])
        r = verify_log(log200)
        assert r.ok and r.checkpoints == 3, r.failure
        assert any("witnessed" in w for w in r.warnings)
        r = verify_log(log200, witnessed=[witness])
        assert not r.ok and "entries were removed" in r.failure.reason
    finally:
        path.write_bytes(pristine)
        leaves.write_bytes(leaves_pristine)
        (log200 / "bodies.dat").write_bytes(bodies_pristine)
    assert verify_log(log200, witnessed=[witness]).ok


@pytest.mark.parametrize("keep", [0, 1, 149, 199])
def test_truncating_below_a_checkpoint_fails(log200, keep):
    path = log200 / "leaves.dat"
    pristine = path.read_bytes()
    s = scan(path, 1 << 40)
    try:
        end = s.offsets[keep] - PREFIX.size
        path.write_bytes(pristine[:end])  # cut at a record boundary: no torn tail to see
        r = verify_log(log200)
        assert not r.ok and "checkpoint" in r.failure.reason, r.failure
    finally:
        path.write_bytes(pristine)


def test_first_failure_names_entry_and_reason(log200):
    path = log200 / "leaves.dat"
    pristine = path.read_bytes()
    records = _records(path)
    try:
        _write(path, records[:42] + records[43:])
        r = verify_log(log200)
        # the gap shows at the removed message's sender's next message (5 messages a step)
        assert 42 <= r.failure.index < 42 + 5 and r.failure.file == "leaves.dat"
        assert "seq_gap" in r.failure.reason and "skips 1 message" in r.failure.reason
    finally:
        path.write_bytes(pristine)
