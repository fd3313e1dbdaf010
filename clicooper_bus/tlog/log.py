"""The provenance log: an append-only, tamper-evident record of every message of a run.

Directory layout (all files append-only except `log.json`, written once at creation):

    log.json          format, origin, run id, retention policy
    roster.msgpack    the owner's signed roster: the keys every leaf is verified against
    leaves.dat        records; each payload is a leaf, the exact `header || signature` bytes
    bodies.dat        records; each payload is `sha256(body) || body`: the content-addressed
                      body store (a body is stored once however often it is sent)
    checkpoints.dat   records; each payload is a signed C2SP checkpoint note
    LOCK              held (flock) by the one process that appends

The Merkle tree (RFC 6962) is over the leaves and is rebuilt in memory on open; it is derived
state and never stored. Opening for append cuts a torn tail back to the last whole record
(see `records.py`), then refuses a log that lost entries a signed checkpoint covered.

Fsync policies: `checkpoint` (default: every file is fsynced before a checkpoint is signed, so a
signed checkpoint never covers data a power loss can take away), `always` (after every append),
`never` (left to the OS). Every append is one write system call in all policies, so a crashed
process loses nothing it appended.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import structlog

from clicooper_bus.errors import ConfigError, LogCorrupted, LogError, LogFull, NoteError
from clicooper_bus.layout import write_atomic
from clicooper_bus.net.identity import Identity, check_name
from clicooper_bus.net.wire import (
    DEFAULT_LIMITS,
    SIG_LEN,
    Envelope,
    Header,
    Limits,
    parse_header,
    split_leaf,
)
from clicooper_bus.tlog.checkpoint import Checkpoint, parse_checkpoint
from clicooper_bus.tlog.merkle import MerkleTree
from clicooper_bus.tlog.note import parse_note
from clicooper_bus.tlog.records import RecordFile
from clicooper_bus.tlog.retention import Retention, RetentionTracker

FORMAT = "clicooper-log/1"
FsyncPolicy = Literal["always", "checkpoint", "never"]
FSYNC_POLICIES = ("always", "checkpoint", "never")

META_EXTENSION = "clicooper-meta"
PREV_EXTENSION = "clicooper-prev"
MAX_NOTE_RECORD = 1 << 16

log = structlog.get_logger("clicooper.log")
FULL = (errno.ENOSPC, errno.EDQUOT)  # the disk or the quota is full
RECORD_OVERHEAD = 8  # a record's length and checksum (records.PREFIX)


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def default_origin(run_id: str) -> str:
    return f"clicooper.bus/run/{run_id}"


def meta_digest(log_json: bytes, roster: bytes) -> bytes:
    """Commits a checkpoint to the log's metadata and roster files (an extension line), so that
    editing either is caught by checkpoint verification."""
    return hashlib.sha256(b"clicooper/v1/log-meta\n" + hashlib.sha256(log_json).digest()
                          + hashlib.sha256(roster).digest()).digest()


def meta_line(digest: bytes) -> str:
    return f"{META_EXTENSION} {base64.b64encode(digest).decode()}"


def prev_line(previous_note: str | None) -> str:
    """Chains each checkpoint to the one before it, so that removing or reordering stored
    checkpoints is caught. The first checkpoint chains to 32 zero bytes."""
    digest = hashlib.sha256(previous_note.encode()).digest() if previous_note else bytes(32)
    return f"{PREV_EXTENSION} {base64.b64encode(digest).decode()}"


class ExpectedBodies:
    """Which bodies a log must hold, replayed from its leaves: first-retained order."""

    def __init__(self, retention: Retention):
        self.tracker = RetentionTracker(retention)
        self.shas: list[bytes] = []
        self.first_needed: list[int] = []  # leaf index that first needed each of `shas`
        self._seen: set[bytes] = set()

    def add(self, header: Header, index: int = -1) -> bool:
        """Record one header in log order; True if its body must be in the store."""
        if not self.tracker.keep(header) or header.body_len == 0:
            return False
        if header.body_sha256 not in self._seen:
            self._seen.add(header.body_sha256)
            self.shas.append(header.body_sha256)
            self.first_needed.append(index)
        return True


class ProvenanceLog:
    """Open with `create` or `open`; append leaves and bodies, sign checkpoints, prove."""

    def __init__(self, directory: Path, *, writable: bool, fsync: FsyncPolicy,
                 signer: Identity | None):
        if fsync not in FSYNC_POLICIES:
            raise LogError(f"fsync policy {fsync!r} is not one of {FSYNC_POLICIES}")
        self.dir = directory
        self.writable = writable
        self.fsync: FsyncPolicy = fsync
        self.signer = signer
        self._lock_fd = -1
        self._read_meta()
        if writable:
            self._lock()
        self.limits = Limits(max_header=self._meta["limits"]["max_header"],
                             max_body=self._meta["limits"]["max_body"])
        self.leaves = RecordFile(directory / "leaves.dat", self.limits.max_header + SIG_LEN,
                                 writable=writable)
        self.bodies = RecordFile(directory / "bodies.dat", 32 + self.limits.max_body,
                                 writable=writable)
        self.notes = RecordFile(directory / "checkpoints.dat", MAX_NOTE_RECORD, writable=writable)
        # torn tails found on open (in read-only mode left in place, else cut below)
        self.torn = [f"{rf.path.name}: {rf.tail.reason} at byte {rf.tail.offset}"
                     for rf in (self.leaves, self.bodies, self.notes) if rf.tail is not None]
        self._build_tree()
        self._body_index = {self.bodies.read(i, 32): i for i in range(len(self.bodies))}
        self._expected: ExpectedBodies | None = None
        self._broken: BaseException | None = None
        if writable:  # refuse to extend a broken log; readers leave the diagnosis to verify
            self._check_checkpoint_coverage()  # on the whole records, before any cut
            for rf in (self.leaves, self.bodies, self.notes):
                if rf.tail is not None:
                    tail = rf.tail
                    rf.cut_tail()
                    log.warning("torn tail cut", file=str(rf.path), offset=tail.offset,
                                reason=tail.reason, kept=str(rf.kept))
            self._expected = self._replay_retention()

    def _read_meta(self) -> None:
        d = self.dir
        try:
            self.meta_bytes = (d / "log.json").read_bytes()
            self.roster_bytes = (d / "roster.msgpack").read_bytes()
        except FileNotFoundError as exc:
            raise LogError(f"{d} is not a provenance log ({exc.filename} is missing)") from None
        except OSError as exc:
            raise LogCorrupted(f"{d}: cannot read {exc.filename}: {exc.strerror}") from None
        try:
            meta = json.loads(self.meta_bytes)
            if type(meta) is not dict or meta.get("format") != FORMAT:
                raise ValueError(f"format is not {FORMAT!r}")
            for key, typ in (("origin", str), ("run_id", str), ("retention", str),
                             ("limits", dict)):
                if type(meta.get(key)) is not typ:
                    raise ValueError(f"{key} is missing or not a {typ.__name__}")
            if not all(type(meta["limits"].get(k)) is int and meta["limits"][k] > 0
                       for k in ("max_header", "max_body")):
                raise ValueError("limits need positive max_header and max_body")
            self.retention = Retention.parse(meta["retention"])
        except (ValueError, ConfigError) as exc:
            raise LogCorrupted(f"{d}/log.json is unreadable: {exc}",
                               path=str(d / "log.json")) from None
        self._meta = meta
        self.origin: str = meta["origin"]
        self.run_id: str = meta["run_id"]

    def _build_tree(self) -> None:
        self.tree = MerkleTree()
        for i in range(len(self.leaves)):
            self.tree.append(self.leaves.read(i))

    @property
    def meta_digest(self) -> bytes:
        return meta_digest(self.meta_bytes, self.roster_bytes)

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | os.PathLike[str], *, roster_bytes: bytes, run_id: str,
               origin: str | None = None, retention: str = "all",
               fsync: FsyncPolicy = "checkpoint", signer: Identity | None = None,
               limits: Limits = DEFAULT_LIMITS) -> ProvenanceLog:
        """Create a new, empty log in `directory` (which must not hold a log already)."""
        d = Path(directory)
        check_name(run_id, "run id")
        Retention.parse(retention)
        if (d / "log.json").exists():
            raise LogError(f"{d} already holds a log; open it instead of creating it")
        d.mkdir(parents=True, exist_ok=True)
        for name in ("leaves.dat", "bodies.dat", "checkpoints.dat"):
            (d / name).touch()
        write_atomic(d / "roster.msgpack", roster_bytes)
        meta = {"format": FORMAT, "origin": origin or default_origin(run_id), "run_id": run_id,
                "retention": retention,
                "limits": {"max_header": limits.max_header, "max_body": limits.max_body}}
        # written last: its presence marks a log. write_atomic fsyncs the directory, which
        # makes the files touched above durable too
        write_atomic(d / "log.json", (json.dumps(meta, indent=2) + "\n").encode())
        return cls(d, writable=True, fsync=fsync, signer=signer)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], *, writable: bool = False,
             fsync: FsyncPolicy = "checkpoint", signer: Identity | None = None) -> ProvenanceLog:
        """Open an existing log. Read-only opens never change a byte; writable opens take the
        lock and cut back a torn tail."""
        return cls(Path(directory), writable=writable, fsync=fsync, signer=signer)

    def _lock(self) -> None:
        self._lock_fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise LogError(f"log {self.dir} is open for appending by another process") from None

    def _replay_retention(self) -> ExpectedBodies:
        """Rebuild the retention state and reconcile the body store with the leaves.

        Bodies are written before their leaves, so bodies past the last one a leaf references
        are orphans of a crash between the two writes: they are cut, like a torn tail. After a
        power loss without fsync the opposite can happen, leaves whose bodies never reached the
        disk: such leaves are cut too, unless a signed checkpoint covers them.
        """
        expected = ExpectedBodies(self.retention)
        for i in range(self.size):
            expected.add(parse_header(split_leaf(self.leaf(i))[0]), i)
        want, n_have = expected.shas, len(self.bodies)
        for i in range(min(len(want), n_have)):
            if self.bodies.read(i, 32) != want[i]:
                raise LogCorrupted(f"{self.bodies.path.name} record {i} is not the body the "
                                   f"leaves retain there; verify the log to find where",
                                   path=str(self.bodies.path), index=i)
        if len(want) > n_have:
            first = expected.first_needed[n_have]
            covered = self.checkpoint_at(len(self.notes) - 1).size if len(self.notes) else 0
            if first < covered:
                raise LogCorrupted(f"the body of entry {first}, covered by a signed checkpoint, "
                                   f"is missing from {self.bodies.path.name}",
                                   path=str(self.bodies.path), index=n_have)
            log.warning("entries whose bodies were lost are cut", file=str(self.leaves.path),
                        first=first, count=self.size - first)
            self.leaves.truncate(first)
            self._build_tree()
            return self._replay_retention()
        if n_have > len(want):
            log.warning("orphan bodies cut", file=str(self.bodies.path), count=n_have - len(want))
            self.bodies.truncate(len(want))
            self._body_index = {sha: i for i, sha in enumerate(want)}
        return expected

    def _check_checkpoint_coverage(self) -> None:
        if not len(self.notes):
            return
        try:
            cp = self.checkpoint_at(len(self.notes) - 1)
        except NoteError as exc:
            raise LogCorrupted(f"latest checkpoint is unreadable: {exc}",
                               path=str(self.notes.path), index=len(self.notes) - 1) from None
        if cp.size > self.size:
            raise LogCorrupted(
                f"log holds {self.size} entries but checkpoint {len(self.notes) - 1} signed "
                f"{cp.size}: entries covered by a signed checkpoint are missing",
                path=str(self.leaves.path), index=self.size)
        if cp.root != self.tree.root(cp.size):
            raise LogCorrupted(
                f"the leaves do not hash to the root of checkpoint {len(self.notes) - 1} "
                f"(size {cp.size}): entries were changed; verify the log to find where",
                path=str(self.leaves.path))

    # --- writing -------------------------------------------------------------------------

    def append(self, header: Header, signature: bytes, body: bytes | memoryview) -> int:
        """Append one verified message; keeps its body if the retention policy says so.

        The body goes to disk before the leaf, so a crash between the two leaves an orphan
        body, never a leaf whose retained body is missing. A failed write is cut back (its body
        too) and stops the writer (LogError on the next append; reopen to continue). Raises
        LogFull (naming the directory and the bytes needed) when the disk or quota is full.
        """
        if not self.writable or self._expected is None:
            raise LogError(f"log {self.dir} was opened read-only")
        if self._broken is not None:
            raise LogError(f"an earlier append to {self.dir} failed ({self._broken!r}); reopen "
                           f"the log to continue from what is on disk")
        if len(body) != header.body_len:
            raise ValueError("body does not match its header: verify messages before logging")
        bodies_before, leaf, landed = len(self.bodies), header.raw + signature, False
        try:
            if self._expected.add(header, self.size) and \
                    header.body_sha256 not in self._body_index:
                self._body_index[header.body_sha256] = self.bodies.append(
                    header.body_sha256 + bytes(body))
                if self.fsync == "always":
                    self.bodies.sync()
            index = self.leaves.append(leaf)
            landed = True
            self.tree.append(leaf)
            if self.fsync == "always":
                self.leaves.sync()
        except BaseException as exc:
            self._broken = exc  # in-memory state may be ahead of the disk: stop here
            if not landed:
                # the leaf did not land: a body written for it alone would be an orphan that
                # fails verification until a writable open cuts it, so cut it now
                self.bodies.truncate(bodies_before)
            if isinstance(exc, OSError) and exc.errno in FULL:
                needed = 2 * RECORD_OVERHEAD + len(leaf) + 32 + len(body)
                raise LogFull(path=str(self.dir), needed=needed, free=_free_bytes(self.dir),
                              entries=self.size) from exc
            raise
        return index

    def append_envelope(self, env: Envelope) -> int:
        return self.append(env.header, env.signature, env.body)

    def sign_checkpoint(self) -> str:
        """Sign and store a checkpoint of the current tree; returns the note's text. Raises
        LogFull when the disk or quota is full (on the fsync or the note's write)."""
        if not self.writable or self.signer is None:
            raise LogError(f"log {self.dir} has no signing key: open it with signer=")
        note = ""
        try:
            if self.fsync != "never":
                for rf in (self.bodies, self.leaves):
                    rf.sync()
            if len(self.notes) and self.checkpoint_at(len(self.notes) - 1).size == self.size:
                return self.latest_note() or ""  # nothing new to sign
            cp = Checkpoint(self.origin, self.size, self.tree.root(),
                            (meta_line(self.meta_digest), prev_line(self.latest_note())))
            note = cp.sign(self.signer)
            self.notes.append(note.encode())  # a failed write is cut back by the record file
            if self.fsync != "never":
                self.notes.sync()
        except OSError as exc:
            if exc.errno in FULL:  # a note that did not land was cut: the earlier ones verify
                needed = RECORD_OVERHEAD + (len(note.encode()) if note else 1024)  # ~ a note
                raise LogFull(path=str(self.dir), needed=needed, free=_free_bytes(self.dir),
                              entries=self.size) from exc
            raise
        return note

    # --- reading -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.tree.size

    def leaf(self, index: int) -> bytes:
        return self.leaves.read(index)

    def leaf_hash(self, index: int) -> bytes:
        return self.tree.leaf_hash_at(index)

    def body(self, sha256: bytes) -> bytes | None:
        """A retained body by its hash, checked against the hash; None if not retained."""
        i = self._body_index.get(sha256)
        if i is None:
            return None
        data = memoryview(self.bodies.read(i))[32:]
        if hashlib.sha256(data).digest() != sha256:
            raise LogCorrupted(f"body {sha256.hex()} in bodies.dat does not match its hash",
                               path=str(self.bodies.path), index=i)
        return data

    def entry(self, index: int) -> tuple[Header, bytes, bytes | memoryview | None]:
        """Entry `index` as it was received: its parsed header, signature and body (b"" for an
        empty body, None when the retention policy did not keep it)."""
        raw, sig = split_leaf(self.leaf(index))
        h = parse_header(raw, self.limits)
        return h, sig, (b"" if h.body_len == 0 else self.body(h.body_sha256))

    def header(self, index: int) -> Header:
        """Entry `index`'s parsed header alone (its body is neither read nor hashed)."""
        return parse_header(split_leaf(self.leaf(index))[0], self.limits)

    def has_body(self, sha256: bytes) -> bool:
        return sha256 in self._body_index

    def body_records(self) -> int:
        return len(self.bodies)

    def note(self, index: int) -> str:
        try:
            return self.notes.read(index).decode()
        except UnicodeDecodeError:
            raise NoteError(f"checkpoint {index} is not UTF-8") from None

    def checkpoint_at(self, index: int) -> Checkpoint:
        """The checkpoint body of stored note `index`, parsed but NOT signature-checked."""
        text, _ = parse_note(self.note(index))
        return parse_checkpoint(text)

    @property
    def checkpoint_count(self) -> int:
        return len(self.notes)

    def latest_note(self) -> str | None:
        return self.note(len(self.notes) - 1) if len(self.notes) else None

    def close(self) -> None:
        for rf in (self.leaves, self.bodies, self.notes):
            rf.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> ProvenanceLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


