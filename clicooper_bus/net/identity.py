"""Ed25519 identities in the C2SP signed-note key formats.

A public key is written as a verifier key, `name+keyidhex+base64(0x01 || pubkey)`, and a private
key as `PRIVATE+KEY+name+keyidhex+base64(0x01 || seed)`, the formats of Go's
`golang.org/x/mod/sumdb/note`, so the keys that sign our checkpoints can be used by other
transparency-log tooling. The key id is the first 4 bytes of `SHA256(name || 0x0A || 0x01 ||
pubkey)`; on the wire it travels as 8 hex digits.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.signing

from clicooper_bus.errors import KeyFileError

ALG_ED25519 = 0x01
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """Names go into topics, file names and signed-note lines: keep them to a safe alphabet."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1 to 64 characters from A-Z a-z 0-9 . _ -,"
            " starting with a letter or digit"
        )
    return name


def key_id(name: str, public_key: bytes) -> bytes:
    """The signed-note key id: first 4 bytes of SHA256(name || 0x0A || 0x01 || pubkey)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


@dataclass(frozen=True)
class PublicIdentity:
    """A named Ed25519 public key."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        check_name(self.name, "key name")
        if len(self.public_key) != 32:
            raise ValueError(f"public key of '{self.name}' must be 32 bytes")

    @property
    def key_id(self) -> str:
        """Key id as 8 lowercase hex digits: how headers and rosters name a sender."""
        return key_id(self.name, self.public_key).hex()

    @property
    def vkey(self) -> str:
        b64 = base64.b64encode(bytes([ALG_ED25519]) + self.public_key).decode()
        return f"{self.name}+{self.key_id}+{b64}"

    @classmethod
    def from_vkey(cls, text: str) -> PublicIdentity:
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise KeyFileError(f"verifier key {text.strip()!r} is not 'name+keyid+base64'")
        name, kid, b64 = parts
        raw = _b64(b64, "verifier key")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise KeyFileError(f"verifier key for '{name}' is not an Ed25519 key")
        try:
            ident = cls(name, raw[1:])
        except ValueError as exc:
            raise KeyFileError(str(exc)) from None
        if ident.key_id != kid.lower():
            raise KeyFileError(f"verifier key for '{name}' has key id {kid}, expected {ident.key_id}")
        return ident

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt to this key (its X25519 form) so that only its holder can read it."""
        pk = nacl.signing.VerifyKey(self.public_key).to_curve25519_public_key()
        return nacl.public.SealedBox(pk).encrypt(plaintext)

    @property
    def curve_public(self) -> bytes:
        """This key's Curve25519 form (32 bytes): its CURVE public key on ZeroMQ sockets
        (PyNaCl's `crypto_sign_ed25519_pk_to_curve25519`), so one key serves for both."""
        return bytes(nacl.signing.VerifyKey(self.public_key).to_curve25519_public_key())

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True if `signature` is this key's Ed25519 signature of `message`."""
        try:
            nacl.signing.VerifyKey(self.public_key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True


class Identity:
    """A named Ed25519 signing key. Keep it in one process; never send it anywhere."""

    def __init__(self, name: str, seed: bytes):
        check_name(name, "key name")
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self.name = name
        self._signing = nacl.signing.SigningKey(seed)
        self.public = PublicIdentity(name, bytes(self._signing.verify_key))

    def __repr__(self) -> str:
        return f"Identity({self.name!r}, key_id={self.key_id})"

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(name, os.urandom(32))

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature

    def unseal(self, ciphertext: bytes) -> bytes:
        """Decrypt what `PublicIdentity.seal` encrypted to this key; raises on tampering."""
        try:
            return nacl.public.SealedBox(self._signing.to_curve25519_private_key()).decrypt(
                ciphertext)
        except nacl.exceptions.CryptoError:
            raise KeyFileError(f"sealed box is not for '{self.name}' or was altered") from None

    @property
    def curve_secret(self) -> bytes:
        """This key's Curve25519 secret (32 bytes), the CURVE secret key of its sockets
        (`crypto_sign_ed25519_sk_to_curve25519`). Never leaves the process."""
        return bytes(self._signing.to_curve25519_private_key())

    def skey(self) -> str:
        seed = bytes(self._signing)
        b64 = base64.b64encode(bytes([ALG_ED25519]) + seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key_id}+{b64}"

    @classmethod
    def from_skey(cls, text: str) -> Identity:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise KeyFileError("private key is not 'PRIVATE+KEY+name+keyid+base64'")
        _, _, name, kid, b64 = parts
        raw = _b64(b64, "private key")
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise KeyFileError(f"private key for '{name}' is not an Ed25519 key")
        try:
            ident = cls(name, raw[1:])
        except ValueError as exc:
            raise KeyFileError(str(exc)) from None
        if ident.key_id != kid.lower():
            raise KeyFileError(f"private key for '{name}' has key id {kid}, expected {ident.key_id}")
        return ident


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{what} is not valid base64") from None


def key_paths(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """(private, public) file paths of identity `name` in `directory`."""
    d = Path(directory)
    return d / f"{name}.key", d / f"{name}.pub"


def write_identity(ident: Identity, directory: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write NAME.key (mode 0600, created that way, never widened) and NAME.pub."""
    priv, pub = key_paths(directory, ident.name)
    Path(directory).mkdir(parents=True, exist_ok=True)
    if not force and (priv.exists() or pub.exists()):
        raise KeyFileError(f"{priv} or {pub} already exists; refusing to overwrite (use --force)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    if not force:
        flags |= os.O_EXCL
    fd = os.open(priv, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (ident.skey() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    pub.write_text(ident.public.vkey + "\n")


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Read a private key file, refusing one that group or others can read."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"private key file {p} does not exist; create it with "
                           f"`clicooper keys new NAME --dir DIR`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"private key file {p} has mode {stat.S_IMODE(mode):04o}; it must not be accessible "
            f"by group or others: run `chmod 600 {p}`"
        )
    return Identity.from_skey(p.read_text())


def load_public(path: str | os.PathLike[str]) -> PublicIdentity:
    """Read a public key file (one verifier-key line)."""
    p = Path(path)
    try:
        return PublicIdentity.from_vkey(p.read_text())
    except FileNotFoundError:
        raise KeyFileError(f"public key file {p} does not exist") from None
