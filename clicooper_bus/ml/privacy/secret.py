"""The owner's privacy secret: 32 random bytes in `<keys>/<owner>.secret`, mode 0600.

It keys every PRF the owner's defences use (which pseudo-class a sample gets, the permutation
that hides the grouping, the noise of each release). It never leaves the key directory: it is
not in the roster, the config, any message or the log, so trainers and the log's readers cannot
undo the obfuscation or subtract the noise.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from clicooper_bus.errors import KeyFileError

SIZE = 32


def secret_path(keys: str | os.PathLike[str], owner: str) -> Path:
    return Path(keys) / f"{owner}.secret"


def load_or_create(keys: str | os.PathLike[str], owner: str) -> bytes:
    """Read the owner's secret, creating it (0600, never widened) on first use."""
    path = secret_path(keys, owner)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load(path)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_bytes(SIZE).hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return load(path)


def load(path: Path, remedy: str = "remove it to make a new one (runs made with the old one can "
                                   "no longer be decoded)") -> bytes:
    """The 32-byte secret in the hex file at `path` (owner-only, mode 0600). Raises KeyFileError
    for one readable by group or others, or not a 32-byte hex secret (saying `remedy`), and
    OSError as the file system does."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"the owner-only secret {path} is readable by group or others: run "
                           f"`chmod 600 {path}`")
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raw = b""
    if len(raw) != SIZE:
        raise KeyFileError(f"{path} does not hold a {SIZE}-byte hex secret; {remedy}")
    return raw


def run_key(secret: bytes, run_id: str) -> bytes:
    """The key of one run: the secret with the run id and a fresh random nonce, held in the
    owner's memory only. No two runs share noise or pseudo-label assignments, so a trainer
    taking part in two runs (a sweep, a rerun with the same seed) cannot subtract one run's
    noise from the other's releases or line up their pseudo-labels."""
    nonce = secrets.token_bytes(16)
    return hmac.new(secret, b"clicooper/run/" + run_id.encode() + b"/" + nonce,
                    hashlib.sha256).digest()


def prf(secret: bytes, label: bytes, *parts: int) -> bytes:
    """HMAC-SHA256 of a domain label and integers: the one keyed PRF the defences use."""
    msg = b"clicooper/" + label + b"".join(p.to_bytes(8, "big", signed=True) for p in parts)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def prf_int(secret: bytes, label: bytes, *parts: int) -> int:
    return int.from_bytes(prf(secret, label, *parts)[:8], "big")
