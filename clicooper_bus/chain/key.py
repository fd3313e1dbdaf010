"""Chained watermarks: the key of each stage and round, and the Uchida-style mark it defines.

The key of stage k in round t is SHA-256, with domain separation and every field length-
prefixed, over: the run id, k, t, the trainer's public key, the previous link's digest (stage
k-1's commitment in round t, or the signed roster's digest for k = 1), the same stage's claim
digest from round t-1 (zeros in round 0) and the log root of the latest checkpoint when the
trainer commits. Everything in it is public and in the log, so anyone can recompute the chain;
what it proves is order and binding (a stage's mark depends on the run, its place in the chain
and the log's state when it began), not secrecy.

From the key, SHAKE-256 (a fixed, portable XOF: numpy's generators are not promised stable
across versions) yields the T watermark bits and a T x d projection matrix X with entries
uniform in [-1, 1). The mark those define on a stage's weights is `clicooper_bus.ml.watermark
.mark` (torch); this module stays torch-free so the notary and the log tools can check chains.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

DOMAIN_KEY = b"clicooper-watermark-key/1"
DOMAIN_COMMIT = b"clicooper-watermark-commit/1"
DOMAIN_BITS = b"clicooper-watermark-bits/1"
DOMAIN_MATRIX = b"clicooper-watermark-matrix/1"
ZERO = bytes(32)
DEFAULT_BITS = 64
DEFAULT_THRESHOLD = 0.2  # a stage verifies with at most this fraction of wrong bits


def _hash(domain: bytes, *fields: bytes) -> bytes:
    h = hashlib.sha256()
    h.update(len(domain).to_bytes(4, "big") + domain)
    for f in fields:
        h.update(len(f).to_bytes(4, "big") + f)
    return h.digest()


@dataclass(frozen=True)
class Link:
    """Everything a stage-round key is derived from (all of it public, all of it logged)."""

    run_id: str
    stage: int  # 1..K
    round: int  # 0..
    trainer_key: bytes  # the trainer's Ed25519 public key, 32 bytes
    prev_link: bytes  # stage k-1's commitment in this round, or the roster digest for k = 1
    prev_round: bytes  # this stage's claim digest in round t-1; ZERO in round 0
    log_root: bytes  # root of the latest checkpoint the trainer saw when committing

    def __post_init__(self) -> None:
        for name in ("prev_link", "prev_round", "log_root"):
            if len(getattr(self, name)) != 32:
                raise ValueError(f"watermark link field {name} must be 32 bytes")
        if len(self.trainer_key) != 32:
            raise ValueError("watermark link: trainer_key must be a 32-byte Ed25519 key")
        if self.stage < 1 or self.round < 0:
            raise ValueError("watermark link: stage counts from 1, round from 0")

    def key(self) -> bytes:
        return _hash(DOMAIN_KEY, self.run_id.encode(), self.stage.to_bytes(4, "big"),
                     self.round.to_bytes(4, "big"), self.trainer_key, self.prev_link,
                     self.prev_round, self.log_root)


def commitment(key: bytes) -> bytes:
    """What a trainer publishes before a round: binds it to its key, hence to the chain."""
    return _hash(DOMAIN_COMMIT, key)


def bits(key: bytes, t: int = DEFAULT_BITS) -> np.ndarray:
    """The T watermark bits (0/1 uint8) of a key."""
    raw = hashlib.shake_256(DOMAIN_BITS + key).digest((t + 7) // 8)
    return np.unpackbits(np.frombuffer(raw, np.uint8))[:t]


def projection(key: bytes, d: int, t: int = DEFAULT_BITS) -> np.ndarray:
    """The T x d secret projection matrix, float32 entries uniform in [-1, 1)."""
    raw = hashlib.shake_256(DOMAIN_MATRIX + key).digest(4 * t * d)
    u = np.frombuffer(raw, "<u4").astype(np.float64) / 2.0 ** 32
    return (2.0 * u - 1.0).reshape(t, d).astype(np.float32)


def false_positive_probability(t: int = DEFAULT_BITS, threshold: float = DEFAULT_THRESHOLD) -> float:
    """P(a model with no mark verifies): at most floor(threshold * T) of T fair coin flips
    wrong, the binomial tail."""
    k = math.floor(threshold * t)
    return sum(math.comb(t, i) for i in range(k + 1)) / 2.0 ** t
