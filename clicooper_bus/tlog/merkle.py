"""RFC 6962 / RFC 9162 Merkle tree with inclusion and consistency proofs.

Leaf hash `SHA256(0x00 || leaf)`, node hash `SHA256(0x01 || left || right)`, the empty tree
`SHA256("")`. The tree stores every complete, aligned subtree (level h holds the hashes of
subtrees of 2^h leaves) in one bytearray per level: 64 bytes per leaf in all, O(1) amortised
appends, and any historical root or proof in O(log n) hashes, because every node an RFC 9162
proof needs is either such a subtree or built from O(log n) of them.

The verifiers follow RFC 9162 sections 2.1.3.2 and 2.1.4.2 strictly (as transparency-dev's
do): hashes must be 32 bytes, the proof must be consumed exactly, `size1 == 0` is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from clicooper_bus.errors import ProofError

HASH_LEN = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes | memoryview) -> bytes:
    return hashlib.sha256(b"\x00" + bytes(leaf)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _largest_pow2_below(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only RFC 6962 tree over leaf hashes."""

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def append_hash(self, h: bytes) -> int:
        """Append a leaf hash; returns its index."""
        if len(h) != HASH_LEN:
            raise ValueError("a leaf hash is 32 bytes")
        index = self._size
        self._levels[0] += h
        self._size += 1
        i, level = index, 0
        while i & 1:  # this node completed a pair: hash it into the level above
            row = self._levels[level]
            parent = node_hash(bytes(row[(i - 1) * 32:i * 32]), bytes(row[i * 32:(i + 1) * 32]))
            level += 1
            if level == len(self._levels):
                self._levels.append(bytearray())
            self._levels[level] += parent
            i >>= 1
        return index

    def append(self, leaf: bytes | memoryview) -> int:
        return self.append_hash(leaf_hash(leaf))

    def leaf_hash_at(self, index: int) -> bytes:
        self._check_index(index, self._size)
        return bytes(self._levels[0][index * 32:(index + 1) * 32])

    def _range_root(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for the ranges RFC 9162's recursions produce (start aligned)."""
        n = end - start
        if n & (n - 1) == 0:  # a complete subtree: stored
            level = n.bit_length() - 1
            i = start >> level
            return bytes(self._levels[level][i * 32:(i + 1) * 32])
        k = _largest_pow2_below(n)
        return node_hash(self._range_root(start, start + k), self._range_root(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """The root of the tree at `size` leaves (default: now). Any past size works."""
        size = self._size if size is None else size
        if not 0 <= size <= self._size:
            raise ValueError(f"tree size {size} is outside 0..{self._size}")
        return EMPTY_ROOT if size == 0 else self._range_root(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 PATH(index, D[0:size])."""
        size = self._size if size is None else size
        if not 0 < size <= self._size:
            raise ValueError(f"tree size {size} is outside 1..{self._size}")
        self._check_index(index, size)
        proof: list[bytes] = []
        start, end, m = 0, size, index
        while end - start > 1:
            k = _largest_pow2_below(end - start)
            if m < k:
                proof.append(self._range_root(start + k, end))
                end = start + k
            else:
                proof.append(self._range_root(start, start + k))
                start, m = start + k, m - k
        proof.reverse()  # PATH lists the deepest sibling first
        return proof

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """RFC 9162 PROOF(size1, D[0:size2])."""
        size2 = self._size if size2 is None else size2
        if not 0 < size1 <= size2 <= self._size:
            raise ValueError(f"need 0 < size1 <= size2 <= {self._size}, got {size1}, {size2}")
        proof: list[bytes] = []
        start, end, m, whole = 0, size2, size1, True
        while m != end - start:
            k = _largest_pow2_below(end - start)
            if m <= k:
                proof.append(self._range_root(start + k, end))
                end = start + k
            else:
                proof.append(self._range_root(start, start + k))
                start, m, whole = start + k, m - k, False
        if not whole:
            proof.append(self._range_root(start, end))
        proof.reverse()
        return proof

    @staticmethod
    def _check_index(index: int, size: int) -> None:
        if not 0 <= index < size:
            raise IndexError(f"leaf index {index} is outside 0..{size - 1}")


def _check_hashes(*hashes: bytes) -> None:
    for h in hashes:
        if not isinstance(h, (bytes, bytearray)) or len(h) != HASH_LEN:
            raise ProofError("a hash in the proof, root or leaf is not 32 bytes")


def root_from_inclusion_proof(index: int, size: int, leaf_h: bytes,
                              proof: Sequence[bytes]) -> bytes:
    """RFC 9162 2.1.3.2: the root implied by an inclusion proof, or `ProofError`."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside tree size {size}")
    _check_hashes(leaf_h, *proof)
    fn, sn, r = index, size - 1, bytes(leaf_h)
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(index: int, size: int, leaf_h: bytes, proof: Sequence[bytes],
                     root: bytes) -> None:
    """Raise `ProofError` unless `leaf_h` is leaf `index` of the tree of `size` with `root`."""
    _check_hashes(root)
    if root_from_inclusion_proof(index, size, leaf_h, proof) != root:
        raise ProofError(f"inclusion proof for leaf {index} does not lead to the root")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 2.1.4.2: raise `ProofError` unless tree `size1` is a prefix of tree `size2`.

    Equal sizes compare the roots as given (as transparency-dev does, whatever their length).
    """
    if size1 <= 0:
        raise ProofError("consistency from an empty tree proves nothing (size1 must be > 0)")
    if size2 < size1:
        raise ProofError(f"size1 {size1} is larger than size2 {size2}")
    if size1 == size2:
        if proof:
            raise ProofError("equal sizes need an empty proof")
        if root1 != root2:
            raise ProofError("equal sizes but different roots")
        return
    _check_hashes(root1, root2, *proof)
    if not proof:
        raise ProofError("empty consistency proof for different sizes")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: its root is a node of the path
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != root1:
        raise ProofError("consistency proof does not lead to root1")
    if sr != root2:
        raise ProofError("consistency proof does not lead to root2")
