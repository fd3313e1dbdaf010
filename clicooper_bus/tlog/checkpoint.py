"""C2SP tlog-checkpoint bodies: origin line, tree size in decimal, base64 root hash.

A checkpoint is published as a signed note (`note.py`) by the log's key. Extension lines after
the root are allowed by the format; the provenance log writes two (`clicooper-meta`,
`clicooper-prev`, see `log.py`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from clicooper_bus.errors import NoteError
from clicooper_bus.net.identity import Identity, PublicIdentity
from clicooper_bus.tlog.note import open_note, sign_note

_SIZE_RE = re.compile(r"^(0|[1-9][0-9]{0,19})$")


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(),
                 *self.extensions]
        return "".join(line + "\n" for line in lines)

    def sign(self, signer: Identity) -> str:
        return sign_note(self.body(), signer)


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint body (the note's text)."""
    if not text.endswith("\n"):
        raise NoteError("checkpoint must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("checkpoint needs origin, size and root lines")
    origin, size, root_b64, *ext = lines
    if not origin:
        raise NoteError("checkpoint origin line is empty")
    if not _SIZE_RE.fullmatch(size):
        raise NoteError(f"checkpoint size {size!r} is not a decimal number")
    try:
        root = base64.b64decode(root_b64, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError("checkpoint root is not valid base64") from None
    if len(root) != 32:
        raise NoteError(f"checkpoint root is {len(root)} bytes, expected 32")
    if any(not line for line in ext):
        raise NoteError("checkpoint has an empty extension line")
    return Checkpoint(origin, int(size), root, tuple(ext))


def open_checkpoint(note: str, log_key: PublicIdentity, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint note by the log's key (and its origin, if given)."""
    text, _ = open_note(note, [log_key])
    cp = parse_checkpoint(text)
    if origin is not None and cp.origin != origin:
        raise NoteError(f"checkpoint origin {cp.origin!r} is not this log's {origin!r}")
    return cp
