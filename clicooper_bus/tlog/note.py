"""C2SP signed notes: a text, a blank line, then `— <name> <base64(keyid || signature)>` lines.

Ed25519 signatures cover the text bytes exactly. The verifier is strict about the framing (so
two readers cannot disagree about what was signed), ignores signatures by keys it does not know
(the format allows co-signing), and fails if a known key's signature is bad or none verifies.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from clicooper_bus.errors import NoteError
from clicooper_bus.net.identity import Identity, PublicIdentity, key_id

DASH = "\u2014"  # the em dash that starts every signature line
MAX_NOTE = 1 << 20


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_id: bytes
    signature: bytes


def sign_note(text: str, signer: Identity) -> str:
    """Sign `text` (which must end with a newline) and return the whole note."""
    _check_text(text)
    sig = signer.sign(text.encode())
    kid = key_id(signer.name, signer.public.public_key)
    return f"{text}\n{DASH} {signer.name} {base64.b64encode(kid + sig).decode()}\n"


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise NoteError("note text contains control characters")
    if "\n\n" in text:
        raise NoteError("note text must not contain a blank line")


def parse_note(note: str) -> tuple[str, list[NoteSignature]]:
    """Split a note into its text and signature lines; raises `NoteError` on bad framing."""
    if len(note) > MAX_NOTE:
        raise NoteError(f"note longer than {MAX_NOTE} characters")
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = note[:split + 1], note[split + 2:]
    _check_text(text)
    if not block.endswith("\n"):
        raise NoteError("note signatures must end with a newline")
    sigs = []
    for line in block[:-1].split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH or not parts[1]:
            raise NoteError(f"malformed signature line {line!r}")
        try:
            raw = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            raise NoteError(f"signature of '{parts[1]}' is not valid base64") from None
        if len(raw) < 5:
            raise NoteError(f"signature of '{parts[1]}' is too short")
        sigs.append(NoteSignature(parts[1], raw[:4], raw[4:]))
    return text, sigs


def open_note(note: str, verifiers: Iterable[PublicIdentity]) -> tuple[str, list[str]]:
    """Verify `note` against `verifiers`; returns (text, names of the keys that signed it)."""
    text, sigs = parse_note(note)
    known = {(v.name, key_id(v.name, v.public_key)): v for v in verifiers}
    signed_by = []
    for s in sigs:
        v = known.get((s.name, s.key_id))
        if v is None:
            continue
        if not v.verify(text.encode(), s.signature):
            raise NoteError(f"signature of '{s.name}' does not verify")
        signed_by.append(s.name)
    if not signed_by:
        names = ", ".join(sorted({n for n, _ in known})) or "none given"
        raise NoteError(f"note is not signed by any known key ({names})")
    return text, signed_by
