"""CURVE on every socket of the bus, with the keys participants already have.

Each participant's CURVE key pair is its Ed25519 identity converted to Curve25519
(`PublicIdentity.curve_public`, `Identity.curve_secret`), so the one key a roster lists both
signs messages and authenticates the connection. The broker has an identity of its own; a
client must know the broker's public key (from the keys directory or a join file) before it
connects, which stops a man in the middle. Sources: ZeroMQ RFC 26 (CurveZMQ) and RFC 27 (ZAP);
pyzmq's `zmq.auth`; FACTS.md ("Keys").

`security = "none"` (plaintext) exists only to measure what CURVE costs, and only on loopback
addresses: a plaintext bus on a network would show every label, activation and gradient to
anyone on the path.
"""

from __future__ import annotations

import zmq
from zmq.utils import z85

from clicooper_bus.errors import ConfigError
from clicooper_bus.net.identity import Identity, PublicIdentity

SECURITY = ("curve", "none")


def z85_public(key: PublicIdentity) -> bytes:
    """The Z85 text of `key`'s CURVE public key (40 bytes), as ZeroMQ takes it."""
    return z85.encode(key.curve_public)


def check_security(security: str, *addresses: str) -> None:
    """Refuse an unknown mode, and plaintext on any address that is not loopback.
    Raises `ConfigError` naming the address."""
    if security not in SECURITY:
        raise ConfigError(f"[bus] security = {security!r}: use one of {SECURITY}")
    if security == "none":
        for addr in addresses:
            host = addr.split("://", 1)[-1].rsplit(":", 1)[0]
            if not (addr.startswith("ipc://") or addr.startswith("inproc://")
                    or host in ("127.0.0.1", "localhost", "[::1]")):
                raise ConfigError(f"[bus] security = 'none' sends every tensor in clear text; it "
                                  f"is allowed only on loopback, not on {addr}: use 'curve'")


def make_server(sock: zmq.Socket, identity: Identity) -> None:
    """Make `sock` a CURVE server with `identity`'s key; ZAP (a running authenticator in the
    socket's context) then decides who may connect. Call before bind."""
    sock.curve_server = True
    sock.curve_secretkey = z85.encode(identity.curve_secret)
    sock.curve_publickey = z85_public(identity.public)


def make_client(sock: zmq.Socket, identity: Identity, server: PublicIdentity) -> None:
    """Make `sock` a CURVE client of `server` with `identity`'s key. Call before connect."""
    sock.curve_serverkey = z85_public(server)
    sock.curve_secretkey = z85.encode(identity.curve_secret)
    sock.curve_publickey = z85_public(identity.public)
