"""Standalone signed documents (rosters now; certificates later).

A signed document is a strict msgpack map `{type, body, signer, sig}` where `body` is the msgpack
bytes of the document, `signer` the signer's key id and `sig` an Ed25519 signature over
`b"clicooper/v1/doc\\n" + type + b"\\n" + body`. The type is inside the signed bytes, so a
signature made for one kind of document cannot be passed off as another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clicooper_bus.errors import DecodeError
from clicooper_bus.net import codec
from clicooper_bus.net.identity import Identity, PublicIdentity

DOC_DOMAIN = b"clicooper/v1/doc\n"


def _signed_bytes(doc_type: str, body: bytes) -> bytes:
    return DOC_DOMAIN + doc_type.encode() + b"\n" + body


def seal(identity: Identity, doc_type: str, doc: Any) -> bytes:
    """Sign `doc` as a document of `doc_type` and return the container bytes."""
    body = codec.pack(doc)
    sig = identity.sign(_signed_bytes(doc_type, body))
    return codec.pack({"type": doc_type, "body": body, "signer": identity.key_id, "sig": sig})


@dataclass(frozen=True)
class Unverified:
    """A parsed container whose signature has not been checked yet: call `verify`."""

    doc_type: str
    body: bytes
    signer: str
    sig: bytes

    def document(self) -> Any:
        return codec.unpack(self.body)

    def verify(self, key: PublicIdentity) -> bool:
        return key.key_id == self.signer and key.verify(_signed_bytes(self.doc_type, self.body),
                                                        self.sig)


def parse(data: bytes, doc_type: str) -> Unverified:
    """Parse the container and check its type; raises `DecodeError` saying what was wrong."""
    outer = codec.unpack(data)
    if type(outer) is not dict or set(outer) != {"type", "body", "signer", "sig"}:
        raise DecodeError("not a signed document {type, body, signer, sig}")
    if outer["type"] != doc_type:
        raise DecodeError(f"document type is {outer['type']!r}, expected {doc_type!r}")
    if type(outer["body"]) is not bytes or type(outer["sig"]) is not bytes \
            or type(outer["signer"]) is not str:
        raise DecodeError("signed document fields have the wrong types")
    return Unverified(doc_type, outer["body"], outer["signer"], outer["sig"])
