"""Typed errors. Every rejection names the thing that was wrong and, where it helps, what to do.

`RejectedMessage` subclasses carry a short machine code (`code`), the sender's key id when it is
known, and the header field at fault, so that a process can count and log rejections by reason
and keep serving.
"""

from __future__ import annotations


class ClicooperError(Exception):
    """Base of every error this library raises on purpose."""


class ConfigError(ClicooperError):
    """A bad option, path or setting given by the user."""


class KeyFileError(ClicooperError):
    """A key file that is missing, malformed or readable by others."""


class DecodeError(ClicooperError):
    """Bytes that are not the strict msgpack (or text) document expected."""


class RosterError(ClicooperError):
    """A roster that is malformed, unsigned, or signed by the wrong key."""


class ProofError(ClicooperError):
    """A Merkle inclusion or consistency proof that does not verify."""


class NoteError(ClicooperError):
    """A signed note or checkpoint that is malformed or whose signature does not verify."""


class LogError(ClicooperError):
    """A provenance log that cannot be opened or appended to."""


class LogCorrupted(LogError):
    """A log whose files do not parse, outside of a torn tail that can be cut back."""

    def __init__(self, message: str, *, path: str = "", offset: int = -1, index: int = -1):
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.index = index


class RejectedMessage(ClicooperError):
    """A message the verifier refused. Subclasses say why."""

    code = "rejected"

    def __init__(self, message: str, *, sender: str | None = None, field: str | None = None):
        who = f"sender {sender}" if sender else "unknown sender"
        where = f", field '{field}'" if field else ""
        super().__init__(f"{self.code} ({who}{where}): {message}")
        self.sender = sender
        self.field = field
        self.detail = message


class OversizeFrame(RejectedMessage):
    code = "oversize_frame"


class MalformedMessage(RejectedMessage):
    code = "malformed"


class UnknownVersion(RejectedMessage):
    code = "unknown_version"


class UnknownKind(RejectedMessage):
    code = "unknown_kind"


class UnknownKey(RejectedMessage):
    code = "unknown_key"


class BadSignature(RejectedMessage):
    code = "bad_signature"


class WrongRun(RejectedMessage):
    code = "wrong_run"


class TopicMismatch(RejectedMessage):
    code = "topic_mismatch"


class BodyHashMismatch(RejectedMessage):
    code = "body_hash_mismatch"


class BadTensor(RejectedMessage):
    code = "bad_tensor"


class ReplayedSeq(RejectedMessage):
    code = "replayed_seq"


class SeqGap(RejectedMessage):
    code = "seq_gap"


class BrokenChain(RejectedMessage):
    code = "broken_chain"
