"""RFC 6962 / 9162 tree: transparency-dev vectors, known answers, a reference model, and
hypothesis properties for proofs up to 2,000 leaves."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clicooper_bus.errors import ProofError
from clicooper_bus.tlog.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)
from tests.conftest import MERKLE_VECTORS


def _vectors(kind: str) -> list:
    files = sorted((MERKLE_VECTORS / kind).rglob("*.json")) if MERKLE_VECTORS.is_dir() else []
    return [pytest.param(f, id=str(f.relative_to(MERKLE_VECTORS))) for f in files]


def _b(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


needs_vectors = pytest.mark.skipif(not MERKLE_VECTORS.is_dir(),
                                   reason=f"{MERKLE_VECTORS} is missing (../shared not checked out)")


@needs_vectors
def test_vector_count():
    assert len(_vectors("inclusion")) + len(_vectors("consistency")) >= 184


@needs_vectors
@pytest.mark.parametrize("path", _vectors("inclusion"))
def test_inclusion_vector(path):
    v = json.loads(path.read_text())
    args = (v["leafIdx"], v["treeSize"], _b(v["leafHash"]), [_b(p) for p in v["proof"] or []],
            _b(v["root"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@needs_vectors
@pytest.mark.parametrize("path", _vectors("consistency"))
def test_consistency_vector(path):
    v = json.loads(path.read_text())
    args = (v["size1"], v["size2"], _b(v["root1"]), _b(v["root2"]),
            [_b(p) for p in v["proof"] or []])
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_known_answers():
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    assert MerkleTree().root() == EMPTY_ROOT


# --- a literal transcription of RFC 9162 2.1 as the reference model ----------------------

def _mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return leaf_hash(d[0])
    k = 1 << ((len(d) - 1).bit_length() - 1)
    return node_hash(_mth(d[:k]), _mth(d[k:]))


def _path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = 1 << ((len(d) - 1).bit_length() - 1)
    if m < k:
        return _path(m, d[:k]) + [_mth(d[k:])]
    return _path(m - k, d[k:]) + [_mth(d[:k])]


def _subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [_mth(d)]
    k = 1 << ((len(d) - 1).bit_length() - 1)
    if m <= k:
        return _subproof(m, d[:k], b) + [_mth(d[k:])]
    return _subproof(m - k, d[k:], False) + [_mth(d[:k])]


def test_tree_matches_rfc_reference():
    leaves = [bytes([i]) * (i % 7) for i in range(70)]
    tree = MerkleTree()
    for leaf in leaves:
        tree.append(leaf)
    for n in range(1, 71):
        assert tree.root(n) == _mth(leaves[:n])
        for m in range(n):
            assert tree.inclusion_proof(m, n) == _path(m, leaves[:n])
        for m in range(1, n + 1):
            assert tree.consistency_proof(m, n) == _subproof(m, leaves[:n], True)


# --- properties -------------------------------------------------------------------------

_TREE = MerkleTree()
for _i in range(2000):
    _TREE.append(_i.to_bytes(4, "big"))


def _flip(proof: list[bytes], which: int, bit: int) -> list[bytes]:
    out = list(proof)
    h = bytearray(out[which])
    h[bit // 8] ^= 1 << (bit % 8)
    out[which] = bytes(h)
    return out


@given(st.data())
def test_inclusion_properties(data):
    size = data.draw(st.integers(1, 2000), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    proof, root, lh = _TREE.inclusion_proof(index, size), _TREE.root(size), _TREE.leaf_hash_at(index)
    assert len(proof) <= max(1, (size - 1).bit_length())
    verify_inclusion(index, size, lh, proof, root)
    bad = []
    if proof:
        w = data.draw(st.integers(0, len(proof) - 1))
        bad.append((index, size, lh, _flip(proof, w, data.draw(st.integers(0, 255))), root))
        bad.append((index, size, lh, proof[:-1], root))
    bad.append((index, size, lh, proof + [root], root))
    bad.append((index, size, lh, proof, _flip([root], 0, data.draw(st.integers(0, 255)))[0]))
    bad.append((index, size, _flip([lh], 0, 0)[0], proof, root))
    # another size, with that size's true root: the proof must not carry over
    others = [s for s in range(index + 1, 2001) if s != size]
    if others:
        other = data.draw(st.sampled_from(others))
        bad.append((index, other, lh, proof, _TREE.root(other)))
    other_index = data.draw(st.integers(0, size).filter(lambda i: i != index))
    bad.append((other_index, size, lh, proof, root))
    for args in bad:
        with pytest.raises(ProofError):
            verify_inclusion(*args)


@given(st.data())
def test_consistency_properties(data):
    size2 = data.draw(st.integers(1, 2000), label="size2")
    size1 = data.draw(st.integers(1, size2), label="size1")
    proof = _TREE.consistency_proof(size1, size2)
    r1, r2 = _TREE.root(size1), _TREE.root(size2)
    assert len(proof) <= (size2 - 1).bit_length() + 1
    verify_consistency(size1, size2, r1, r2, proof)
    bad = []
    if proof:
        w = data.draw(st.integers(0, len(proof) - 1))
        bad.append((size1, size2, r1, r2, _flip(proof, w, data.draw(st.integers(0, 255)))))
        bad.append((size1, size2, r1, r2, proof[:-1]))
    bad.append((size1, size2, r1, r2, proof + [r1]))
    bad.append((size1, size2, _flip([r1], 0, 7)[0], r2, proof))
    bad.append((size1, size2, r1, _flip([r2], 0, 9)[0], proof))
    # other sizes, with their true roots: the proof must not carry over
    if size2 > 1:
        other1 = data.draw(st.sampled_from([s for s in range(1, size2 + 1) if s != size1]))
        bad.append((other1, size2, _TREE.root(other1), r2, proof))
    if size2 < 2000:
        other2 = data.draw(st.integers(max(size1, size2 + 1), 2000))
        bad.append((size1, other2, r1, _TREE.root(other2), proof))
    bad.append((size1, size2, r2, r1, proof) if r1 != r2 else (0, size2, r1, r2, proof))
    for args in bad:
        with pytest.raises(ProofError):
            verify_consistency(*args)
