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


class LogFull(LogError):
    """The file system holding the log ran out of space (ENOSPC) or quota (EDQUOT) on an append,
    a checkpoint or an fsync. What failed was cut back: the log holds every entry before it and
    verifies. Names the file, the bytes needed and the bytes free."""

    def __init__(self, *, path: str, needed: int, free: int | None, entries: int):
        left = f"{free} bytes free" if free is not None else "free space unknown"
        super().__init__(
            f"no space left for the provenance log: writing {needed} bytes to {path} failed "
            f"({left}); the log is kept and verifiable up to entry {entries}: free space on "
            f"that file system (or give the run another [run] out_dir) and start the run again")
        self.path, self.needed, self.free, self.entries = path, needed, free, entries


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


class PoisonedInput(ClicooperError):
    """A value a roster member sent that its receiver refuses to use: a tensor of another dtype
    or shape than the signed plan implies, or holding NaN or infinity, or a non-finite loss or
    weight. It names the sender, the message kind, the step (None where a message has none) and
    the problem; the receiver stops the run cleanly on it (nothing poisoned is trained on,
    saved or certified)."""

    def __init__(self, *, sender: str, kind: str, step: int | None, problem: str):
        at = f" of step {step}" if step is not None else ""
        super().__init__(f"refused {kind}{at} from {sender}: {problem}")
        self.sender, self.kind, self.step, self.problem = sender, kind, step, problem

    def to_doc(self) -> dict[str, str | int]:
        """The refusal as a map (`End.refused`, `summary.json` `stopped`); no step when None."""
        doc: dict[str, str | int] = {"sender": self.sender, "kind": self.kind,
                                     "problem": self.problem}
        return {**doc, "step": self.step} if self.step is not None else doc
