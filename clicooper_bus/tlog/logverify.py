"""Verify a whole provenance log: what `clicooper log verify` and the auditor run first.

Order of checks (the first failure is reported with its entry index and reason):
files parse (no corruption, no torn tail) -> the roster is signed by its owner (pinned, if a key
is given) -> every leaf: header, signature by a roster key, run id, per-sender seq/prev chain ->
every body record hashes to its name, and the body store is exactly the retained bodies in
order -> every checkpoint is signed by the roster's notary for this origin, commits to this
log's metadata, matches the tree at its size, and is consistent with the one before it.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from clicooper_bus.errors import (
    ClicooperError,
    LogCorrupted,
    RejectedMessage,
)
from clicooper_bus.net import codec
from clicooper_bus.net.equivocation import Equivocation, proven
from clicooper_bus.net.identity import PublicIdentity
from clicooper_bus.net.roster import Roster
from clicooper_bus.net.verifier import Verifier
from clicooper_bus.net.wire import Header
from clicooper_bus.tlog.checkpoint import Checkpoint, open_checkpoint
from clicooper_bus.tlog.log import ExpectedBodies, ProvenanceLog, meta_line, prev_line
from clicooper_bus.tlog.merkle import verify_consistency


@dataclass
class Failure:
    reason: str
    file: str = ""
    index: int | None = None  # entry (leaf) index, or record index in `file`


@dataclass
class VerifyResult:
    log: str
    ok: bool = False
    run_id: str = ""
    origin: str = ""
    entries: int = 0
    body_records: int = 0
    body_bytes: int = 0
    checkpoints: int = 0
    tree_size: int = 0
    root: str = ""
    owner: str = ""
    notary: str = ""
    per_sender: dict[str, int] = field(default_factory=dict)
    per_kind: dict[str, int] = field(default_factory=dict)
    uncovered: int = 0  # entries after the latest checkpoint
    warnings: list[str] = field(default_factory=list)
    # what each of the notary's equivocation proofs in the log proves (`net.equivocation`): the
    # log is whole, but the member named signed two messages at one place of its chain
    equivocations: list[str] = field(default_factory=list)
    failure: Failure | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Fail(Exception):
    def __init__(self, failure: Failure):
        self.failure = failure


Progress = Callable[[str, int, int], None]


def verify_log(directory: str | os.PathLike[str], *, owner: PublicIdentity | None = None,
               witnessed: Sequence[str] = (), progress: Progress | None = None) -> VerifyResult:
    """Verify the log in `directory`; never raises for a bad log, returns the verdict.

    `witnessed` are signed checkpoint notes obtained elsewhere (a participant keeps the last
    one it saw): the log must contain the tree each one signs. Only such a witness can show
    that the log's tail, latest checkpoint included, was not cut off.
    """
    result = VerifyResult(log=str(directory))
    try:
        with ProvenanceLog.open(directory) as plog:
            _verify(plog, result, owner, witnessed, progress or (lambda *_: None))
        result.ok = True
    except _Fail as exc:
        result.failure = exc.failure
    except LogCorrupted as exc:
        result.failure = Failure(str(exc), os.path.basename(exc.path),
                                 exc.index if exc.index >= 0 else None)
    except ClicooperError as exc:
        result.failure = Failure(str(exc))
    except OSError as exc:
        result.failure = Failure(f"cannot read the log: {exc}", os.path.basename(exc.filename or ""))
    except Exception as exc:  # a verdict, never a traceback, whatever the files hold
        result.failure = Failure(f"unreadable log ({type(exc).__name__}: {exc})")
    return result


def _verify(plog: ProvenanceLog, r: VerifyResult, owner: PublicIdentity | None,
            witnessed: Sequence[str], progress: Progress) -> None:
    r.run_id, r.origin, r.tree_size = plog.run_id, plog.origin, plog.size
    if plog.torn:
        covered = plog.checkpoint_at(plog.checkpoint_count - 1).size \
            if plog.checkpoint_count and not plog.notes.tail else 0
        advice = (f"a signed checkpoint covers {covered} entries, more than the whole records: "
                  f"this is damage, not an interrupted write" if covered > plog.size else
                  f"if the writer crashed, run `clicooper log repair {plog.dir}` to cut it back")
        raise _Fail(Failure(f"torn tail: {'; '.join(plog.torn)}; {advice}",
                            plog.torn[0].split(":", 1)[0]))
    try:
        roster = Roster.open(plog.roster_bytes, owner=owner)
    except ClicooperError as exc:
        raise _Fail(Failure(str(exc), "roster.msgpack")) from None
    if roster.run_id != plog.run_id:
        raise _Fail(Failure(f"roster is for run {roster.run_id!r}, log.json says {plog.run_id!r}",
                            "roster.msgpack"))
    r.owner = roster.owner.identity.vkey
    if owner is None:
        r.warnings.append("owner key not pinned (--owner-key): the roster is only checked to be "
                          "self-consistent")
    retained = _verify_leaves(plog, r, roster, progress)
    _verify_checkpoints(plog, r, roster, witnessed)
    _verify_bodies(plog, r, retained, progress)


def _verify_leaves(plog: ProvenanceLog, r: VerifyResult, roster: Roster,
                   progress: Progress) -> list[bytes]:
    """Check every leaf; returns the hashes of the bodies they retain, in store order."""
    verifier = Verifier(roster, plog.run_id, limits=plog.limits)
    expected = ExpectedBodies(plog.retention)
    senders, kinds = Counter(), Counter()
    names = {m.key_id: m.name for m in roster.members}
    for i in range(plog.size):
        try:
            h = verifier.verify_leaf(plog.leaf(i))
        except RejectedMessage as exc:
            raise _Fail(Failure(str(exc), "leaves.dat", i)) from None
        if expected.add(h) and not plog.has_body(h.body_sha256):
            raise _Fail(Failure(f"retained body {h.body_sha256.hex()} of this {h.kind} message "
                                f"is missing from bodies.dat", "leaves.dat", i))
        senders[names[h.sender]] += 1
        kinds[h.kind] += 1
        if h.kind == "equivocation":
            _check_equivocation(plog, r, roster, h, i)
        if i % 10000 == 0:
            progress("leaves", i, plog.size)
    r.entries, r.per_sender, r.per_kind = plog.size, dict(senders), dict(kinds)
    return expected.shas


def _check_equivocation(plog: ProvenanceLog, r: VerifyResult, roster: Roster, h: Header,
                        i: int) -> None:
    """Entry `i`, a proof of equivocation: only the notary's counts, and it must prove what it
    says (a notary accusing a member falsely fails the log)."""
    if roster.notary is None or h.sender != roster.notary.key_id:
        # a member may send any kind (the broker does not judge them): one posing as the
        # notary's proof is its own bogus message, as its forged checkpoints are, not damage
        who = next((m.name for m in roster.members if m.key_id == h.sender), h.sender)
        r.warnings.append(f"entry {i} is an equivocation document from {who}, not the "
                          f"notary: not a proof, ignored")
        return
    body = plog.body(h.body_sha256)
    if body is None:
        r.warnings.append(f"entry {i} is an equivocation proof whose body the log did not keep: "
                          f"it cannot be checked ([log] retention)")
        return
    try:
        ev = Equivocation.parse(codec.unpack(bytes(body)), sender=roster.notary.name)
        _, what = proven(ev, roster, sender=roster.notary.name)
    except ClicooperError as exc:
        raise _Fail(Failure(str(exc), "leaves.dat", i)) from None
    r.equivocations.append(f"entry {i}: {what}")


def _verify_bodies(plog: ProvenanceLog, r: VerifyResult, want: list[bytes],
                   progress: Progress) -> None:
    n = plog.body_records()
    for i in range(n):
        record = plog.bodies.read(i)
        name, body = record[:32], memoryview(record)[32:]
        if hashlib.sha256(body).digest() != name:
            raise _Fail(Failure("body does not match its hash", "bodies.dat", i))
        if i >= len(want) or want[i] != name:
            raise _Fail(Failure("body store is not the retained bodies in log order (a body was "
                                "added, removed, duplicated or moved)", "bodies.dat", i))
        r.body_bytes += len(body)
        if i % 1000 == 0:
            progress("bodies", i, n)
    if n != len(want):
        raise _Fail(Failure(f"body store holds {n} bodies, the leaves retain {len(want)}",
                            "bodies.dat", n))
    r.body_records = n


def _verify_checkpoints(plog: ProvenanceLog, r: VerifyResult, roster: Roster,
                        witnessed: Sequence[str]) -> None:
    n = plog.checkpoint_count
    r.root = plog.tree.root().hex()
    if (n or witnessed) and roster.notary is None:
        raise _Fail(Failure("the log has checkpoints but the roster names no notary to have "
                            "signed them", "checkpoints.dat", 0))
    r.notary = roster.notary.identity.vkey if roster.notary else ""
    prev, prev_note = None, None
    for i in range(n):
        note = plog.note(i)
        cp = _check_one(plog, roster, note, f"checkpoint {i}", "checkpoints.dat", i)
        if meta_line(plog.meta_digest) not in cp.extensions:
            raise _Fail(Failure("checkpoint does not commit to this log's log.json and roster "
                                "(one of them was changed)", "checkpoints.dat", i))
        if prev_line(prev_note) not in cp.extensions:
            raise _Fail(Failure("checkpoint does not chain to the stored checkpoint before it "
                                "(a checkpoint was removed, added or moved)", "checkpoints.dat",
                                i))
        if prev is not None:
            if cp.size <= prev.size:
                raise _Fail(Failure(f"checkpoint size {cp.size} does not grow past the previous "
                                    f"{prev.size}", "checkpoints.dat", i))
            try:
                verify_consistency(prev.size, cp.size, prev.root, cp.root,
                                   plog.tree.consistency_proof(prev.size, cp.size))
            except ClicooperError as exc:
                raise _Fail(Failure(f"not consistent with checkpoint {i - 1}: {exc}",
                                    "checkpoints.dat", i)) from None
        prev, prev_note = cp, note
    for j, note in enumerate(witnessed):
        _check_one(plog, roster, note, f"witnessed checkpoint {j}", "", None)
    r.checkpoints = n
    r.uncovered = plog.size - (prev.size if prev else 0)
    if n == 0:
        r.warnings.append("the log has no signed checkpoint: nothing protects it against "
                          "truncation or a rewrite with the same keys")
    elif r.uncovered:
        r.warnings.append(f"{r.uncovered} entries after the latest checkpoint are not covered "
                          f"by a signature")
    if not witnessed:
        r.warnings.append("no witnessed checkpoint given (--checkpoint): a log cut back to an "
                          "earlier checkpoint would still verify")


def _check_one(plog: ProvenanceLog, roster: Roster, note: str, what: str, file: str,
               index: int | None) -> Checkpoint:
    """A signed checkpoint of this log whose tree the log contains."""
    try:
        cp = open_checkpoint(note, roster.notary.identity, plog.origin)
    except ClicooperError as exc:
        raise _Fail(Failure(f"{what}: {exc}", file, index)) from None
    if cp.size > plog.size:
        raise _Fail(Failure(f"{what} signs {cp.size} entries, the log holds {plog.size}: "
                            f"entries were removed", file, index))
    if cp.root != plog.tree.root(cp.size):
        raise _Fail(Failure(f"{what}: the leaves do not hash to its signed root at size "
                            f"{cp.size}", file, index))
    return cp
