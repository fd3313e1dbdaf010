"""Signed message envelopes: ZeroMQ frames `[topic, header, signature, body]`.

The header is a msgpack map that commits to the body through `sha256`; the signature is
Ed25519 over `DOMAIN + header_bytes`, so a body is hashed once and never signed directly. Each
sender numbers its messages (`seq`, from 1) and chains them (`prev` = SHA-256 of its previous
header bytes), so a missing, replayed or reordered message of any one sender is detectable.

Parsing never trusts a re-encoding: the exact header bytes that arrived are what is verified and
what the provenance log stores (its leaf is `header || signature`).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from clicooper_bus.errors import (
    BadTensor,
    DecodeError,
    MalformedMessage,
    OversizeFrame,
    TopicMismatch,
    UnknownVersion,
)
from clicooper_bus.net import codec, encoding
from clicooper_bus.net.identity import Identity, check_name
from clicooper_bus.protocol import Topics

VERSION = 1
DOMAIN = b"clicooper/v1\n"
SIG_LEN = 64
ZERO_HASH = bytes(32)

# dtype names on the wire -> little-endian numpy dtypes. Nothing else is accepted.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "float16": "<f2",
        "float32": "<f4",
        "float64": "<f8",
        "int8": "i1",
        "uint8": "u1",
        "int16": "<i2",
        "int32": "<i4",
        "int64": "<i8",
        "bool": "?",
    }.items()
}
_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}
# every dtype a header may name: numpy's, and the float encodings of `[bus] codec`
WIRE_DTYPES = (*DTYPES, *encoding.ENCODED)

_KEY_ID_RE = re.compile(r"^[0-9a-f]{8}$")
_REQUIRED = {
    "v": int, "run": str, "kind": str, "from": str, "to": str, "seq": int, "prev": bytes,
    "ts": int, "len": int, "sha256": bytes,
}
_OPTIONAL = {"dtype": str, "shape": list, "step": int, "batch": int, "epoch": int,
             "nonce": bytes}
NONCE_LEN = 16
_INT_MAX = (1 << 63) - 1
MAX_DIM = 1 << 31


@dataclass(frozen=True)
class Limits:
    """Size limits, all in bytes unless named otherwise. Defaults fit a 128 x 3136 float32 batch
    many times over; raise `max_body` for larger activations."""

    max_topic: int = 256
    max_header: int = 4096
    max_body: int = 64 << 20
    max_ndim: int = 8
    max_depth: int = 8


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Header:
    """The parsed, type-checked fields of a header. `raw` is the exact bytes it came from."""

    raw: bytes
    version: int
    run: str
    kind: str
    sender: str
    to: str
    seq: int
    prev: bytes
    ts_ns: int
    body_len: int
    body_sha256: bytes
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    step: int | None = None
    batch: int | None = None
    epoch: int | None = None
    nonce: bytes | None = None  # the roster's run nonce (absent only before a roster exists)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the header bytes: the next message's `prev`."""
        return hashlib.sha256(self.raw).digest()

    @property
    def topic(self) -> str:
        return Topics(self.run).to(self.kind, self.to)


def tensor_bytes(dtype: str, shape: tuple[int, ...], sender: str | None = None) -> int:
    """Bytes of a tensor body of a whitelisted wire `dtype` and `shape` (Python ints: no
    overflow). Raises BadTensor naming `sender` for a shape the dtype cannot have (an int8/row
    tensor without rows)."""
    try:
        n = encoding.body_len(dtype, shape)
    except BadTensor as exc:
        raise BadTensor(str(exc), sender=sender, field="shape") from None
    return n if n is not None else math.prod(shape) * DTYPES[dtype].itemsize


def signed_bytes(header_raw: bytes) -> bytes:
    """What the Ed25519 signature covers: the domain tag, then the exact header bytes."""
    return DOMAIN + header_raw


def parse_header(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and type-check header bytes. Raises a `RejectedMessage` subclass naming the field."""
    if len(raw) > limits.max_header:
        raise OversizeFrame(f"header is {len(raw)} bytes, limit {limits.max_header}", field="header")
    try:
        doc = codec.unpack(raw, max_depth=limits.max_depth)
    except DecodeError as exc:
        raise MalformedMessage(f"header: {exc}", field="header") from None
    if type(doc) is not dict:
        raise MalformedMessage("header is not a map", field="header")
    # name the sender in errors only if it is a well-formed key id (no text injection)
    sender = doc.get("from") if type(doc.get("from")) is str and _KEY_ID_RE.fullmatch(
        doc["from"]) else None
    if "v" in doc and doc["v"] != VERSION:
        raise UnknownVersion(f"version {doc['v']!r}, this verifier speaks {VERSION}",
                             sender=sender, field="v")
    for key in _REQUIRED:
        if key not in doc:
            raise MalformedMessage("missing", sender=sender, field=key)
    for key, value in doc.items():
        typ = _REQUIRED.get(key) or _OPTIONAL.get(key)
        if typ is None:
            raise MalformedMessage("unknown header field", sender=sender, field=key)
        if type(value) is not typ:  # bool is not int here
            raise MalformedMessage(f"expected {typ.__name__}, got {type(value).__name__}",
                                   sender=sender, field=key)
        if typ is int and not 0 <= value <= _INT_MAX:
            raise MalformedMessage(f"{value} is out of range", sender=sender, field=key)
    if not _KEY_ID_RE.fullmatch(doc["from"]):
        raise MalformedMessage("not 8 lowercase hex digits", sender=None, field="from")
    for key in ("run", "to"):
        try:
            check_name(doc[key], key)
        except ValueError as exc:
            raise MalformedMessage(str(exc), sender=sender, field=key) from None
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", doc["kind"]):
        raise MalformedMessage("not a kind name", sender=sender, field="kind")
    if doc["seq"] < 1:
        raise MalformedMessage("seq starts at 1", sender=sender, field="seq")
    for key in ("prev", "sha256"):
        if len(doc[key]) != 32:
            raise MalformedMessage("must be 32 bytes", sender=sender, field=key)
    if "nonce" in doc and len(doc["nonce"]) != NONCE_LEN:
        raise MalformedMessage(f"must be {NONCE_LEN} bytes", sender=sender, field="nonce")
    if doc["len"] > limits.max_body:
        raise OversizeFrame(f"header declares a {doc['len']}-byte body, limit {limits.max_body}",
                            sender=sender, field="len")
    shape = None
    if ("dtype" in doc) != ("shape" in doc):
        raise MalformedMessage("dtype and shape come together", sender=sender, field="shape")
    if "dtype" in doc:
        if doc["dtype"] not in WIRE_DTYPES:
            raise BadTensor(f"dtype {doc['dtype']!r} is not in the whitelist "
                            f"{sorted(WIRE_DTYPES)}", sender=sender, field="dtype")
        dims = doc["shape"]
        if len(dims) > limits.max_ndim or any(type(d) is not int or not 0 <= d < MAX_DIM
                                              for d in dims):
            raise BadTensor(f"shape must be at most {limits.max_ndim} ints in 0..{MAX_DIM - 1}",
                            sender=sender, field="shape")
        shape = tuple(dims)
        # even an empty tensor must have a shape numpy and torch can hold
        if tensor_bytes(doc["dtype"], tuple(max(d, 1) for d in shape), sender) > limits.max_body:
            raise BadTensor(f"shape {list(shape)} is larger than the body limit",
                            sender=sender, field="shape")
        if doc["dtype"] in encoding.FLOAT_WIRE and \
                math.prod(max(d, 1) for d in shape) * 4 > limits.max_body:
            # an encoded body decodes to float32: 2 to 4 times its size, bounded like one
            raise BadTensor(f"shape {list(shape)} decodes to more float32 than the body limit",
                            sender=sender, field="shape")
        expected = tensor_bytes(doc["dtype"], shape, sender)
        if expected != doc["len"]:
            raise BadTensor(f"shape {list(shape)} of {doc['dtype']} needs {expected} bytes, "
                            f"header says {doc['len']}", sender=sender, field="shape")
    return Header(
        raw=bytes(raw), version=doc["v"], run=doc["run"], kind=doc["kind"], sender=doc["from"],
        to=doc["to"], seq=doc["seq"], prev=doc["prev"], ts_ns=doc["ts"], body_len=doc["len"],
        body_sha256=doc["sha256"], dtype=doc.get("dtype"), shape=shape, step=doc.get("step"),
        batch=doc.get("batch"), epoch=doc.get("epoch"), nonce=doc.get("nonce"),
    )


@dataclass(frozen=True)
class Envelope:
    """One message: topic, parsed header, signature, body. Build with `Sender`, read with
    `Verifier`; a bare `Envelope` has not been verified.

    `float_codec` is not on the wire: it is the codec the receiver's signed plan sets
    (`Bus.recv` stamps it; fp32 until a roster is bound), against which
    `ml.tensors.received` checks the header's dtype."""

    topic: str
    header: Header
    signature: bytes
    body: bytes | memoryview
    float_codec: str = "fp32"

    def expecting(self, codec: str) -> Envelope:
        """This envelope, to be checked against the float `codec` of the receiver's plan."""
        return self if codec == self.float_codec else replace(self, float_codec=codec)

    @property
    def leaf(self) -> bytes:
        """The provenance log's leaf: the exact header bytes followed by the signature."""
        return self.header.raw + self.signature

    def frames(self) -> list[bytes | memoryview]:
        return [self.topic.encode(), self.header.raw, self.signature, self.body]

    def array(self) -> np.ndarray:
        """The tensor body as a numpy array (`array_of`). Raises BadTensor naming the sender
        for a message without a tensor or a malformed encoded body."""
        h = self.header
        if h.dtype is None or h.shape is None:
            raise BadTensor("message has no tensor body", sender=h.sender, field="dtype")
        return array_of(h.dtype, h.shape, self.body, h.sender)

    def document(self, max_depth: int = codec.MAX_DEPTH) -> Any:
        """The body as a strict msgpack document."""
        try:
            return codec.unpack(self.body, max_depth=max_depth)
        except DecodeError as exc:
            raise MalformedMessage(f"body: {exc}", sender=self.header.sender, field="body") from None


def array_of(dtype: str, shape: Sequence[int], body: bytes | memoryview,
             sender: str | None = None) -> np.ndarray:
    """A tensor body of a whitelisted wire `dtype` and `shape` (whose length the header check
    matched): a read-only view of `body` for numpy's dtypes, decoded float32 values (new
    memory) for the codec's encodings (`encoding.ENCODED`). Raises BadTensor naming `sender`
    for an encoded body the encoder cannot have produced (`encoding.decode`)."""
    if dtype in DTYPES:
        return np.frombuffer(body, dtype=DTYPES[dtype]).reshape(tuple(shape))
    try:
        return encoding.decode(dtype, shape, body)
    except BadTensor as exc:
        raise BadTensor(str(exc), sender=sender, field=exc.field) from None


def split_leaf(leaf: bytes) -> tuple[bytes, bytes]:
    """A log leaf is `header || signature`; the signature is the last 64 bytes."""
    if len(leaf) <= SIG_LEN:
        raise MalformedMessage(f"leaf of {len(leaf)} bytes is shorter than a signature",
                               field="signature")
    return leaf[:-SIG_LEN], leaf[-SIG_LEN:]


def parse_frames(frames: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Check frame count and sizes, parse the header, check the topic. No crypto here."""
    if len(frames) != 4:
        raise MalformedMessage(f"expected 4 frames [topic, header, signature, body], got "
                               f"{len(frames)}", field="frames")
    topic_b, header_b, sig, body = frames
    if len(topic_b) > limits.max_topic:
        raise OversizeFrame(f"topic is {len(topic_b)} bytes, limit {limits.max_topic}", field="topic")
    if len(sig) != SIG_LEN:
        raise MalformedMessage(f"signature is {len(sig)} bytes, expected {SIG_LEN}",
                               field="signature")
    header = parse_header(bytes(header_b), limits)  # bounded by max_header: cheap, names sender
    if len(body) > limits.max_body:
        raise OversizeFrame(f"body is {len(body)} bytes, limit {limits.max_body}",
                            sender=header.sender, field="body")
    try:
        topic_s = bytes(topic_b).decode()
    except UnicodeDecodeError:
        raise MalformedMessage("topic is not UTF-8", sender=header.sender, field="topic") from None
    if topic_s != header.topic:
        raise TopicMismatch(f"topic {topic_s!r} does not match the header's {header.topic!r}",
                            sender=header.sender, field="topic")
    return Envelope(topic_s, header, bytes(sig), body)


class Sender:
    """Builds and signs one identity's messages for one run, keeping its `seq` and `prev` chain.

    A sender's chain is only valid in the order `seal` was called: publish in that order. Once
    the run's nonce is known (`nonce`, from the roster), every header carries it.
    """

    def __init__(self, identity: Identity, run_id: str, *, seq: int = 0, prev: bytes = ZERO_HASH,
                 nonce: bytes | None = None):
        check_name(run_id, "run id")
        self.clamped = 0  # float values saturated by a codec (`encoding`), in all
        self.identity = identity
        self.run_id = run_id
        self.seq = seq
        self.prev = prev
        self.nonce = nonce

    def seal(self, kind: str, to: str, body: bytes | memoryview = b"", *,
             dtype: str | None = None, shape: Sequence[int] | None = None,
             step: int | None = None, batch: int | None = None, epoch: int | None = None,
             ts_ns: int | None = None) -> Envelope:
        """Hash the body, build the next header in this sender's chain, and sign it."""
        fields: dict[str, Any] = {
            "v": VERSION, "run": self.run_id, "kind": kind, "from": self.identity.key_id,
            "to": to, "seq": self.seq + 1, "prev": self.prev,
            "ts": time.time_ns() if ts_ns is None else ts_ns,
            "len": len(body), "sha256": hashlib.sha256(body).digest(),
        }
        if self.nonce is not None:
            fields["nonce"] = self.nonce
        if dtype is not None:
            fields["dtype"] = dtype
            fields["shape"] = list(shape or ())
        for key, value in (("step", step), ("batch", batch), ("epoch", epoch)):
            if value is not None:
                fields[key] = int(value)
        raw = codec.pack(fields)
        header = parse_header(raw)  # never emit what a receiver would reject
        signature = self.identity.sign(signed_bytes(raw))
        self.seq += 1
        self.prev = header.digest
        return Envelope(header.topic, header, signature, body)

    def seal_array(self, kind: str, to: str, array: Any, *, codec: str = "fp32",
                   **meta: Any) -> Envelope:
        """Seal a numpy array or torch tensor as raw little-endian bytes with dtype and shape;
        a float one encoded with `codec` (`encoding.encode`: fp32 keeps float16 and float64
        as they are, every other codec takes any float as float32). Values the codec
        saturated are added to `clamped`. Raises BadTensor for a dtype outside the whitelist,
        ValueError for an unknown codec."""
        if hasattr(array, "detach"):  # torch tensor, without importing torch
            array = array.detach().cpu().contiguous().numpy()
        arr = np.ascontiguousarray(array)
        if encoding.check_codec(codec) != "fp32" and arr.dtype.kind == "f":
            enc = encoding.encode(arr, codec)
            self.clamped += enc.clamped
            return self.seal(kind, to, enc.body, dtype=enc.dtype, shape=enc.shape, **meta)
        name = _DTYPE_NAMES.get(arr.dtype.newbyteorder("<"))
        if name is None:
            raise BadTensor(f"dtype {arr.dtype} is not in the whitelist {sorted(DTYPES)}",
                            field="dtype")
        arr = arr.astype(DTYPES[name], copy=False)
        body = memoryview(arr.reshape(-1).view(np.uint8))
        return self.seal(kind, to, body, dtype=name, shape=arr.shape, **meta)

    def seal_document(self, kind: str, to: str, doc: Any, **meta: Any) -> Envelope:
        return self.seal(kind, to, codec.pack(doc), **meta)
