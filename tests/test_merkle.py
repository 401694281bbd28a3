"""guard.audit.merkle against the RFC text, the transparency-dev test vectors, and tampering."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard.audit.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    ProofError,
    appended_nodes,
    consistency_ranges,
    frontier,
    inclusion_ranges,
    leaf_hash,
    needed_nodes,
    node_hash,
    proof_from,
    range_hash,
    range_nodes,
    root,
    verify_consistency,
    verify_inclusion,
)

# A copy of ../shared/data/merkle-testdata (transparency-dev/merkle, Apache 2.0), so a clean
# clone runs these checks too.
VECTORS = Path(__file__).parent / "data" / "merkle-testdata"

# The leaves of RFC 6962's reference tree (as used by CT's and transparency-dev's tests).
CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]


# --- the RFC's definitions, word for word (§2.1.1, §2.1.3.1, §2.1.4.1), over leaf data ---------

def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


@cache
def mth(d: tuple[bytes, ...]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()


def path(m: int, d: tuple[bytes, ...]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return path(m, d[:k]) + [mth(d[k:])]
    return path(m - k, d[k:]) + [mth(d[:k])]


def subproof(m: int, d: tuple[bytes, ...], b: bool) -> list[bytes]:
    if m == len(d):
        return [] if b else [mth(d)]
    k = _k(len(d))
    if m <= k:
        return subproof(m, d[:k], b) + [mth(d[k:])]
    return subproof(m - k, d[k:], False) + [mth(d[:k])]


def data(i: int) -> bytes:
    return f"leaf {i}".encode()


def grown(n: int) -> MemoryTree:
    tree = MemoryTree()
    for i in range(n):
        assert tree.append(data(i)) == i
    return tree


TREE = grown(4100)  # perfect nodes never change: this one tree serves every size up to 4100
LEAVES = tuple(data(i) for i in range(TREE.size))


# --- the test vectors ---------------------------------------------------------------------------

def _cases(kind: str) -> list[tuple[str, dict[str, object]]]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    assert len(files) > 50
    return [(str(f.relative_to(VECTORS)), json.loads(f.read_text())) for f in files]


def _b(value: object) -> bytes:
    assert isinstance(value, str)
    return base64.b64decode(value)


def _proof(case: dict[str, object]) -> list[bytes]:
    value = case["proof"] or []
    assert isinstance(value, list)
    return [_b(p) for p in value]


@pytest.mark.parametrize(("name", "case"), _cases("inclusion"), ids=lambda v: str(v)[:60])
def test_inclusion_vectors(name: str, case: dict[str, object]) -> None:
    args = (_b(case["leafHash"]), case["leafIdx"], case["treeSize"], _proof(case), _b(case["root"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)  # type: ignore[arg-type]
    else:
        verify_inclusion(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "case"), _cases("consistency"), ids=lambda v: str(v)[:60])
def test_consistency_vectors(name: str, case: dict[str, object]) -> None:
    args = (case["size1"], case["size2"], _proof(case), _b(case["root1"]), _b(case["root2"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)  # type: ignore[arg-type]
    else:
        verify_consistency(*args)  # type: ignore[arg-type]


def test_happy_vectors_are_the_proofs_this_module_builds() -> None:
    tree = MemoryTree()
    for leaf in CT_LEAVES:
        tree.append(leaf)
    seen = 0
    for _, case in _cases("inclusion"):
        if case["desc"] == "happy path":
            index, size = case["leafIdx"], case["treeSize"]
            assert isinstance(index, int) and isinstance(size, int)
            assert leaf_hash(CT_LEAVES[index]) == _b(case["leafHash"])
            assert tree.root(size) == _b(case["root"])
            assert tree.inclusion_proof(index, size) == _proof(case)
            seen += 1
    for _, case in _cases("consistency"):
        if case["desc"] == "happy path":
            m, n = case["size1"], case["size2"]
            assert isinstance(m, int) and isinstance(n, int)
            assert (tree.root(m), tree.root(n)) == (_b(case["root1"]), _b(case["root2"]))
            assert tree.consistency_proof(m, n) == _proof(case)
            seen += 1
    assert seen == 10


# --- the perfect-node model against the RFC recursion -------------------------------------------

def test_roots_and_proofs_equal_the_rfc_for_every_size_to_70() -> None:
    for n in range(1, 71):
        d = LEAVES[:n]
        assert TREE.root(n) == mth(d)
        for i in range(n):
            proof = TREE.inclusion_proof(i, n)
            assert proof == path(i, d)
            verify_inclusion(leaf_hash(d[i]), i, n, proof, mth(d))
        for m in range(1, n + 1):
            proof = TREE.consistency_proof(m, n)
            assert proof == subproof(m, d, True)
            verify_consistency(m, n, proof, mth(LEAVES[:m]), mth(d))


def test_larger_sizes_equal_the_rfc() -> None:
    rng = random.Random(19)
    for n in (127, 128, 129, 1000, 1024, 4097, rng.randrange(1, 4100), TREE.size):
        d = LEAVES[:n]
        assert TREE.root(n) == mth(d)
        for i in {0, n - 1, rng.randrange(n)}:
            assert TREE.inclusion_proof(i, n) == path(i, d)
        for m in {1, n, rng.randrange(1, n + 1)}:
            assert TREE.consistency_proof(m, n) == subproof(m, d, True)


def test_empty_tree_and_appends() -> None:
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == root([]) == MemoryTree().root()
    assert frontier(0) == []
    assert frontier(13) == [(3, 0), (2, 2), (0, 12)]
    assert appended_nodes(0, b"L" * 32, []) == [(0, 0, b"L" * 32)]
    # leaf 7 completes the pair (6, 7), the four 4..7 and the eight 0..7
    rows = appended_nodes(7, leaf_hash(data(7)), [TREE.nodes[n] for n in frontier(7)])
    assert [(level, idx) for level, idx, _ in rows] == [(0, 7), (1, 3), (2, 1), (3, 0)]
    assert rows[-1][2] == mth(LEAVES[:8])
    with pytest.raises(ValueError, match="frontier nodes"):
        appended_nodes(7, leaf_hash(b"x"), [])


def test_proof_requests_that_cannot_exist() -> None:
    with pytest.raises(ProofError, match="not in a tree of size 5"):
        inclusion_ranges(5, 5)
    with pytest.raises(ProofError, match="0 < first <= second"):
        consistency_ranges(0, 5)
    with pytest.raises(ProofError, match="0 < first <= second"):
        consistency_ranges(6, 5)
    with pytest.raises(ProofError, match="beyond the log's 4100"):
        TREE.inclusion_proof(0, 4101)
    with pytest.raises(ProofError, match=r"lacks node\(s\) \(level, idx\) \[\(0, 4\)\]"):
        proof_from(inclusion_ranges(5, 6), {})  # the first range it misses is leaf 4
    with pytest.raises(ValueError, match="not a subtree range"):
        range_nodes(1, 3)
    with pytest.raises(ValueError, match="empty range"):
        range_hash([])
    assert consistency_ranges(7, 7) == []


# --- tampering ----------------------------------------------------------------------------------

def _inclusion_shape(index: int, size: int) -> tuple[bool, ...] | None:
    """Which proof hashes sit left of the path: all a verifier computes from index and size.

    Two (index, size) pairs of one shape verify the same proofs against the same roots (leaf 0
    of 3 and of 4: [leaf 1, X] hashes alike), so RFC 9162 proofs do not bind the tree size:
    the signed tree head does. Every other tampered index or size must fail."""
    try:
        return tuple(b <= index for _, b in inclusion_ranges(index, size))
    except ProofError:
        return None


def _consistency_shape(m: int, n: int) -> tuple[bool, ...] | None:
    try:  # old-tree hashes enter both roots, new ones only the second; a power of two adds root1
        ranges = consistency_ranges(m, n)
    except ProofError:
        return None
    return (m & (m - 1) == 0, *(b <= m for _, b in ranges))


def _flip(h: bytes, bit: int = 0) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


def test_every_tampered_inclusion_proof_fails() -> None:
    for n in range(1, 40):
        head = TREE.root(n)
        for i in range(n):
            leaf, proof = leaf_hash(LEAVES[i]), TREE.inclusion_proof(i, n)
            for j in range(len(proof)):
                bad = list(proof)
                bad[j] = _flip(bad[j], j % 8)
                with pytest.raises(ProofError, match="does not lead to the root"):
                    verify_inclusion(leaf, i, n, bad, head)
            for index, size in ((i + 1, n), (i - 1, n), (i, n + 1), (i, n - 1), (i ^ 2, n)):
                if (index, size) == (i, n) or index < 0:
                    continue
                if _inclusion_shape(index, size) == _inclusion_shape(i, n):
                    verify_inclusion(leaf, index, size, proof, head)  # see _inclusion_shape
                    continue
                with pytest.raises(ProofError):
                    verify_inclusion(leaf, index, size, proof, head)
            with pytest.raises(ProofError):
                verify_inclusion(_flip(leaf), i, n, proof, head)
            with pytest.raises(ProofError):
                verify_inclusion(leaf, i, n, proof, _flip(head))
            with pytest.raises(ProofError, match="expected"):
                verify_inclusion(leaf, i, n, [*proof, head], head)
            if proof:
                with pytest.raises(ProofError, match="expected"):
                    verify_inclusion(leaf, i, n, proof[:-1], head)


def test_every_tampered_consistency_proof_fails() -> None:
    for n in range(2, 40):
        for m in range(1, n):
            r1, r2, proof = TREE.root(m), TREE.root(n), TREE.consistency_proof(m, n)
            for j in range(len(proof)):
                bad = list(proof)
                bad[j] = _flip(bad[j], j % 8)
                with pytest.raises(ProofError, match="does not lead to the root"):
                    verify_consistency(m, n, bad, r1, r2)
            for size1, size2 in ((m + 1, n), (m - 1, n), (m, n + 1), (m, n - 1), (m ^ 2, n)):
                if (size1, size2) == (m, n) or size1 < 0:
                    continue
                if _consistency_shape(size1, size2) == _consistency_shape(m, n):
                    verify_consistency(size1, size2, proof, r1, r2)  # see _inclusion_shape
                    continue
                with pytest.raises(ProofError):
                    verify_consistency(size1, size2, proof, r1, r2)
            with pytest.raises(ProofError):
                verify_consistency(m, n, proof, _flip(r1), r2)
            with pytest.raises(ProofError):
                verify_consistency(m, n, proof, r1, _flip(r2))
            with pytest.raises(ProofError):
                verify_consistency(m, n, proof, r2, r1)
            with pytest.raises(ProofError, match="expected"):
                verify_consistency(m, n, proof[:-1], r1, r2)


def test_consistency_edge_cases_say_why() -> None:
    r = TREE.root(5)
    verify_consistency(5, 5, [], r, r)
    with pytest.raises(ProofError, match="forked"):
        verify_consistency(5, 5, [], r, TREE.root(4))
    with pytest.raises(ProofError, match="empty proof"):
        verify_consistency(5, 5, [r], r, r)
    with pytest.raises(ProofError, match="empty tree proves nothing"):
        verify_consistency(0, 5, [], EMPTY_ROOT, r)
    with pytest.raises(ProofError, match="between 0 and size2"):
        verify_consistency(6, 5, [], r, r)
    with pytest.raises(ProofError, match="not 32"):
        verify_inclusion(b"short", 0, 1, [], r)


# --- properties ---------------------------------------------------------------------------------

sizes = st.integers(min_value=1, max_value=TREE.size)


@settings(max_examples=150, deadline=None)
@given(n=sizes, data=st.data())
def test_any_inclusion_proof_verifies_from_few_rows(n: int, data: st.DataObject) -> None:
    i = data.draw(st.integers(min_value=0, max_value=n - 1))
    ranges = inclusion_ranges(i, n)
    rows = needed_nodes(ranges)
    assert len(rows) <= 2 * n.bit_length()
    proof = proof_from(ranges, {node: TREE.nodes[node] for node in rows})
    verify_inclusion(leaf_hash(LEAVES[i]), i, n, proof, TREE.root(n))


@settings(max_examples=150, deadline=None)
@given(n=sizes, data=st.data())
def test_any_consistency_proof_verifies_from_few_rows(n: int, data: st.DataObject) -> None:
    m = data.draw(st.integers(min_value=1, max_value=n))
    ranges = consistency_ranges(m, n)
    rows = needed_nodes(ranges)
    assert len(rows) <= 2 * n.bit_length()
    proof = proof_from(ranges, {node: TREE.nodes[node] for node in rows})
    verify_consistency(m, n, proof, TREE.root(m), TREE.root(n))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=0, max_value=2**40))
def test_frontier_covers_the_tree_with_one_node_per_set_bit(n: int) -> None:
    nodes = frontier(n)
    assert len(nodes) == n.bit_count()
    start = 0
    for level, idx in nodes:
        assert idx << level == start
        start += 1 << level
    assert start == n


@settings(max_examples=100, deadline=None)
@given(left=st.binary(min_size=32, max_size=32), right=st.binary(min_size=32, max_size=32))
def test_domain_separation(left: bytes, right: bytes) -> None:
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert node_hash(left, right) != leaf_hash(left + right)
