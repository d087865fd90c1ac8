"""Merkle commitment over the rows of C.

Encoding (part of the protocol):

* a row's canonical bytes are its n values in the challenge's dtype, little-endian:
  float32 ``<f4``, float16 ``<f2``, bfloat16 the upper 16 bits of the float32 (``<u2``).
  Half-precision rows hash half the bytes (the prover's host hashing is a fixed cost of
  the time bound, docs/protocol.md "Sizing"); on the wire a row is still float32, which
  is exact, and a row whose float32 values are not exactly values of its dtype has no
  canonical bytes (``committed_rows`` raises, the verifier rejects it);
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
from typing import Any

import numpy as np

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
PAD_LEAF = hashlib.sha256(b"\x02").digest()
ROW_DTYPE = np.dtype("<f4")  # rows on the wire and in the prover's float32 results
# What a row's values are committed as, per challenge dtype.
COMMITTED_DTYPE: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
                                             "bfloat16": np.dtype("<u2")}


class NotInDtype(ValueError):
    """Row values that are not exactly values of the challenge's dtype."""


def committed_rows(values: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """float32 values as the array of their committed encoding (COMMITTED_DTYPE), contiguous.

    NotInDtype when a value is not exactly one of the dtype's (a float16 challenge's rows
    hold float16 values; anything else could not have been committed).
    """
    f32 = np.ascontiguousarray(values, dtype=ROW_DTYPE)
    if dtype == "float32":
        return f32
    if dtype == "float16":
        with np.errstate(over="ignore"):  # a value past float16's range becomes inf: refused just below
            half = f32.astype(COMMITTED_DTYPE["float16"])
        back = half.astype(ROW_DTYPE)
    elif dtype == "bfloat16":
        bits = f32.view(np.uint32)
        half = (bits >> np.uint32(16)).astype(COMMITTED_DTYPE["bfloat16"])
        back = (half.astype(np.uint32) << np.uint32(16)).view(ROW_DTYPE)
    else:
        raise KeyError(dtype)
    if not np.array_equal(back.view(np.uint32), f32.view(np.uint32)):  # bitwise: NaN payloads, -0.0
        raise NotInDtype(f"row values are not exactly {dtype} values")
    return half


def row_values(committed: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """The float32 values of committed rows (exact): the inverse of committed_rows."""
    if dtype == "bfloat16":
        return (np.asarray(committed, np.uint32) << np.uint32(16)).view(ROW_DTYPE)
    return np.asarray(committed).astype(ROW_DTYPE)


def canonical_row_bytes(row: np.ndarray, dtype: str = "float32") -> bytes:
    """The bytes a row is committed as (its values in the dtype, little-endian)."""
    return committed_rows(row, dtype).tobytes()


def leaf_hash(row_bytes: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + row_bytes).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def row_leaf(row: np.ndarray, dtype: str = "float32") -> bytes:
    """Leaf hash of one row of float32 values (NotInDtype when they are not the dtype's)."""
    return _leaf_of_contiguous(committed_rows(row, dtype))


def _leaf_of_contiguous(row: np.ndarray) -> bytes:
    h = hashlib.sha256(LEAF_PREFIX)
    h.update(row.data)  # the array's own buffer (no copy); hashlib releases the GIL on large buffers
    return h.digest()


def hash_rows(matrix: np.ndarray, *, threads: int = 1) -> list[bytes]:
    """Leaf hashes of every row of a matrix already in its committed encoding (committed_rows).

    With ``threads`` > 1 each thread hashes one contiguous band of rows: hashlib releases
    the GIL while it hashes a row, so bands run in parallel and the only shared step is
    the few microseconds of Python per row.
    """
    rows = np.ascontiguousarray(matrix)
    if threads <= 1 or rows.shape[0] < 64:
        return [_leaf_of_contiguous(r) for r in rows]
    edges = [int(e) for e in np.linspace(0, rows.shape[0], threads + 1)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        bands = pool.map(lambda b: [_leaf_of_contiguous(r) for r in rows[edges[b]:edges[b + 1]]], range(threads))
        return [leaf for band in bands for leaf in band]


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
    def from_leaves(cls, leaves: list[bytes]) -> MerkleTree:
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


def verify_many(root: bytes, leaf_count: int, proofs: dict[int, tuple[bytes, list[bytes]]]) -> bool:
    """Check several (leaf, path) proofs at once, hashing each shared inner node once.

    Sound for the same reason a single proof is: the opened leaves and the siblings used
    hash up to ``root``, so by collision resistance each leaf sits at its index. Sibling
    entries of a path that are recomputed from other opened rows are simply not needed.
    """
    depth = tree_depth(leaf_count)
    digests: dict[int, bytes] = {}
    origins: dict[int, int] = {}
    for index, (leaf, path) in proofs.items():
        if not 0 <= index < leaf_count or len(path) != depth:
            return False
        if any(not isinstance(p, bytes) or len(p) != 32 for p in path):
            return False
        digests[index] = leaf
        origins[index] = index
    if not digests:
        return False
    sha256 = hashlib.sha256
    for d in range(depth):
        parent_digests: dict[int, bytes] = {}
        parent_origins: dict[int, int] = {}
        for index, digest in digests.items():
            parent = index >> 1
            if parent in parent_digests:
                continue
            sibling = digests.get(index ^ 1)
            if sibling is None:
                sibling = proofs[origins[index]][1][d]
            parent_digests[parent] = sha256(NODE_PREFIX + sibling + digest if index & 1
                                            else NODE_PREFIX + digest + sibling).digest()
            parent_origins[parent] = origins[index]
        digests, origins = parent_digests, parent_origins
    return digests.get(0) == root
