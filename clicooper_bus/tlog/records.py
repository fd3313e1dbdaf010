"""Append-only files of length-prefixed, checksummed records.

A record is `magic(4) || u32 length || u32 crc32(payload) || u32 crc32(the 12 bytes before) ||
payload` (big-endian). Records are written with one `write` each, so a crashed process leaves at
most one torn record at the end, and a failed write is cut back at once; what the OS may lose on
power failure is bounded by the caller's fsync policy.

Scanning tells a torn tail (the last record incomplete, or complete but failing its checksum
with nothing after it, or a tail of zero bytes) from corruption (a bad record with more data
after it). A damaged length in the middle of a file can look like an incomplete last record,
so a tail only counts as torn when no whole record starts anywhere inside it; the magic and the
prefix checksum make that search run at C speed. Only a torn tail may be cut back; the bytes cut
are kept in `torn/` beside the file, and nothing before them is ever rewritten.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

from clicooper_bus.errors import LogCorrupted

MAGIC = b"\xc1\xc0\x0b\x01"
PREFIX = struct.Struct(">4sIII")  # magic, payload length, crc32(payload), crc32(the 12 before)


def frame(payload: bytes | memoryview) -> bytes:
    """The record for `payload`: its 16-byte prefix followed by the payload."""
    head = struct.pack(">4sII", MAGIC, len(payload), zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + bytes(payload)


@dataclass(frozen=True)
class Tail:
    """Bytes after the last whole record: where they start and why they are not a record."""

    offset: int
    reason: str
    cuttable: bool


@dataclass
class Scan:
    offsets: array  # payload offset of each whole record (the prefix sits before it)
    lengths: array
    end: int  # end of the last whole record
    tail: Tail | None


def _prefix_problem(buf: mmap.mmap, off: int, size: int, max_len: int) -> tuple[str, int]:
    """('', length) for a sound prefix whose payload fits in the file, else (reason, length)."""
    if size - off < PREFIX.size:
        return "incomplete record prefix", 0
    magic, length, _, head_crc = PREFIX.unpack_from(buf, off)
    if magic != MAGIC or zlib.crc32(buf[off:off + 12]) != head_crc:
        return "record prefix damaged", 0
    if not 0 < length <= max_len:
        return f"record length {length} is outside 1..{max_len}", length
    if off + PREFIX.size + length > size:
        return f"record of {length} bytes runs past the end of the file", length
    return "", length


def _whole_record_at(buf: mmap.mmap, off: int, size: int, max_len: int) -> bool:
    problem, length = _prefix_problem(buf, off, size, max_len)
    if problem:
        return False
    start = off + PREFIX.size
    return zlib.crc32(buf[start:start + length]) == PREFIX.unpack_from(buf, off)[2]


def _record_inside(buf: mmap.mmap, start: int, size: int, max_len: int) -> bool:
    """Whether a whole record starts anywhere in buf[start:size]: candidates are found by
    their magic at C speed and rejected by the prefix checksum in O(1)."""
    p = buf.find(MAGIC, start)
    while p != -1:
        if _whole_record_at(buf, p, size, max_len):
            return True
        p = buf.find(MAGIC, p + 1)
    return False


def scan(path: Path, max_len: int) -> Scan:
    """Index the whole records of `path` and describe whatever follows them."""
    offsets, lengths = array("Q"), array("Q")
    size = path.stat().st_size
    if size == 0:
        return Scan(offsets, lengths, 0, None)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        off, tail = 0, None
        while off < size:
            problem, length = _prefix_problem(buf, off, size, max_len)
            start = off + PREFIX.size
            if not problem and zlib.crc32(buf[start:start + length]) != \
                    PREFIX.unpack_from(buf, off)[2]:
                problem = "record checksum mismatch"
            if problem:
                # torn only if nothing whole follows: a damaged prefix mid-file is corruption
                tail = Tail(off, problem, not _record_inside(buf, off + 1, size, max_len))
                break
            offsets.append(start)
            lengths.append(length)
            off = start + length
        return Scan(offsets, lengths, off, tail)


def _keep_cut_bytes(path: Path, offset: int) -> Path:
    """Copy the bytes about to be cut to torn/NAME.OFFSET[.n], durably, so a cut never destroys
    anything."""
    keep_dir = path.parent / "torn"
    keep_dir.mkdir(exist_ok=True)
    keep, n = keep_dir / f"{path.name}.{offset}", 0
    while keep.exists():
        n += 1
        keep = keep_dir / f"{path.name}.{offset}.{n}"
    with open(path, "rb") as src, open(keep, "wb") as dst:
        src.seek(offset)
        while chunk := src.read(1 << 20):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return keep


class RecordFile:
    """One append-only record file: scan on open, append, read; the owner of the file decides
    whether a torn tail may be cut (`cut_tail`), after its own checks."""

    def __init__(self, path: Path, max_len: int, *, writable: bool):
        self.path = path
        self.max_len = max_len
        self.writable = writable
        result = scan(path, max_len)
        self.tail = result.tail
        if self.tail is not None and not self.tail.cuttable:
            raise LogCorrupted(
                f"{path.name}: {self.tail.reason} at byte {self.tail.offset} (record "
                f"{len(result.offsets)}), with more data after it; the file was modified or "
                f"damaged and will not be repaired automatically",
                path=str(path), offset=self.tail.offset, index=len(result.offsets))
        self.offsets, self.lengths, self.end = result.offsets, result.lengths, result.end
        self._rfd = os.open(path, os.O_RDONLY)
        self._wfd = os.open(path, os.O_WRONLY | os.O_APPEND) if writable else -1
        self.kept: Path | None = None

    def cut_tail(self) -> None:
        """Cut a torn tail back to the last whole record, keeping the bytes in torn/."""
        if self.tail is not None and self.writable:
            self._cut(self.end)
            self.tail = None

    def _cut(self, end: int) -> None:
        self.kept = _keep_cut_bytes(self.path, end)
        os.truncate(self.path, end)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, index: int, limit: int | None = None) -> bytes:
        """Payload `index`, or only its first `limit` bytes."""
        n = self.lengths[index] if limit is None else min(limit, self.lengths[index])
        return os.pread(self._rfd, n, self.offsets[index])

    def append(self, payload: bytes | memoryview) -> int:
        """Append one record; returns its index. A failed write is cut back at once, so the
        file never holds a partial record that later appends would bury."""
        if self.tail is not None:
            raise LogCorrupted(f"{self.path.name} has a torn tail; cut it before appending")
        length = len(payload)
        if not 0 < length <= self.max_len:
            raise ValueError(f"record of {length} bytes is outside 1..{self.max_len}")
        data = frame(payload)
        try:
            written = 0
            while written < len(data):  # short writes are rare on files, but possible
                written += os.write(self._wfd, data[written:])
        except BaseException:
            os.truncate(self.path, self.end)
            raise
        self.offsets.append(self.end + PREFIX.size)
        self.lengths.append(length)
        self.end += len(data)
        return len(self.offsets) - 1

    def truncate(self, count: int) -> None:
        """Drop every record from `count` on (only for cutting back an unfinished tail)."""
        if count >= len(self.offsets):
            return
        self.end = self.offsets[count] - PREFIX.size
        self._cut(self.end)
        del self.offsets[count:]
        del self.lengths[count:]

    def sync(self) -> None:
        if self._wfd >= 0:
            os.fsync(self._wfd)

    def close(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1
