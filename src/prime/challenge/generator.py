"""Counter-based generator for the challenge matrices A (n × K) and B (K × n).

Definition (the protocol; every backend must produce exactly these values)::

    fmix32(x)      = murmur3's 32-bit finalizer, arithmetic mod 2**32:
                     x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    salt(s, M, X)  = fmix32(lo32(s) ^ fmix32(hi32(s) ^ fmix32(0x9E3779B9 * (1 + 2*M + X) mod 2**32)))
    key(s, M, X, t) = fmix32(salt(s, M, X) ^ fmix32(t))        # t = row (X=0) or column (X=1) index
    nibble(s, M, i, j) = top 4 bits of fmix32(key(s, M, 0, i) ^ key(s, M, 1, j)), read as a
                     signed 4-bit integer in [-8, 7]
    element(s, M, i, j) = nibble(s, M, i, j) / 16             # M = 0 for A, 1 for B

Keys are one hash per row and per column (O(n) work), so one row of A, one column of B,
or one element, costs O(K) or O(1) — that is what lets the validator check an entry of
C = A·B in O(K) without building the matrices. The final ``x ^= x >> 16`` of fmix32
never changes the top 4 bits, so the vectorised code below skips it.

Why 4-bit values scaled by 1/16: every element has at most 3 significant bits, so it is
exact in float32, TF32, float16 and bfloat16; every product is a multiple of 2**-8 with
magnitude ≤ 1/4; for K ≤ 2**17 every partial sum in *any* order is a multiple of 2**-8
with magnitude ≤ 2**15, i.e. an integer times 2**-8 below 2**23 — exactly representable
in float32. So a float32 matmul (CPU BLAS, cuBLAS with or without TF32) computes C
exactly, whatever its blocking or summation order, and half-precision outputs differ
from the exact value by one final rounding only. See ``verifier.tolerance``.

Two implementations of the same arithmetic live here: ``uint32`` (numpy and cupy, where
uint32 multiply wraps mod 2**32 and shifts are logical) and ``int64`` (torch, which lacks
complete uint32 support): the multiply is split into 16-bit halves so no intermediate
ever exceeds 2**49 and nothing relies on signed overflow.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

MASK32 = 0xFFFFFFFF
MIX1 = 0x85EBCA6B
MIX2 = 0xC2B2AE35
GOLDEN = 0x9E3779B9
MATRIX_A = 0
MATRIX_B = 1
AXIS_ROW = 0
AXIS_COL = 1
VALUE_SCALE = 1.0 / 16.0  # element = nibble * VALUE_SCALE
PRODUCT_SCALE = 1.0 / 256.0  # (nibble_a * nibble_b) * PRODUCT_SCALE = a * b

# Elements per generation chunk: 256 Ki uint32 = 1 MiB per scratch buffer, near cache
# sized; much smaller chunks pay numpy's per-call overhead, larger ones gain nothing.
CHUNK_ELEMENTS = 1 << 18
# Below this many elements one thread is faster: numpy releases the GIL per call, and
# with short calls two threads mostly wait for each other to hand it back.
THREADED_MIN_ELEMENTS = 1 << 22

_U32_MIX1 = np.uint32(MIX1)
_U32_MIX2 = np.uint32(MIX2)


# ---------------------------------------------------------------- pure-Python reference
def fmix32(x: int) -> int:
    """murmur3 fmix32 on a Python int (the specification; slow, used for keys and tests)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX1) & MASK32
    x ^= x >> 13
    x = (x * MIX2) & MASK32
    x ^= x >> 16
    return x


def axis_salt(seed: int, matrix: int, axis: int) -> int:
    """32-bit salt for one (seed, matrix, axis); the seed is up to 64 bits."""
    tag = (GOLDEN * (1 + 2 * matrix + axis)) & MASK32
    return fmix32((seed & MASK32) ^ fmix32(((seed >> 32) & MASK32) ^ fmix32(tag)))


def element_nibble(seed: int, matrix: int, i: int, j: int) -> int:
    """Reference value of one element as a signed nibble in [-8, 7] (pure Python)."""
    row_key = fmix32(axis_salt(seed, matrix, AXIS_ROW) ^ fmix32(i))
    col_key = fmix32(axis_salt(seed, matrix, AXIS_COL) ^ fmix32(j))
    top = fmix32(row_key ^ col_key) >> 28
    return top - 16 if top >= 8 else top


def element(seed: int, matrix: int, i: int, j: int) -> float:
    """Reference value of element (i, j) of matrix A (0) or B (1)."""
    return element_nibble(seed, matrix, i, j) * VALUE_SCALE


# ---------------------------------------------------------------- vectorised keys
def _fmix32_u32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32, copy=True)
    x ^= x >> np.uint32(16)
    x *= _U32_MIX1
    x ^= x >> np.uint32(13)
    x *= _U32_MIX2
    x ^= x >> np.uint32(16)
    return x


def axis_keys(seed: int, matrix: int, axis: int, indices: Any) -> np.ndarray:
    """uint32 keys of the given row (axis 0) or column (axis 1) indices of one matrix."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() > MASK32):
        raise ValueError("generator indices must lie in [0, 2**32)")
    return _fmix32_u32(np.uint32(axis_salt(seed, matrix, axis)) ^ _fmix32_u32(idx.astype(np.uint32)))


def matrix_keys(seed: int, matrix: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Row keys and column keys of a whole rows × cols matrix."""
    return (axis_keys(seed, matrix, AXIS_ROW, np.arange(rows)),
            axis_keys(seed, matrix, AXIS_COL, np.arange(cols)))


# ---------------------------------------------------------------- uint32 path (numpy, cupy)
def nibbles_uint32(xp: Any, row_keys: Any, col_keys: Any) -> Any:
    """Signed nibbles (int32 array, shape rows × cols) for uint32 key vectors; xp = numpy or cupy."""
    z = xp.bitwise_xor(row_keys[:, None], col_keys[None, :])
    z ^= z >> xp.uint32(16)
    z *= xp.uint32(MIX1)
    z ^= z >> xp.uint32(13)
    z *= xp.uint32(MIX2)
    return z.view(xp.int32) >> 28  # arithmetic shift = top nibble as a signed int


def nibbles_into(row_keys: np.ndarray, col_keys: np.ndarray, out: np.ndarray,
                 z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Write the nibbles for the given keys into ``out`` (any numeric dtype).

    z and t are uint32 scratch arrays of out's shape; passing them in lets callers reuse
    cache-sized buffers instead of allocating (and page-faulting) per call.
    """
    np.bitwise_xor(row_keys[:, None], col_keys[None, :], out=z)
    np.right_shift(z, 16, out=t)
    z ^= t
    z *= _U32_MIX1
    np.right_shift(z, 13, out=t)
    z ^= t
    z *= _U32_MIX2
    # arithmetic shift of the int32 view = signed top nibble, cast straight into out
    np.right_shift(z.view(np.int32), 28, out=out, casting="unsafe")
    return out


def _fill_rows(row_keys: np.ndarray, col_keys: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
    """Write nibbles of rows [start, stop) into out using cache-sized scratch."""
    cols = col_keys.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    z = np.empty((min(step, stop - start), cols), dtype=np.uint32)
    t = np.empty_like(z)
    for s in range(start, stop, step):
        e = min(stop, s + step)
        nibbles_into(row_keys[s:e], col_keys, out[s:e], z[: e - s], t[: e - s])


def worker_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def fill_nibbles(row_keys: np.ndarray, col_keys: np.ndarray, out: np.ndarray | None = None,
                 *, dtype: Any = np.float32, threads: int | None = None) -> np.ndarray:
    """The unscaled matrix (signed nibbles as floats, exact) for the given keys.

    numpy's element-wise kernels release the GIL, so row bands run in parallel threads.
    """
    rows, cols = row_keys.shape[0], col_keys.shape[0]
    if out is None:
        out = np.empty((rows, cols), dtype=dtype)
    threads = threads or (worker_count() if rows * cols >= THREADED_MIN_ELEMENTS else 1)
    bands = min(threads, max(1, rows * cols // (4 * CHUNK_ELEMENTS)), rows) or 1
    if bands <= 1:
        _fill_rows(row_keys, col_keys, out, 0, rows)
        return out
    edges = [int(edge) for edge in np.linspace(0, rows, bands + 1)]
    with ThreadPoolExecutor(max_workers=bands) as pool:
        list(pool.map(lambda b: _fill_rows(row_keys, col_keys, out, edges[b], edges[b + 1]), range(bands)))
    return out


def matrix_nibbles(seed: int, matrix: int, rows: Any, cols: Any, *, dtype: Any = np.float32) -> np.ndarray:
    """Nibbles of the sub-matrix at the given row and column indices (numpy)."""
    return fill_nibbles(axis_keys(seed, matrix, AXIS_ROW, rows), axis_keys(seed, matrix, AXIS_COL, cols),
                        dtype=dtype)


def matrix_values(seed: int, matrix: int, rows: Any, cols: Any) -> np.ndarray:
    """Element values (float32) of the sub-matrix at the given row and column indices."""
    return matrix_nibbles(seed, matrix, rows, cols) * np.float32(VALUE_SCALE)


# ---------------------------------------------------------------- int64 path (torch)
def _mul32(x: Any, constant: int) -> Any:
    """x * constant mod 2**32 for 0 <= x < 2**32 without any intermediate above 2**49."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def nibbles_int64(row_keys: Any, col_keys: Any) -> Any:
    """Same values as ``nibbles_uint32`` using only int64 operators (torch, or numpy for tests).

    row_keys: int64 column vector (rows × 1); col_keys: int64 row vector (1 × cols); both
    hold the uint32 keys as non-negative values, so ``>>`` is a logical shift here.
    """
    z = row_keys ^ col_keys
    z = z ^ (z >> 16)
    z = _mul32(z, MIX1)
    z = z ^ (z >> 13)
    z = _mul32(z, MIX2)
    top = z >> 28
    return top - ((top >> 3) << 4)  # top >= 8 → top - 16
