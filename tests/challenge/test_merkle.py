"""Merkle commitment over rows: proofs verify, and anything tampered does not."""

from __future__ import annotations

import numpy as np
import pytest

from prime.challenge.merkle import (
    MerkleTree,
    canonical_row_bytes,
    hash_rows,
    row_leaf,
    tree_depth,
    verify_many,
    verify_path,
)


def matrix(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64])
def test_every_row_proves_against_the_root(n: int) -> None:
    c = matrix(n)
    tree = MerkleTree.from_leaves(hash_rows(c))
    for i in range(n):
        path = tree.path(i)
        assert len(path) == tree_depth(n)
        assert verify_path(row_leaf(c[i]), i, path, tree.root, n)


def test_tampering_is_detected() -> None:
    n = 13
    c = matrix(n)
    tree = MerkleTree.from_leaves(hash_rows(c))
    path = tree.path(6)
    changed = c[6].copy()
    changed[3] = np.nextafter(changed[3], np.float32(np.inf))  # one ulp
    assert not verify_path(row_leaf(changed), 6, path, tree.root, n)
    assert not verify_path(row_leaf(c[6]), 7, path, tree.root, n)  # wrong position
    assert not verify_path(row_leaf(c[6]), 6, path[:-1], tree.root, n)  # short path
    assert not verify_path(row_leaf(c[6]), 6, path + [path[0]], tree.root, n)  # long path
    assert not verify_path(row_leaf(c[6]), 6, [bytes(32)] + path[1:], tree.root, n)
    assert not verify_path(row_leaf(c[6]), n, path, tree.root, n)  # padding slot is not a row
    assert not verify_path(row_leaf(c[6]), 6, path, tree.root, 17)  # a tree of another depth


def test_root_binds_every_row_and_the_order() -> None:
    c = matrix(9)
    root = MerkleTree.from_leaves(hash_rows(c)).root
    swapped = c[[1, 0, 2, 3, 4, 5, 6, 7, 8]]
    assert MerkleTree.from_leaves(hash_rows(swapped)).root != root
    d = c.copy()
    d[8, 0] += 1
    assert MerkleTree.from_leaves(hash_rows(d)).root != root


def test_canonical_encoding_is_float32_little_endian_and_threading_agrees() -> None:
    row = np.array([1.0, -2.5], dtype=np.float16)
    assert canonical_row_bytes(row) == np.array([1.0, -2.5], dtype="<f4").tobytes()
    c = matrix(300)
    assert hash_rows(c, threads=1) == hash_rows(c, threads=4)
    assert hash_rows(c)[5] == row_leaf(c[5])


def test_path_rejects_indices_outside_the_rows() -> None:
    tree = MerkleTree.from_leaves(hash_rows(matrix(5)))
    with pytest.raises(IndexError):
        tree.path(5)
    with pytest.raises(ValueError):
        MerkleTree.from_leaves([])


@pytest.mark.parametrize("n, rows", [(1, [0]), (13, [0, 1, 6, 12]), (64, list(range(0, 64, 3))), (64, list(range(64)))])
def test_batch_verification_agrees_with_single_proofs(n: int, rows: list[int]) -> None:
    c = matrix(n, seed=n)
    tree = MerkleTree.from_leaves(hash_rows(c))
    proofs = {i: (row_leaf(c[i]), tree.path(i)) for i in rows}
    assert verify_many(tree.root, n, proofs)
    bad_row = dict(proofs)
    changed = c[rows[-1]].copy()
    changed[0] += 1
    bad_row[rows[-1]] = (row_leaf(changed), proofs[rows[-1]][1])
    assert not verify_many(tree.root, n, bad_row)
    if n > 1:
        # a sibling hash that no other opened row supplies is needed, and checked
        lone = {rows[0]: (proofs[rows[0]][0], [bytes(32)] + proofs[rows[0]][1][1:])}
        assert not verify_many(tree.root, n, lone)
        assert not verify_many(tree.root, n, {rows[0]: (proofs[rows[0]][0], proofs[rows[0]][1][:-1])})
    assert not verify_many(bytes(32), n, proofs)
    assert not verify_many(tree.root, n, {})
    assert not verify_many(tree.root, n, {n: proofs[rows[0]]})
