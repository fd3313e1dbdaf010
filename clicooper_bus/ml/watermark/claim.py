"""What a trainer claims at the end of a round: the digest of its stage's weights and the bits
they carry for its key (the document itself is `clicooper_bus.chain.documents.Claim`)."""

from __future__ import annotations

import hashlib

import numpy as np
from safetensors.torch import save

from clicooper_bus.chain import key as wk
from clicooper_bus.chain.documents import Claim, Commit
from clicooper_bus.ml.watermark import mark


def weights_digest(module) -> bytes:
    """SHA-256 over the safetensors bytes of a stage's weights (no metadata), the same
    whether the trainer holds the stage or it is cut out of the assembled model."""
    state = {k: v.detach().contiguous() for k, v in sorted(module.state_dict().items())}
    return hashlib.sha256(save(state)).digest() if state else hashlib.sha256(b"").digest()


def make_claim(commit: Commit, key: bytes, module, nbits: int) -> Claim:
    """What a trainer claims at the end of a round: its weights and the bits they carry."""
    if mark.carrier(module) is None:
        return Claim(commit.stage, commit.round, commit.commitment, weights_digest(module),
                     b"", 0, 0)
    got = mark.extract(key, module, nbits)
    errors = int((got != wk.bits(key, nbits)).sum())
    return Claim(commit.stage, commit.round, commit.commitment, weights_digest(module),
                 np.packbits(got).tobytes(), nbits, errors)
