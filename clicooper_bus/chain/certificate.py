"""Notary certificates: a trainer's watermark commitment and claim for one stage and round,
bound to the provenance log.

A certificate is a signed document (`signed_doc`, type `clicooper-wm-certificate/1`) from the
notary holding: the commitment and claim messages exactly as logged (leaf = header and
signature, and body), their log indices, the index of the round's first training activation
(the commitment must come before it), a signed checkpoint covering both, and RFC 9162
inclusion proofs of both leaves against that checkpoint. Anyone holding the roster can check
it without the log; with the log, everything in it can be re-derived.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from clicooper_bus.chain.documents import Commit
from clicooper_bus.errors import ClicooperError, ProofError
from clicooper_bus.net import codec, signed_doc
from clicooper_bus.net.identity import Identity, PublicIdentity
from clicooper_bus.net.wire import Header, parse_header, split_leaf
from clicooper_bus.tlog.checkpoint import Checkpoint, open_checkpoint
from clicooper_bus.tlog.merkle import leaf_hash, verify_consistency, verify_inclusion

CERT_TYPE = "clicooper-wm-certificate/1"


class CertificateError(ClicooperError):
    """A certificate, or the commitment or claim inside it, does not hold."""


@dataclass(frozen=True)
class Logged:
    """One logged message: its leaf (header || signature), body and index in the log."""

    leaf: bytes
    body: bytes
    index: int

    @property
    def header(self) -> Header:
        return parse_header(split_leaf(self.leaf)[0])

    def document(self) -> dict:
        doc = codec.unpack(self.body)
        if type(doc) is not dict:
            raise CertificateError("a logged watermark message body is not a map")
        return doc

    @property
    def digest(self) -> bytes:
        """SHA-256 of the leaf: how a later link names this message."""
        return hashlib.sha256(self.leaf).digest()


@dataclass(frozen=True)
class Certificate:
    run_id: str
    stage: int
    round: int
    commit: Logged
    claim: Logged
    round_start: int  # index of the round's first training activation from the owner
    checkpoint_note: str
    commit_proof: tuple[bytes, ...]
    claim_proof: tuple[bytes, ...]
    issued_ns: int = 0  # the notary's clock when it certified (what a dispute compares)
    # RFC 9162 consistency proof from the log size the commitment keys to (its `log_size`) to
    # the certificate's checkpoint: proves the commitment's `log_root` is this log's root at
    # that size, with no other checkpoint needed (empty: not carried, or equal sizes)
    log_root_proof: tuple[bytes, ...] = ()
    raw: bytes = b""  # the signed document, as issued

    def to_doc(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "stage": self.stage, "round": self.round,
                "commit": {"leaf": self.commit.leaf, "body": self.commit.body,
                           "index": self.commit.index},
                "claim": {"leaf": self.claim.leaf, "body": self.claim.body,
                          "index": self.claim.index},
                "round_start": self.round_start, "checkpoint": self.checkpoint_note,
                "commit_proof": list(self.commit_proof), "claim_proof": list(self.claim_proof),
                "issued_ns": self.issued_ns, "log_root_proof": list(self.log_root_proof)}


def issue(notary: Identity, cert: Certificate) -> bytes:
    return signed_doc.seal(notary, CERT_TYPE, cert.to_doc())


def _logged(d: Any, what: str) -> Logged:
    if type(d) is not dict or type(d.get("leaf")) is not bytes or type(d.get("body")) is not bytes \
            or type(d.get("index")) is not int:
        raise CertificateError(f"certificate field {what} is malformed")
    return Logged(d["leaf"], d["body"], d["index"])


def open_certificate(data: bytes, notary: PublicIdentity, origin: str) -> tuple[Certificate, Checkpoint]:
    """Check the notary's signature, the checkpoint's, both inclusion proofs and both bodies'
    hashes; return the certificate and its checkpoint. Raises `CertificateError`."""
    try:
        un = signed_doc.parse(data, CERT_TYPE)
    except ClicooperError as exc:
        raise CertificateError(f"not a certificate: {exc}") from None
    if not un.verify(notary):
        raise CertificateError("the certificate's signature is not the notary's")
    d = un.document()
    try:
        cert = Certificate(str(d["run_id"]), int(d["stage"]), int(d["round"]),
                           _logged(d["commit"], "commit"), _logged(d["claim"], "claim"),
                           int(d["round_start"]), str(d["checkpoint"]),
                           tuple(d["commit_proof"]), tuple(d["claim_proof"]),
                           int(d["issued_ns"]), tuple(d.get("log_root_proof", ())), raw=data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CertificateError(f"certificate is malformed: {exc}") from None
    try:
        cp = open_checkpoint(cert.checkpoint_note, notary, origin)
    except ClicooperError as exc:
        raise CertificateError(f"the certificate's checkpoint does not verify: {exc}") from None
    for what, logged, proof in (("commitment", cert.commit, cert.commit_proof),
                                ("claim", cert.claim, cert.claim_proof)):
        try:
            if not all(type(h) is bytes for h in proof):
                raise ProofError("proof hashes must be bytes")
            verify_inclusion(logged.index, cp.size, leaf_hash(logged.leaf), list(proof), cp.root)
        except ProofError as exc:
            raise CertificateError(f"the {what}'s inclusion proof does not verify against the "
                                   f"certificate's checkpoint (index {logged.index}, tree size "
                                   f"{cp.size}): {exc}") from None
        if hashlib.sha256(logged.body).digest() != logged.header.body_sha256:
            raise CertificateError(f"the {what}'s body does not match its signed header")
    try:
        keyed = Commit.from_doc(cert.commit.document()).log_size
    except (ValueError, TypeError, KeyError) as exc:
        raise CertificateError(f"the certified commitment is malformed: {exc}") from None
    if cert.log_root_proof or keyed == cp.size:
        _check_log_root(cert, cp)
    return cert, cp


def keyed_root(cert: Certificate, cp: Checkpoint) -> tuple[int, bytes] | None:
    """(size, root) the certified commitment keys to, when the certificate proves it is the
    log's root at that size (`log_root_proof`, checked by `open_certificate`, or the
    checkpoint's own size); None when it does not carry a proof."""
    commit = Commit.from_doc(cert.commit.document())
    if cert.log_root_proof or commit.log_size == cp.size:
        return commit.log_size, commit.log_root
    return None


def _check_log_root(cert: Certificate, cp: Checkpoint) -> None:
    try:
        commit = Commit.from_doc(cert.commit.document())
        if not all(type(h) is bytes for h in cert.log_root_proof):
            raise ProofError("proof hashes must be bytes")
        verify_consistency(commit.log_size, cp.size, commit.log_root, cp.root,
                           list(cert.log_root_proof))
    except (ProofError, ValueError, TypeError) as exc:
        raise CertificateError(f"the commitment's log root is not the log's root at its size "
                               f"(consistency with the certificate's checkpoint of size "
                               f"{cp.size}): {exc}") from None
