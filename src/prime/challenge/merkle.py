"""Merkle commitment over the rows of C.

Encoding (part of the protocol):

* a row's canonical bytes are its n values as little-endian IEEE float32 (``<f4``);
  float16/bfloat16 results are widened to float32 first, which is exact;
* leaf  = sha256(0x00 || canonical row bytes)
* node  = sha256(0x01 || left || right)
* the leaves are padded up to the next power of two with sha256(0x02), so a tree over n
  rows has depth ceil(log2 n) and a proof is exactly that many sibling hashes, listed
  from the leaf level upwards. Bit d of the row index says whether the running hash is
  the right (1) or left (0) child at level d.

Domain-separation bytes keep a leaf from ever being passed off as an inner node.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from prime.challenge.generator import worker_count

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
PAD_LEAF = hashlib.sha256(b"\x02").digest()
ROW_DTYPE = np.dtype("<f4")


def canonical_row_bytes(row: np.ndarray) -> bytes:
    """The bytes a row is committed as: float32 little-endian."""
    return np.ascontiguousarray(row, dtype=ROW_DTYPE).tobytes()


def leaf_hash(row_bytes: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + row_bytes).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def row_leaf(row: np.ndarray) -> bytes:
    return leaf_hash(canonical_row_bytes(row))


def _leaf_of_contiguous(row: np.ndarray) -> bytes:
    h = hashlib.sha256(LEAF_PREFIX)
    h.update(memoryview(row))  # no copy; hashlib releases the GIL on large buffers
    return h.digest()


def hash_rows(matrix: np.ndarray, *, threads: int | None = None) -> list[bytes]:
    """Leaf hashes of every row of a float32 matrix, hashed in parallel threads."""
    rows = np.ascontiguousarray(matrix, dtype=ROW_DTYPE)
    threads = threads or worker_count()
    if threads <= 1 or rows.shape[0] < 64:
        return [_leaf_of_contiguous(r) for r in rows]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(_leaf_of_contiguous, rows, chunksize=max(1, rows.shape[0] // (threads * 8))))


def tree_depth(leaf_count: int) -> int:
    if leaf_count < 1:
        raise ValueError("a Merkle tree needs at least one leaf")
    return (leaf_count - 1).bit_length()


@dataclass
class MerkleTree:
    """All levels of the tree; levels[0] are the padded leaves, levels[-1] == [root]."""

    leaf_count: int
    levels: list[list[bytes]]

    @classmethod
    def from_leaves(cls, leaves: list[bytes]) -> "MerkleTree":
        depth = tree_depth(len(leaves))
        level = list(leaves) + [PAD_LEAF] * ((1 << depth) - len(leaves))
        levels = [level]
        while len(level) > 1:
            level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
            levels.append(level)
        return cls(leaf_count=len(leaves), levels=levels)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def path(self, index: int) -> list[bytes]:
        """Sibling hashes from the leaf level up to (not including) the root."""
        if not 0 <= index < self.leaf_count:
            raise IndexError(f"row {index} is outside 0..{self.leaf_count - 1}")
        out = []
        for level in self.levels[:-1]:
            out.append(level[index ^ 1])
            index >>= 1
        return out


def root_from_path(leaf: bytes, index: int, path: list[bytes]) -> bytes:
    running = leaf
    for sibling in path:
        running = node_hash(sibling, running) if index & 1 else node_hash(running, sibling)
        index >>= 1
    return running


def verify_path(leaf: bytes, index: int, path: list[bytes], root: bytes, leaf_count: int) -> bool:
    """True when ``path`` proves ``leaf`` sits at ``index`` of the tree with ``root``."""
    if not 0 <= index < leaf_count or len(path) != tree_depth(leaf_count):
        return False
    if any(not isinstance(p, bytes) or len(p) != 32 for p in path):
        return False
    return root_from_path(leaf, index, path) == root
