"""The audit log's Merkle tree as RFC 9162 (Certificate Transparency 2.0) defines it: pure code.

What it implements
    §2.1.1   the Merkle Tree Hash MTH: `leaf_hash` = SHA-256(0x00 || data), `node_hash` =
             SHA-256(0x01 || left || right), `EMPTY_ROOT` = SHA-256(""); `root`, `range_hash`.
    §2.1.3.1 the inclusion proof PATH(m, D[n]): `inclusion_ranges`; §2.1.3.2 `verify_inclusion`.
    §2.1.4.1 the consistency proof PROOF(m, D[n]) (SUBPROOF): `consistency_ranges`;
    §2.1.4.2 `verify_consistency`. Hashing and proofs are RFC 6962's, which RFC 9162 keeps.

Storage model
    A store keeps only PERFECT subtrees, rows (level, idx, hash): level 0 holds the leaf hashes,
    node (k, i) is the MTH of leaves [i * 2^k, (i + 1) * 2^k). A perfect node never changes once
    its last leaf is in, so appending writes `appended_nodes(...)` (the leaf and each node it
    completes, at most log2(n) + 1 rows) and rewrites nothing. The tree of any size n <= the
    log's is the perfect subtrees of `frontier(n)` (one per set bit of n), so its head is
    `root(...)` over those rows, and every range a proof needs is covered by a few of them.
    To answer a proof: `ranges = inclusion_ranges(i, n)` (or `consistency_ranges(m, n)`), fetch
    `needed_nodes(ranges)` (O(log n) rows) in one query, then `proof_from(ranges, rows)`.

Every hash is 32 raw bytes. A verifier that rejects raises `ProofError` saying why; so do the
proof builders for impossible arguments (an index past the tree, a first size of 0 or past the
second). As in the RFC, a proof does not bind the tree size by itself (leaf 0's proof in a tree
of 3 also checks as one in a tree of 4 against the same root): take the size from a signed head.
`MemoryTree` is the same model over a dict, for tests and witnesses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "EMPTY_ROOT", "HASH_SIZE", "MemoryTree", "ProofError", "appended_nodes", "consistency_ranges",
    "frontier", "inclusion_ranges", "leaf_hash", "needed_nodes", "node_hash", "proof_from",
    "range_hash", "range_nodes", "root", "verify_consistency", "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

Node = tuple[int, int]  # (level, idx): leaves [idx * 2**level, (idx + 1) * 2**level)
Range = tuple[int, int]  # leaves [a, b)


class ProofError(ValueError):
    """A proof that does not verify, or a proof asked for that cannot exist."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def frontier(n: int) -> list[Node]:
    """The perfect subtrees that cover leaves [0, n), left to right (largest first)."""
    return range_nodes(0, n)


def appended_nodes(n: int, leaf: bytes,
                   frontier_hashes: Sequence[bytes]) -> list[tuple[int, int, bytes]]:
    """The rows to store when leaf number `n` (its hash `leaf`) joins a tree of size `n`.

    `frontier_hashes` are the hashes of `frontier(n)`, in that order. Returns (0, n, leaf) and
    every perfect node the new leaf completes, lowest level first."""
    if len(frontier_hashes) != n.bit_count():
        raise ValueError(f"a tree of size {n} has {n.bit_count()} frontier nodes, "
                         f"got {len(frontier_hashes)}")
    rows = [(0, n, leaf)]
    pending, h, level = list(frontier_hashes), leaf, 0
    while (n >> level) & 1:  # each trailing 1 bit of n is a left sibling now completed
        h = node_hash(pending.pop(), h)
        level += 1
        rows.append((level, n >> level, h))
    return rows


def range_hash(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from the hashes of its `range_nodes`, left to right (not empty)."""
    if not hashes:
        raise ValueError("an empty range has no hash")
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):  # MTH splits at the largest power of two: the left node
        acc = node_hash(h, acc)
    return acc


def root(frontier_hashes: Sequence[bytes]) -> bytes:
    """The tree head MTH(D[n]) from the hashes of `frontier(n)`; EMPTY_ROOT for the empty tree."""
    return range_hash(frontier_hashes) if frontier_hashes else EMPTY_ROOT


def range_nodes(a: int, b: int) -> list[Node]:
    """The perfect subtrees covering [a, b), left to right, whose `range_hash` is MTH(D[a:b]).

    Holds for every range the RFC's recursion visits: `a` is a multiple of the smallest power of
    two >= b - a. Other ranges are not subtrees of the log's tree and raise ValueError."""
    if not 0 <= a <= b or a % (1 << max(b - a - 1, 0).bit_length()):
        raise ValueError(f"[{a}, {b}) is not a subtree range of an RFC 9162 tree")
    nodes, start = [], a
    for level in range((b - a).bit_length() - 1, -1, -1):
        if (b - a) >> level & 1:
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1): where MTH splits D[n]."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The leaf ranges whose MTHs are PATH(index, D[size]), in proof order (lowest first)."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    out: list[Range] = []
    a, b = 0, size
    while b - a > 1:
        k = _split(b - a)
        if index - a < k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            a += k
    return out[::-1]


def consistency_ranges(m: int, n: int) -> list[Range]:
    """The leaf ranges whose MTHs are PROOF(m, D[n]), in proof order; [] when m == n."""
    if not 0 < m <= n:
        raise ProofError(f"no consistency proof from size {m} to size {n}: "
                         "RFC 9162 needs 0 < first <= second")
    out: list[Range] = []
    a, b, whole = 0, n, True  # SUBPROOF(m - a, D[a:b], whole)
    while m != b:
        k = _split(b - a)
        if m - a <= k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            a, whole = a + k, False
    if not whole:
        out.append((a, b))
    return out[::-1]


def needed_nodes(ranges: Iterable[Range]) -> set[Node]:
    """The stored rows that a proof over `ranges` reads."""
    return {node for a, b in ranges for node in range_nodes(a, b)}


def proof_from(ranges: Iterable[Range], nodes: Mapping[Node, bytes]) -> list[bytes]:
    """The proof's hashes from rows fetched for `needed_nodes(ranges)`."""
    out = []
    for a, b in ranges:
        cover = range_nodes(a, b)
        missing = [node for node in cover if node not in nodes]
        if missing:
            raise ProofError(f"the log lacks node(s) (level, idx) {missing} for leaves [{a}, {b})")
        out.append(range_hash([nodes[node] for node in cover]))
    return out


def _check_hashes(what: str, hashes: Sequence[bytes], expected: int) -> None:
    if len(hashes) != expected:
        raise ProofError(f"{what} has {len(hashes)} hashes, expected {expected}")
    for i, h in enumerate(hashes):
        if len(h) != HASH_SIZE:
            raise ProofError(f"{what}: hash {i} is {len(h)} bytes, not {HASH_SIZE}")


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes],
                     root: bytes) -> None:
    """RFC 9162 §2.1.3.2: `leaf` (a leaf HASH) is leaf `index` of the tree of `size` with `root`."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    if len(leaf) != HASH_SIZE:
        raise ProofError(f"the leaf hash is {len(leaf)} bytes, not {HASH_SIZE}")
    _check_hashes(f"inclusion proof of leaf {index} in size {size}", proof,
                  len(inclusion_ranges(index, size)))
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the path")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the path")
    if r != root:
        raise ProofError(f"inclusion proof of leaf {index} does not lead to the root "
                         f"of size {size}")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes],
                       root1: bytes, root2: bytes) -> None:
    """RFC 9162 §2.1.4.2: the tree of `size2` with `root2` extends the one of `size1` with `root1`.

    Equal sizes need an empty proof and equal roots. The RFC defines consistency for
    0 < size1 only: a proof from the empty tree proves nothing and is refused."""
    if not 0 <= size1 <= size2:
        raise ProofError(f"size1 ({size1}) must be between 0 and size2 ({size2})")
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing "
                         "(RFC 9162: 0 < size1)")
    if size1 == size2:
        if proof:
            raise ProofError(f"equal sizes need an empty proof, got {len(proof)} hashes")
        if root1 != root2:
            raise ProofError(f"two different roots for the same size {size1}: the log forked")
        return
    _check_hashes(f"consistency proof from {size1} to {size2}", proof,
                  len(consistency_ranges(size1, size2)))
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old tree is itself a node of the new one
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the path")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the path")
    if fr != root1:
        raise ProofError(f"consistency proof does not lead to the root of size {size1}")
    if sr != root2:
        raise ProofError(f"consistency proof does not lead to the root of size {size2}")


class MemoryTree:
    """The storage model over a dict: a log's tree in memory (tests, witnesses)."""

    def __init__(self) -> None:
        self.nodes: dict[Node, bytes] = {}
        self.size = 0

    def append(self, data: bytes) -> int:
        """Add a leaf with these bytes; returns its index."""
        index = self.size
        hashes = [self.nodes[node] for node in frontier(index)]
        for level, idx, h in appended_nodes(index, leaf_hash(data), hashes):
            self.nodes[level, idx] = h
        self.size += 1
        return index

    def _size(self, size: int | None) -> int:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ProofError(f"tree size {size} is beyond the log's {self.size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        return root([self.nodes[node] for node in frontier(self._size(size))])

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return proof_from(inclusion_ranges(index, self._size(size)), self.nodes)

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        return proof_from(consistency_ranges(m, self._size(n)), self.nodes)
