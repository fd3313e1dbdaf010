"""The provenance log: append, reopen, retention, torn tails, crashes, locking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clicooper_bus.errors import ConfigError, LogCorrupted, LogError
from clicooper_bus.net.identity import load_identity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import parse_header, split_leaf
from clicooper_bus.tlog.log import ProvenanceLog
from clicooper_bus.tlog.logverify import verify_log
from clicooper_bus.tlog.merkle import verify_consistency, verify_inclusion
from clicooper_bus.tlog.records import PREFIX
from clicooper_bus.tlog.retention import Retention
from tests.conftest import make_log


def _append_more(log_dir, n: int) -> None:
    """Reopen the log and append `n` more owner messages, continuing the owner's chain."""
    from clicooper_bus.net.wire import Sender

    keys = log_dir.parent / "keys"
    owner, notary = load_identity(keys / "owner.key"), load_identity(keys / "notary.key")
    with ProvenanceLog.open(log_dir, writable=True, signer=notary) as plog:
        roster = Roster.open(plog.roster_bytes)
        last = None
        for i in range(plog.size):
            h = parse_header(split_leaf(plog.leaf(i))[0])
            if h.sender == owner.key_id:
                last = h
        sender = Sender(owner, plog.run_id, seq=last.seq, prev=last.digest, nonce=roster.nonce)
        v = Verifier(roster, plog.run_id)
        v._state[owner.key_id] = (last.seq, last.digest)
        for j in range(n):
            env = sender.seal_array("fwd", "trainer-1", np.full((4, 8), j, np.float32), epoch=99)
            plog.append_envelope(v.verify_frames(env.frames()))
        plog.sign_checkpoint()


def test_demo_log_verifies(small_log):
    r = verify_log(small_log)
    assert r.ok, r.failure
    assert r.entries == 200 and r.checkpoints == 4 and r.uncovered == 0
    assert sum(r.per_sender.values()) == 200
    assert r.per_sender["owner"] == 81 and r.per_kind["roster"] == 1


def test_an_entry_of_another_run_fails_verification(small_log):
    """A message from an earlier run with the same id and keys (another roster nonce), appended
    by a careless or dishonest notary, makes `log verify` fail at that entry, naming the nonce."""
    from clicooper_bus.net.wire import Sender

    keys = small_log.parent / "keys"
    owner, notary = load_identity(keys / "owner.key"), load_identity(keys / "notary.key")
    with ProvenanceLog.open(small_log, writable=True, signer=notary) as plog:
        last = max((parse_header(split_leaf(plog.leaf(i))[0]) for i in range(plog.size)),
                   key=lambda h: h.seq if h.sender == owner.key_id else -1)
        stale = Sender(owner, plog.run_id, seq=last.seq, prev=last.digest, nonce=bytes(16))
        plog.append_envelope(stale.seal("beat", "all", b"\x80"))
        plog.sign_checkpoint()
        size = plog.size
    r = verify_log(small_log)
    assert not r.ok and r.failure.index == size - 1 and "nonce" in r.failure.reason


def test_reopen_continues_the_same_tree(small_log):
    with ProvenanceLog.open(small_log) as plog:
        old_size, old_root = plog.size, plog.tree.root()
    _append_more(small_log, 30)
    with ProvenanceLog.open(small_log) as plog:
        assert plog.size == old_size + 30
        assert plog.tree.root(old_size) == old_root
        verify_consistency(old_size, plog.size, old_root, plog.tree.root(),
                           plog.tree.consistency_proof(old_size))
        i = old_size + 5
        verify_inclusion(i, plog.size, plog.leaf_hash(i), plog.tree.inclusion_proof(i),
                         plog.tree.root())
    r = verify_log(small_log)
    assert r.ok, r.failure
    assert r.entries == 230 and r.checkpoints == 5


# 200 messages, all in epoch 0: the roster, then 40 steps of owner fwd + labels, trainer-1 fwd,
# trainer-2 bwd, trainer-1 bwd (the last step cut after 4): 80 fwd from two senders, 5 streams.
@pytest.mark.parametrize("spec,bodies", [("all", 200), ("none", 0), ("sample:3", 1 + 5 * 3),
                                         ("fwd=sample:2,*=none", 2 * 2),
                                         ("fwd=none,*=all", 200 - 80)])
def test_retention_policies(tmp_path, spec, bodies):
    log_dir = make_log(tmp_path, retention=spec)
    with ProvenanceLog.open(log_dir) as plog:
        assert plog.body_records() == bodies
    r = verify_log(log_dir)
    assert r.ok, r.failure


def test_sample_counts_per_kind_sender_epoch(tmp_path):
    log_dir = make_log(tmp_path, messages=600, retention="sample:2")
    kept = {}
    with ProvenanceLog.open(log_dir) as plog:
        for i in range(plog.size):
            h = parse_header(split_leaf(plog.leaf(i))[0])
            key = (h.kind, h.sender, h.epoch)
            kept[key] = kept.get(key, 0) + plog.has_body(h.body_sha256)
    # 120 steps -> epochs 0, 1, 2: every (kind, sender, epoch) stream keeps exactly 2
    assert len(kept) == 1 + 5 * 3
    assert [v for k, v in kept.items() if k[0] == "roster"] == [1]
    assert all(v == 2 for k, v in kept.items() if k[0] != "roster")


def test_torn_write_at_every_byte_of_the_last_record(tmp_path):
    log_dir = make_log(tmp_path, messages=40, checkpoint_every=0)  # final checkpoint only
    leaves = log_dir / "leaves.dat"
    # the final checkpoint covers every leaf; drop it so cutting the last leaf is legitimate
    (log_dir / "checkpoints.dat").write_bytes(b"")
    pristine = {p.name: p.read_bytes() for p in log_dir.iterdir() if p.is_file()}
    data = pristine["leaves.dat"]
    with ProvenanceLog.open(log_dir) as plog:
        last_start = plog.leaves.offsets[-1] - PREFIX.size
        size = plog.size
    for cut in range(last_start + 1, len(data)):
        for name, content in pristine.items():
            (log_dir / name).write_bytes(content)
        with open(leaves, "r+b") as f:
            f.truncate(cut)
        r = verify_log(log_dir)
        assert not r.ok and "torn tail" in r.failure.reason, (cut, r.failure)
        with ProvenanceLog.open(log_dir, writable=True) as plog:
            assert plog.size == size - 1
        assert leaves.stat().st_size == last_start
        r = verify_log(log_dir)
        assert r.ok, (cut, r.failure)
    _append_more(log_dir, 3)
    r = verify_log(log_dir)
    assert r.ok and r.entries == size - 1 + 3, r.failure


def test_torn_body_and_checkpoint_records_are_cut(small_log):
    for name in ("bodies.dat", "checkpoints.dat"):
        p = small_log / name
        p.write_bytes(p.read_bytes() + b"\x00\x00\x01\x00partial")
    assert not verify_log(small_log).ok
    with ProvenanceLog.open(small_log, writable=True) as plog:
        assert plog.torn
    assert verify_log(small_log).ok


def test_zero_filled_tail_is_torn(small_log):
    p = small_log / "leaves.dat"
    p.write_bytes(p.read_bytes() + bytes(4096))
    ProvenanceLog.open(small_log, writable=True).close()
    assert verify_log(small_log).ok


def test_garbage_in_the_middle_is_never_cut(small_log):
    p = small_log / "leaves.dat"
    data = bytearray(p.read_bytes())
    data[500] ^= 0x10
    p.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted, match="will not be repaired"):
        ProvenanceLog.open(small_log, writable=True)
    assert p.read_bytes() == bytes(data)  # nothing was rewritten


@pytest.mark.parametrize("name", ["leaves.dat", "bodies.dat"])
def test_damaged_length_in_the_middle_is_not_a_torn_tail(small_log, name):
    """A length prefix whose flipped high bit makes a middle record run past the end of the
    file looks like a torn write; it must be reported as corruption and nothing cut."""
    p = small_log / name
    with ProvenanceLog.open(small_log) as plog:
        rf = plog.leaves if name == "leaves.dat" else plog.bodies
        start = rf.offsets[len(rf) // 2] - PREFIX.size
    data = bytearray(p.read_bytes())
    data[start] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted, match="will not be repaired"):
        ProvenanceLog.open(small_log, writable=True)
    assert p.read_bytes() == bytes(data)


def test_cut_bytes_are_kept(small_log):
    p = small_log / "leaves.dat"
    p.write_bytes(p.read_bytes() + b"\x00\x00\x00\x09torn")
    ProvenanceLog.open(small_log, writable=True).close()
    kept = list((small_log / "torn").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == b"\x00\x00\x00\x09torn"


def test_cutting_below_a_checkpoint_is_refused(small_log):
    p = small_log / "leaves.dat"
    with ProvenanceLog.open(small_log) as plog:
        cut = plog.leaves.offsets[150] - PREFIX.size
    with open(p, "r+b") as f:
        f.truncate(cut + 3)  # torn inside record 150, below the checkpoint at 200
    with pytest.raises(LogCorrupted, match="covered by a signed checkpoint"):
        ProvenanceLog.open(small_log, writable=True)


def test_orphan_body_from_a_crash_is_cut(small_log):
    # a crash between writing a body and its leaf leaves an orphan body at the end
    with ProvenanceLog.open(small_log, writable=True) as plog:
        import hashlib
        body = b"orphan body"
        plog.bodies.append(hashlib.sha256(body).digest() + body)
    assert not verify_log(small_log).ok
    _append_more(small_log, 2)
    r = verify_log(small_log)
    assert r.ok, r.failure


def test_a_second_writer_is_refused(small_log):
    with ProvenanceLog.open(small_log, writable=True):
        with pytest.raises(LogError, match="another process"):
            ProvenanceLog.open(small_log, writable=True)
        with ProvenanceLog.open(small_log) as reader:  # readers are fine
            assert reader.size == 200


def test_create_refuses_an_existing_log(small_log, ids, roster):
    with pytest.raises(LogError, match="already holds a log"):
        ProvenanceLog.create(small_log, roster_bytes=b"", run_id="run-1")
    with pytest.raises(LogError, match="not a provenance log"):
        ProvenanceLog.open(small_log.parent / "nothing")


def test_killed_writer_loses_nothing_it_appended(tmp_path):
    """SIGKILL a writer mid-stream: everything it appended is there and verifies after repair."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from clicooper_bus.tools.log_demo import write_demo
        import clicooper_bus.tlog.log as L
        orig = L.ProvenanceLog.append
        count = 0
        def append(self, *a, **k):
            global count
            i = orig(self, *a, **k)
            count += 1
            if count == 333:
                print(i, flush=True)
                sys.stdin.read()  # wait here to be killed
            return i
        L.ProvenanceLog.append = append
        write_demo(Path({str(tmp_path / 'log')!r}), messages=1000, keys_dir=Path({str(tmp_path / 'keys')!r}),
                   shape=(4, 8), checkpoint_every=100, fsync="never")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    last = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = verify_log(tmp_path / "log")
    assert r.ok, r.failure
    assert r.entries == last + 1 == 333 and r.checkpoints == 3 and r.uncovered == 33


def test_large_torn_body_is_repaired_quickly(tmp_path):
    """Finding a torn tail scans for record starts at C speed: a 16 MiB body cut at 2/3 is
    repaired in well under a second (it took minutes with a byte-by-byte scan)."""
    import time

    log_dir = make_log(tmp_path, messages=20, checkpoint_every=0)
    (log_dir / "checkpoints.dat").write_bytes(b"")
    body = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    import hashlib
    with ProvenanceLog.open(log_dir, writable=True) as plog:
        plog.bodies.append(hashlib.sha256(body).digest() + body)  # its leaf never written
    p = log_dir / "bodies.dat"
    p.write_bytes(p.read_bytes()[: p.stat().st_size - (16 << 20) // 3])
    t0 = time.perf_counter()
    with ProvenanceLog.open(log_dir, writable=True) as plog:
        assert plog.size == 20 and plog.torn
    elapsed = time.perf_counter() - t0
    assert verify_log(log_dir).ok
    print(f"repair of a 16 MiB torn body took {elapsed:.2f} s")


def test_power_loss_losing_bodies_after_the_last_checkpoint(tmp_path):
    """With fsync=checkpoint, a power loss may keep leaves whose bodies never reached the disk:
    reopening cuts those leaves (they are past the last signed checkpoint) instead of refusing."""
    log_dir = make_log(tmp_path, messages=120, checkpoint_every=100)
    # the final checkpoint (at 120) was "lost" too, and the last 7 body records
    notes = log_dir / "checkpoints.dat"
    with ProvenanceLog.open(log_dir) as plog:
        keep_notes = plog.notes.offsets[1] - PREFIX.size
        keep_bodies = plog.bodies.offsets[plog.body_records() - 7] - PREFIX.size
    notes.write_bytes(notes.read_bytes()[:keep_notes])
    bodies = log_dir / "bodies.dat"
    bodies.write_bytes(bodies.read_bytes()[:keep_bodies])
    assert not verify_log(log_dir).ok
    with ProvenanceLog.open(log_dir, writable=True) as plog:
        assert 100 <= plog.size < 120
    r = verify_log(log_dir)
    assert r.ok, r.failure


def test_lost_body_covered_by_a_checkpoint_is_refused(small_log):
    bodies = small_log / "bodies.dat"
    with ProvenanceLog.open(small_log) as plog:
        cut = plog.bodies.offsets[100] - PREFIX.size
    bodies.write_bytes(bodies.read_bytes()[:cut])
    with pytest.raises(LogCorrupted, match="covered by a signed checkpoint"):
        ProvenanceLog.open(small_log, writable=True)
    assert bodies.stat().st_size == cut


def test_failed_write_is_cut_back_and_stops_the_writer(small_log, monkeypatch):
    import errno

    import clicooper_bus.tlog.records as records

    keys = small_log.parent / "keys"
    plog = ProvenanceLog.open(small_log, writable=True, signer=load_identity(keys / "notary.key"))
    size_before = (small_log / "leaves.dat").stat().st_size
    real_write = os.write

    def half_then_fail(fd, data):
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    raw, sig = split_leaf(plog.leaf(5))
    h = parse_header(raw)
    body = bytes(plog.body(h.body_sha256))
    monkeypatch.setattr(records.os, "write", half_then_fail)
    with pytest.raises(LogError, match="no space left"):  # LogFull, naming path and bytes
        plog.append(h, sig, body)
    monkeypatch.setattr(records.os, "write", real_write)
    assert (small_log / "leaves.dat").stat().st_size == size_before
    with pytest.raises(LogError, match="earlier append"):
        plog.append(h, sig, body)
    plog.close()
    assert verify_log(small_log).ok


def test_repair_never_cuts_what_a_checkpoint_covers(small_log):
    p = small_log / "leaves.dat"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01  # damage inside the last leaf, which the final checkpoint covers
    p.write_bytes(bytes(data))
    r = verify_log(small_log)
    assert not r.ok and "damage, not an interrupted write" in r.failure.reason
    with pytest.raises(LogCorrupted, match="covered by a signed checkpoint"):
        ProvenanceLog.open(small_log, writable=True)
    assert p.read_bytes() == bytes(data)


@pytest.mark.parametrize("case", ["roster_key_int", "log_json_list", "log_json_retention_int",
                                  "missing_bodies", "roster_is_dir", "checkpoints_is_dir",
                                  "limits_missing"])
def test_verify_gives_a_verdict_on_crafted_files(small_log, ids, case):
    """Whatever a log directory holds, verify answers with a failure, never a traceback."""
    import json
    import shutil

    from clicooper_bus.net import signed_doc

    meta = json.loads((small_log / "log.json").read_text())
    if case == "roster_key_int":
        doc = Roster.build("demo", owner=ids["owner"].public, trainers=[]).to_doc()
        doc["members"][0]["key"] = 7
        (small_log / "roster.msgpack").write_bytes(
            signed_doc.seal(ids["owner"], "clicooper/roster/v1", doc))
    elif case == "log_json_list":
        (small_log / "log.json").write_text("[1]")
    elif case == "log_json_retention_int":
        (small_log / "log.json").write_text(json.dumps({**meta, "retention": 5}))
    elif case == "limits_missing":
        (small_log / "log.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                        if k != "limits"}))
    elif case == "missing_bodies":
        (small_log / "bodies.dat").unlink()
    else:
        name = "roster.msgpack" if case == "roster_is_dir" else "checkpoints.dat"
        (small_log / name).unlink()
        (small_log / name).mkdir()
    r = verify_log(small_log)
    assert not r.ok and r.failure.reason
    shutil.rmtree(small_log)


@pytest.mark.parametrize("spec,message", [
    ("evl_out=sample:2,*=all", "'evl_out' is not a message kind"),
    ("fwd=sample:2,fwd=all", "appears twice"),
    ("fwd=keep", "is not all, none, sample:N or a preset"),
    ("verifY", "is not all, none, sample:N or a preset"),
])
def test_a_misspelt_retention_kind_is_refused_not_defaulted(spec, message):
    # before, `evl_out` silently fell to `*=all` and every evaluation output was kept
    with pytest.raises(ConfigError, match=message) as info:
        Retention.parse(spec)
    assert "eval_out" in str(info.value) or "evl_out" not in spec


def test_the_verify_preset_keeps_every_body_replay_reads():
    """Issue 19: `verify` keeps each stage's tensor inputs and outputs, evaluation traffic,
    labels and the documents replay compares, unsampled; the log records its name."""
    policy = Retention.parse(" verify ")
    assert policy.spec == "verify"
    for kind in ("fwd", "bwd", "labels", "eval_fwd", "eval_out", "metrics", "snapshot",
                 "wm_commit", "wm_claim"):
        assert policy.limit(kind) is None, kind
    from clicooper_bus.config import load_config

    assert Retention.parse(load_config(None).log.retention).limit("fwd") == 16  # the default


def test_a_full_disk_is_a_clear_error_and_the_log_still_verifies(small_log, monkeypatch):
    """ENOSPC (or EDQUOT) on the leaf's write, after its new body was written: LogFull names
    the directory and the bytes needed; the body written for it is cut back at once, so the
    log verifies as it is (no orphan body) and reopens to continue."""
    import errno

    import clicooper_bus.tlog.records as records
    from clicooper_bus.errors import LogFull
    from clicooper_bus.net.wire import Sender

    keys = small_log.parent / "keys"
    owner = load_identity(keys / "owner.key")
    plog = ProvenanceLog.open(small_log, writable=True, signer=load_identity(keys / "notary.key"))
    roster = Roster.open(plog.roster_bytes)
    last = max((parse_header(split_leaf(plog.leaf(i))[0]) for i in range(plog.size)),
               key=lambda h: h.seq if h.sender == owner.key_id else -1)
    env = Sender(owner, plog.run_id, seq=last.seq, prev=last.digest, nonce=roster.nonce
                 ).seal_array("fwd", "trainer-1", np.full((4, 8), 7.5, np.float32), epoch=99)
    env = Verifier(roster, plog.run_id, partial=True).verify_frames(env.frames())
    size, bodies = plog.size, (small_log / "bodies.dat").stat().st_size
    real_write, calls = os.write, []

    def full_on_the_leaf(fd, data):
        calls.append(len(data))
        if len(calls) == 2:  # the body went through; the leaf finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(records.os, "write", full_on_the_leaf)
    with pytest.raises(LogFull) as info:
        plog.append_envelope(env)
    monkeypatch.setattr(records.os, "write", real_write)
    msg = str(info.value)
    assert f"writing {info.value.needed} bytes to {small_log} failed" in msg, msg
    assert info.value.needed >= len(env.body) + 32 + 16 and f"up to entry {size}" in msg
    assert (small_log / "bodies.dat").stat().st_size == bodies  # the orphan body was cut
    plog.close()
    assert verify_log(small_log).ok


def test_a_full_disk_on_the_checkpoint_fsync_keeps_the_earlier_checkpoints(small_log,
                                                                          monkeypatch):
    import errno

    import clicooper_bus.tlog.records as records
    from clicooper_bus.errors import LogFull

    _append_more(small_log, 3)  # three more entries, signed
    keys = small_log.parent / "keys"
    with ProvenanceLog.open(small_log, writable=True, signer=load_identity(keys / "notary.key")
                            ) as plog:
        count = plog.checkpoint_count

        def full(fd):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        monkeypatch.setattr(records.os, "fsync", full)
        with pytest.raises(LogFull, match="no space left for the provenance log"):
            plog.sign_checkpoint()
        monkeypatch.undo()
        assert plog.checkpoint_count == count
    assert verify_log(small_log).ok
