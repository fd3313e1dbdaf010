"""Append-only files of length-prefixed, checksummed records.

A record is `u32 length || u32 crc32(payload) || payload` (big-endian). Records are written
with one `writev` each, so a crashed process leaves at most one torn record at the end; what the
OS may lose on power failure is bounded by the caller's fsync policy.

Scanning tells a torn tail (the last record incomplete, or complete but failing its checksum
with nothing after it, or a tail of zero bytes) from corruption (a bad record with more data
after it). A damaged length prefix in the middle of a file can look like an incomplete last
record, so a tail only counts as torn when no whole record starts anywhere inside it. Only a
torn tail may be cut back; the bytes cut are kept in `torn/` beside the file, and nothing
before them is ever rewritten.
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

PREFIX = struct.Struct(">II")


@dataclass(frozen=True)
class Tail:
    """Bytes after the last whole record: where they start and why they are not a record."""

    offset: int
    reason: str
    cuttable: bool


@dataclass
class Scan:
    offsets: array  # payload offset of each whole record (the prefix sits 8 bytes before)
    lengths: array
    end: int  # end of the last whole record
    tail: Tail | None


def scan(path: Path, max_len: int) -> Scan:
    """Index the whole records of `path` and describe whatever follows them."""
    offsets, lengths = array("Q"), array("Q")
    size = path.stat().st_size
    if size == 0:
        return Scan(offsets, lengths, 0, None)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        off, tail = 0, None
        while off < size:
            if size - off < PREFIX.size:
                tail = Tail(off, "incomplete record prefix", True)
                break
            length, crc = PREFIX.unpack_from(buf, off)
            start, end = off + PREFIX.size, off + PREFIX.size + length
            if length == 0 or length > max_len:
                zeros = not any(buf[off:size])
                tail = Tail(off, f"record length {length} is outside 1..{max_len}", zeros)
                break
            if end > size:
                tail = Tail(off, f"record of {length} bytes runs past the end of the file",
                            not _record_inside(buf, off + 1, size, max_len))
                break
            if zlib.crc32(buf[start:end]) != crc:
                tail = Tail(off, "record checksum mismatch", end == size)
                break
            offsets.append(start)
            lengths.append(length)
            off = end
        return Scan(offsets, lengths, off, tail)


def _record_inside(buf: mmap.mmap, start: int, size: int, max_len: int) -> bool:
    """Whether a whole, checksummed record starts at any offset in buf[start:size]."""
    for p in range(start, size - PREFIX.size):
        length, crc = PREFIX.unpack_from(buf, p)
        if 0 < length <= min(max_len, size - p - PREFIX.size) \
                and zlib.crc32(buf[p + PREFIX.size:p + PREFIX.size + length]) == crc:
            return True
    return False


def _keep_cut_bytes(path: Path, offset: int) -> Path:
    """Copy the bytes about to be cut to torn/NAME.OFFSET, so a cut never destroys anything."""
    keep = path.parent / "torn" / f"{path.name}.{offset}"
    keep.parent.mkdir(exist_ok=True)
    with open(path, "rb") as src:
        src.seek(offset)
        keep.write_bytes(src.read())
    return keep


class RecordFile:
    """One append-only record file: scan on open, cut back a torn tail, append, read."""

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
        self._wfd = -1
        self.kept: Path | None = None
        if writable:
            if self.tail is not None:
                self.kept = _keep_cut_bytes(path, self.end)
                os.truncate(path, self.end)
            self._wfd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, index: int) -> bytes:
        return os.pread(self._rfd, self.lengths[index], self.offsets[index])

    def append(self, payload: bytes | memoryview) -> int:
        """Append one record; returns its index."""
        length = len(payload)
        if not 0 < length <= self.max_len:
            raise ValueError(f"record of {length} bytes is outside 1..{self.max_len}")
        parts = [PREFIX.pack(length, zlib.crc32(payload)), payload]
        total = PREFIX.size + length
        written = os.writev(self._wfd, parts)
        while written < total:  # short writes are rare on files, but possible
            rest = (parts[0] + bytes(parts[1]))[written:]
            written += os.write(self._wfd, rest)
        self.offsets.append(self.end + PREFIX.size)
        self.lengths.append(length)
        self.end += total
        return len(self.offsets) - 1

    def truncate(self, count: int) -> None:
        """Drop every record from `count` on (only for cutting back an unfinished tail)."""
        if count >= len(self.offsets):
            return
        self.end = self.offsets[count] - PREFIX.size
        self.kept = _keep_cut_bytes(self.path, self.end)
        os.truncate(self.path, self.end)
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
