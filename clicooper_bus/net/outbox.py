"""A member's own sent messages, kept on its disk before they are sent (issue 17).

A member killed while the notary was down (or while its last messages were still in ZeroMQ's
queues) has signed messages the log never got, and some of them reached receivers. Started
again from the log's tip alone, it would sign other messages at those places of its chain, and
a receiver that kept what the dead process sent could show the notary two signed messages at
one `seq`: an honest restart proven as equivocation. So each message is appended here before
it is published (`Bus.publish`): a restarted process continues its chain after the last
message its dead process signed (`Refill.take_up`), sends again what the log misses, and never
signs a place of its chain twice.

Files: `<dir>/<first seq, 12 digits>.out`, segments of at most `SEGMENT_MESSAGES` messages or
`SEGMENT_BYTES` bytes, mode 0600 (what a member sent may be its labels or activations). A
record is `<topic length u32><header length u32><body length u64><CRC-32 of those 16 bytes>`,
then the topic, the header, the 64-byte signature and the body: the message's frames as they
went out. Old segments go
once the newer ones hold at least `keep` messages or `keep_bytes` bytes, so the disk keeps at
least what the bus keeps in memory to send again (`refill.KEEP_SENT`).

Durability: each record is written with one `writev` before the message is sent, with no
fsync: a killed process loses nothing (the page cache outlives it), a machine that loses power
may lose the tail. Then the restarted process goes on from the notary's tip as before this
module, and a conflict it causes stops the run naming it (fails closed). Torn or altered
records are found on reading (each is checked against our own key): a record whose lengths
check but whose bytes end early, or zeros to the end, is cut off (a write cut short: never
sent); lengths that do not match their CRC, or a record that does not parse or is not the next
message we signed, are an `OutboxError` and nothing is cut (a flipped bit must not drop what
was sent). A run that is over (finished or stopped) removes the outbox
(`Refill.forget_sent`): what a member sent is not left on its disk.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from clicooper_bus.errors import ClicooperError, RejectedMessage
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.wire import SIG_LEN, Envelope, parse_header, signed_bytes

SEGMENT_MESSAGES, SEGMENT_BYTES = 512, 8 << 20
_LENGTHS = struct.Struct("<IIQ")
_PREFIX = struct.Struct("<IIQI")  # the lengths and the CRC-32 of their 16 bytes
SUFFIX = ".out"


class OutboxError(ClicooperError):
    """The outbox cannot be written (a full disk), or holds a record that is not a message we
    signed with more after it: names the file and what to do."""


class Outbox:
    """Our own sent messages in `root`, checked against `key` (ours) when read back."""

    def __init__(self, root: Path, key: PublicIdentity, *, keep: int, keep_bytes: int):
        self.root, self.key = Path(root), key
        self.keep, self.keep_bytes = keep, keep_bytes
        self._fd: int | None = None
        self._segment: Path | None = None
        self._sizes: dict[Path, tuple[int, int]] = {}  # segment -> (messages, bytes)

    # --- writing -------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every kept message (a process that starts a chain of its own)."""
        self.close()
        for seg in self._segments():
            seg.unlink()
        self._sizes.clear()

    def append(self, env: Envelope) -> None:
        """Write `env` (ours, about to be published) at the end. Raises OutboxError when the
        file system refuses it (the message is then not sent)."""
        topic = env.topic.encode()
        lengths = _LENGTHS.pack(len(topic), len(env.header.raw), len(env.body))
        parts = [lengths + struct.pack("<I", zlib.crc32(lengths)), topic, env.header.raw,
                 env.signature, env.body]
        size = sum(len(p) for p in parts)
        try:
            fd = self._writable(env.header.seq)
            _write_all(fd, parts, size)
        except OSError as exc:
            raise OutboxError(f"could not keep our message (seq {env.header.seq}, {size} "
                              f"bytes) in {self._segment}: {exc.strerror or exc}; free space "
                              f"there (a restarted process needs what it sent) and resume the "
                              f"run") from None
        n, b = self._sizes.get(self._segment, (0, 0))
        self._sizes[self._segment] = (n + 1, b + size)

    def _writable(self, seq: int) -> int:
        n, b = self._sizes.get(self._segment, (0, 0)) if self._segment else (0, 0)
        if self._fd is None or n >= SEGMENT_MESSAGES or b >= SEGMENT_BYTES:
            self.close()
            self.root.mkdir(parents=True, exist_ok=True)
            self._segment = self.root / f"{seq:012d}{SUFFIX}"
            self._fd = os.open(self._segment, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                               getattr(os, "O_NOFOLLOW", 0), 0o600)
            self._sizes.setdefault(self._segment, (0, 0))
            self._prune()
        return self._fd

    def _prune(self) -> None:
        """Remove the oldest segments the newer ones make needless (see the module doc)."""
        segs = self._segments()
        while len(segs) > 1:
            rest = [self._sizes.get(s, (0, 0)) for s in segs[1:]]
            if sum(n for n, _ in rest) < self.keep and sum(b for _, b in rest) < self.keep_bytes:
                return
            segs.pop(0).unlink()

    def close(self) -> None:
        """Stop writing (the files stay: `clear` removes them)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._segment = None, None

    # --- reading -------------------------------------------------------------------------------

    def load(self) -> list[Envelope]:
        """Every kept message, oldest first: each a message of ours whose body its header
        hashes, their seqs consecutive. A torn record at the very end (a process killed while
        writing it: it was never sent) is cut off. Raises OutboxError for a bad record with
        more after it."""
        self.close()
        out: list[Envelope] = []
        segs = self._segments()
        for i, seg in enumerate(segs):
            data = seg.read_bytes()
            good, count = 0, 0
            for end, env in _records(seg, data):
                if env is None:
                    break
                if (out and env.header.seq != out[-1].header.seq + 1) or not self._ours(env):
                    raise _unusable(seg, f"the record at byte {good} is not the next message "
                                         f"we signed")
                out.append(env)
                good, count = end, count + 1
            if good < len(data):
                if i != len(segs) - 1:
                    raise _unusable(seg, f"it is cut short at byte {good} and a newer segment "
                                         f"follows it")
                with open(seg, "r+b") as f:  # a torn tail: written, never sent
                    f.truncate(good)
            self._sizes[seg] = (count, good)
        if segs:  # appends go on in the last segment
            self._segment = segs[-1]
            self._fd = os.open(self._segment, os.O_WRONLY | os.O_APPEND)
        return out

    def _ours(self, env: Envelope) -> bool:
        h = env.header
        return h.sender == self.key.key_id and \
            self.key.verify(signed_bytes(h.raw), env.signature) and \
            h.body_len == len(env.body) and hashlib.sha256(env.body).digest() == h.body_sha256

    def _segments(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.endswith(SUFFIX) and
                      p.name[:-len(SUFFIX)].isdigit())


def _records(seg: Path, data: bytes) -> Iterator[tuple[int, Envelope | None]]:
    """(end offset, envelope) of each whole record in `data`, segment `seg`'s bytes; (offset,
    None) at a record that is cut short (or zeros to the end), and nothing after it. Raises
    OutboxError for lengths that do not match their CRC-32, or a whole record that does not
    parse."""
    pos, view = 0, memoryview(data)
    while pos < len(data):
        if pos + _PREFIX.size > len(data):
            yield pos, None
            return
        lt, lh, lb, crc = _PREFIX.unpack_from(data, pos)
        if zlib.crc32(view[pos:pos + _LENGTHS.size]) != crc:  # lengths we cannot trust
            if data.count(0, pos) == len(data) - pos:  # zeros a power loss left at the end
                yield pos, None
                return
            raise _unusable(seg, f"the lengths of the record at byte {pos} do not match their "
                                 f"CRC-32")
        start = pos + _PREFIX.size
        end = start + lt + lh + SIG_LEN + lb
        if end > len(data):  # a write cut short (its lengths are whole): never sent
            yield pos, None
            return
        try:
            topic = bytes(view[start:start + lt]).decode()
            header = parse_header(bytes(view[start + lt:start + lt + lh]))
        except (UnicodeDecodeError, RejectedMessage):
            raise _unusable(seg, f"the record at byte {pos} does not parse") from None
        sig = bytes(view[start + lt + lh:start + lt + lh + SIG_LEN])
        yield end, Envelope(topic, header, sig, bytes(view[end - lb:end]))
        pos = end


def _unusable(seg: Path, why: str) -> OutboxError:
    """The error for a segment our chain cannot be taken up from, and what to do."""
    return OutboxError(f"{seg}: {why}: our chain cannot be taken up from it (move {seg.parent} "
                       f"away to go on from the notary's tip; a receiver may then show a "
                       f"conflict that stops the run)")


def _write_all(fd: int, parts: list, size: int) -> None:
    """`writev` every byte of `parts` (a regular file may take fewer in one call)."""
    done = os.writev(fd, parts)
    if done == size:
        return
    rest = b"".join(bytes(p) for p in parts)[done:]
    while rest:
        rest = rest[os.write(fd, rest):]
