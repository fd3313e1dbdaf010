"""A member's outbox (`net.outbox`) and how a restarted process takes its chain up from it
(`Refill.take_up`, issue 17): never a place of its chain signed twice."""

from __future__ import annotations

import errno
import os
from collections import deque

import pytest

from clicooper_bus.net.identity import Identity
from clicooper_bus.net.liveness import BusError
from clicooper_bus.net.outbox import Outbox, OutboxError
from clicooper_bus.net.refill import Refill
from clicooper_bus.net.wire import Sender


def _sent(ident: Identity, n: int, start: int = 0, body: bytes = b"x" * 100):
    s = Sender(ident, "run-1")
    out = [s.seal("beat" if i % 2 else "fwd", "all", body + bytes([i % 256]), step=i)
           for i in range(start + n)]
    return out[start:], s


def _outbox(tmp_path, ident, keep=4096, keep_bytes=64 << 20) -> Outbox:
    return Outbox(tmp_path / "outbox", ident.public, keep=keep, keep_bytes=keep_bytes)


def _written(tmp_path, ident, envs, **keep) -> Outbox:
    """An outbox in `tmp_path` holding `envs`, closed (as a killed process leaves it)."""
    box = _outbox(tmp_path, ident, **keep)
    for e in envs:
        box.append(e)
    box.close()
    return box


def test_what_was_written_reads_back_and_a_torn_tail_is_cut(tmp_path):
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 5)
    _written(tmp_path, me, envs)
    seg = next((tmp_path / "outbox").iterdir())
    assert oct(seg.stat().st_mode & 0o777) == "0o600"
    whole = seg.stat().st_size
    with open(seg, "ab") as f:  # a process killed in the middle of writing its 6th record
        f.write(b"\x05\x00\x00\x00\x40")  # (its lengths, cut short)
    got = _outbox(tmp_path, me).load()
    assert [e.header.seq for e in got] == [1, 2, 3, 4, 5]
    more, _ = _sent(me, 1, start=5)
    box = _outbox(tmp_path, me)
    box.load()
    box.append(more[0])
    box.close()
    with open(seg, "r+b") as f:  # a whole record's lengths, its bytes cut short
        f.truncate(whole + 100)
    assert [e.header.seq for e in _outbox(tmp_path, me).load()] == [1, 2, 3, 4, 5]
    assert [(e.header.raw, e.signature, bytes(e.body), e.topic) for e in got] == \
        [(e.header.raw, e.signature, bytes(e.body), e.topic) for e in envs]
    assert seg.stat().st_size == whole  # cut back to the last whole record


def test_a_record_that_does_not_parse_is_refused_unless_zeros_end_the_file(tmp_path):
    """Review: a flipped byte in a header mid-file read as a torn tail, cutting the messages
    after it, which the restarted process then signed again (an honest member proven to
    equivocate). Only a write cut short, or zeros a power loss left at the end, is cut."""
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 4)
    _written(tmp_path, me, envs)
    seg = next((tmp_path / "outbox").iterdir())
    data = bytearray(seg.read_bytes())
    whole = len(data)
    seg.write_bytes(bytes(data) + bytes(300))  # zeros after the last record
    assert [e.header.seq for e in _outbox(tmp_path, me).load()] == [1, 2, 3, 4]
    assert seg.stat().st_size == whole
    first = len(envs[0].topic) + len(envs[0].header.raw) + 20 + 64 + len(envs[0].body)
    header = bytearray(data)
    header[first + 20 + len(envs[1].topic)] ^= 0xFF  # the second record's header, mid-file
    seg.write_bytes(bytes(header))
    with pytest.raises(OutboxError, match="does not parse"):
        _outbox(tmp_path, me).load()
    assert seg.stat().st_size == whole  # nothing cut
    length = bytearray(data)
    length[first + 8] ^= 0x01  # the second record's body length: it would run past the end
    seg.write_bytes(bytes(length))
    with pytest.raises(OutboxError, match="CRC-32"):
        _outbox(tmp_path, me).load()
    assert seg.stat().st_size == whole


def test_a_finished_run_leaves_no_outbox(tmp_path):
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 2)
    member = _Member(me, _outbox(tmp_path, me))
    member.outbox.append(envs[0])
    member.forget_sent()
    assert member.outbox is None and not list((tmp_path / "outbox").iterdir())


def test_a_record_not_ours_or_out_of_order_is_refused_not_cut(tmp_path):
    me, other = Identity.generate("trainer-1"), Identity.generate("trainer-2")
    envs, _ = _sent(me, 3)
    theirs, _ = _sent(other, 1)
    box = _outbox(tmp_path, me)
    for e in (envs[0], theirs[0], envs[1]):
        box.append(e)
    with pytest.raises(OutboxError, match="not the next message we signed"):
        _outbox(tmp_path, me).load()
    box.clear()
    for e in (envs[0], envs[2]):  # a gap: seq 2 missing
        box.append(e)
    with pytest.raises(OutboxError, match="not the next message we signed"):
        _outbox(tmp_path, me).load()


def test_old_segments_go_once_newer_ones_hold_what_the_bus_keeps(tmp_path, monkeypatch):
    import clicooper_bus.net.outbox as outbox

    monkeypatch.setattr(outbox, "SEGMENT_MESSAGES", 10)
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 95)
    _written(tmp_path, me, envs, keep=30)
    got = _outbox(tmp_path, me, keep=30).load()
    # at least the last 30 (what the bus keeps in memory), never more than one segment over
    assert got[-1].header.seq == 95 and 30 <= len(got) <= 40, [e.header.seq for e in got]
    assert len(list((tmp_path / "outbox").iterdir())) <= 4


def test_a_full_disk_is_an_error_naming_the_file_and_nothing_is_sent(tmp_path, monkeypatch):
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 1)

    def full(fd, parts):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(OutboxError, match=r"000000000001\.out.*No space left"):
        _outbox(tmp_path, me).append(envs[0])


class _Member(Refill):
    """The resend half of a bus, publishing into a list."""

    def __init__(self, ident: Identity, outbox: Outbox | None):
        self.sender = Sender(ident, "run-1")
        self.kept, self.kept_bytes, self.outbox = deque(), 0, outbox
        self.published = []

    def _publish(self, env):
        self.published.append(env)


def test_a_restarted_member_goes_on_after_its_dead_process_and_sends_again_what_the_log_missed(
        tmp_path):
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 8)
    _written(tmp_path, me, envs)  # the dead process signed 8; the notary's log has 5
    member = _Member(me, _outbox(tmp_path, me))
    resent = member.take_up(5, envs[4].header.digest)
    # what the log missed, byte for byte and in order, before anything new
    assert [e.header.seq for e in resent] == [6, 7, 8]
    assert [e.header.raw for e in member.published] == [e.header.raw for e in envs[5:]]
    nxt = member.sender.seal("rejoin", "owner", b"")  # the next place: 9, after the 8th
    assert nxt.header.seq == 9 and nxt.header.prev == envs[7].header.digest


def test_a_log_that_holds_another_message_than_our_outbox_is_a_fork(tmp_path):
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 4)
    _written(tmp_path, me, envs)
    with pytest.raises(BusError, match="forked chain"):
        _Member(me, _outbox(tmp_path, me)).take_up(2, b"\x01" * 32)
    with pytest.raises(BusError, match="forked chain"):
        _Member(me, _outbox(tmp_path, me)).take_up(4, b"\x01" * 32)


def test_an_outbox_behind_the_log_or_none_goes_on_from_the_tip(tmp_path):
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 6)
    _written(tmp_path, me, envs[:3])  # a machine that lost power lost the tail: the log has 6
    member = _Member(me, _outbox(tmp_path, me))
    assert member.take_up(6, envs[5].header.digest) == [] and member.published == []
    assert (member.sender.seq, member.sender.prev) == (6, envs[5].header.digest)
    assert _outbox(tmp_path, me).load() == []  # started again from the tip
    bare = _Member(me, None)
    assert bare.take_up(6, envs[5].header.digest) == []
    assert bare.sender.seq == 6


def test_a_gap_between_the_log_and_the_outbox_cannot_be_filled(tmp_path, monkeypatch):
    import clicooper_bus.net.outbox as outbox

    monkeypatch.setattr(outbox, "SEGMENT_MESSAGES", 2)
    me = Identity.generate("trainer-1")
    envs, _ = _sent(me, 9)
    _written(tmp_path, me, envs, keep=2)
    with pytest.raises(BusError, match="cannot be sent again"):  # before anything is sent
        _Member(me, _outbox(tmp_path, me, keep=2)).take_up(1, envs[0].header.digest)
