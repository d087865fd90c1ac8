"""Counter-based generator for the challenge matrices A (n × K) and B (K × n).

Definition (the protocol; every backend must produce exactly these values)::

    fmix32(x)      = murmur3's 32-bit finalizer, arithmetic mod 2**32:
                     x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    salt(s, M, X)  = fmix32(lo32(s) ^ fmix32(hi32(s) ^ fmix32(0x9E3779B9 * (1 + 2*M + X) mod 2**32)))
    key(s, M, X, t) = fmix32(salt(s, M, X) ^ fmix32(t))        # t = row (X=0) or column (X=1) index
    z(s, M, i, j)  = fmix32(key(s, M, 0, i) ^ key(s, M, 1, j))  # M = 0 for A, 1 for B
    q(z, p)        = ±(2**(p-1) + the p-1 bits of z below its top bit), minus when z's top bit is set:
                     a signed integer with exactly p significant bits, 2**(p-1) <= |q| < 2**p
    element(s, M, i, j, p) = q(z, p) / 2**p                     # in ±[1/2, 1)

A challenge of several parts (one per claimed GPU) has an independent pair per part:
part p's A is matrix M = 2p and its B is M = 2p + 1 (``part_matrix``), so part 0 is the
single-part challenge and no two matrices of a challenge share a salt (M < 32, the tag
1 + 2M + X stays below 2**7).

p is the significand width of the challenge's dtype: 24 for float32, 11 for float16, 8 for
bfloat16 (SIGNIFICAND_BITS). Every element is exact in its dtype and *uses all of it*: a
float32 element has a random lowest significand bit, so rounding it to TF32 or float16
(11 bits) or bfloat16 (8) changes almost every element by up to 2**-11 (resp. 2**-8)
relative, and a float16 element is not representable in fp8 or int8. That is what makes
a product computed on lower-precision units wrong beyond the verifier's tolerance
(verifier.py, docs/protocol.md "Tolerance"): the dtype of the challenge is the dtype of
the units that must answer it.

Keys are one hash per row and per column (O(n) work), so one row of A, one column of B,
or one element, costs O(K) or O(1) — that is what lets the validator check an entry of
C = A·B in O(K) without building the matrices.

Two implementations of the same arithmetic live here: ``uint32`` (numpy and cupy, where
uint32 multiply wraps mod 2**32 and shifts are logical) and ``int64`` (torch, which lacks
complete uint32 support): the multiply is split into 16-bit halves so no intermediate
ever exceeds 2**49 and nothing relies on signed overflow. Both give q as an integer
(|q| < 2**24, exact in float32 and in the dtype); a backend converts q and scales by
2**-p (a power of two: exact).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from prime.protocol.challenge import MAX_PARTS

MASK32 = 0xFFFFFFFF
MIX1 = 0x85EBCA6B
MIX2 = 0xC2B2AE35
GOLDEN = 0x9E3779B9
MATRIX_A = 0
MATRIX_B = 1
AXIS_ROW = 0
AXIS_COL = 1
# Significand width p of each challenge dtype: its elements are q / 2**p with |q| of p bits.
SIGNIFICAND_BITS = {"float32": 24, "float16": 11, "bfloat16": 8}

# Elements per generation chunk: 256 Ki uint32 = 1 MiB per scratch buffer, near cache
# sized; much smaller chunks pay numpy's per-call overhead, larger ones gain nothing.
CHUNK_ELEMENTS = 1 << 18
# Below this many elements one thread is faster: numpy releases the GIL per call, and
# with short calls two threads mostly wait for each other to hand it back.
THREADED_MIN_ELEMENTS = 1 << 22

_U32_MIX1 = np.uint32(MIX1)
_U32_MIX2 = np.uint32(MIX2)


def part_matrix(part: int, matrix: int) -> int:
    """The generator's matrix index M of part ``part``'s A (matrix 0) or B (matrix 1)."""
    if not 0 <= part < MAX_PARTS or matrix not in (MATRIX_A, MATRIX_B):
        raise ValueError(f"a part lies in [0, {MAX_PARTS}) and a matrix is A (0) or B (1)")
    return 2 * part + matrix


def bits_of(dtype: str) -> int:
    """p for a dtype name (KeyError for an unknown one)."""
    return SIGNIFICAND_BITS[dtype]


def value_scale(bits: int) -> float:
    """element = q * value_scale(p) = q / 2**p."""
    return 2.0 ** -bits


def _q_of(z: int, bits: int) -> int:
    mag = (1 << (bits - 1)) | ((z >> (32 - bits)) & ((1 << (bits - 1)) - 1))
    return -mag if z >> 31 else mag


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


def element_int(seed: int, matrix: int, i: int, j: int, bits: int = 24) -> int:
    """Reference q of element (i, j): a signed integer of exactly ``bits`` significant bits (pure Python)."""
    row_key = fmix32(axis_salt(seed, matrix, AXIS_ROW) ^ fmix32(i))
    col_key = fmix32(axis_salt(seed, matrix, AXIS_COL) ^ fmix32(j))
    return _q_of(fmix32(row_key ^ col_key), bits)


def element(seed: int, matrix: int, i: int, j: int, dtype: str = "float32") -> float:
    """Reference value of element (i, j) of matrix A (0) or B (1) for a challenge in ``dtype``."""
    bits = bits_of(dtype)
    return element_int(seed, matrix, i, j, bits) * value_scale(bits)


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
def ints_uint32(xp: Any, row_keys: Any, col_keys: Any, bits: int = 24) -> Any:
    """q (int32 array, shape rows × cols) for uint32 key vectors; xp = numpy or cupy."""
    z = xp.bitwise_xor(row_keys[:, None], col_keys[None, :])
    z ^= z >> xp.uint32(16)
    z *= xp.uint32(MIX1)
    z ^= z >> xp.uint32(13)
    z *= xp.uint32(MIX2)
    z ^= z >> xp.uint32(16)
    sign = z.view(xp.int32) >> 31  # -1 where the top bit is set, else 0 (arithmetic shift)
    mag = ((z >> xp.uint32(32 - bits)) & xp.uint32((1 << (bits - 1)) - 1)) | xp.uint32(1 << (bits - 1))
    mag = mag.view(xp.int32)
    return (mag ^ sign) - sign  # two's complement negation where sign = -1


def ints_into(row_keys: np.ndarray, col_keys: np.ndarray, out: np.ndarray,
              z: np.ndarray, t: np.ndarray, bits: int = 24) -> np.ndarray:
    """Write q for the given keys into ``out`` (any numeric dtype that holds them exactly).

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
    np.right_shift(z, 16, out=t)
    z ^= t
    ti = t.view(np.int32)
    np.right_shift(z.view(np.int32), 31, out=ti)  # sign: -1 or 0
    np.right_shift(z, 32 - bits, out=z)
    z &= np.uint32((1 << (bits - 1)) - 1)
    z |= np.uint32(1 << (bits - 1))
    zi = z.view(np.int32)
    zi ^= ti
    np.subtract(zi, ti, out=out, casting="unsafe")
    return out


def _fill_rows(row_keys: np.ndarray, col_keys: np.ndarray, out: np.ndarray, start: int, stop: int,
               bits: int) -> None:
    """Write q of rows [start, stop) into out using cache-sized scratch."""
    cols = col_keys.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    z = np.empty((min(step, stop - start), cols), dtype=np.uint32)
    t = np.empty_like(z)
    for s in range(start, stop, step):
        e = min(stop, s + step)
        ints_into(row_keys[s:e], col_keys, out[s:e], z[: e - s], t[: e - s], bits)


def worker_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def fill_ints(row_keys: np.ndarray, col_keys: np.ndarray, out: np.ndarray | None = None,
              *, bits: int = 24, dtype: Any = np.float32, threads: int | None = None) -> np.ndarray:
    """The unscaled matrix (q as floats, exact: |q| < 2**24) for the given keys.

    numpy's element-wise kernels release the GIL, so row bands run in parallel threads.
    """
    rows, cols = row_keys.shape[0], col_keys.shape[0]
    if out is None:
        out = np.empty((rows, cols), dtype=dtype)
    threads = threads or (worker_count() if rows * cols >= THREADED_MIN_ELEMENTS else 1)
    bands = min(threads, max(1, rows * cols // (4 * CHUNK_ELEMENTS)), rows) or 1
    if bands <= 1:
        _fill_rows(row_keys, col_keys, out, 0, rows, bits)
        return out
    edges = [int(edge) for edge in np.linspace(0, rows, bands + 1)]
    with ThreadPoolExecutor(max_workers=bands) as pool:
        list(pool.map(lambda b: _fill_rows(row_keys, col_keys, out, edges[b], edges[b + 1], bits), range(bands)))
    return out


def matrix_ints(seed: int, matrix: int, rows: Any, cols: Any, *, bits: int = 24,
                dtype: Any = np.float32) -> np.ndarray:
    """q of the sub-matrix at the given row and column indices (numpy)."""
    return fill_ints(axis_keys(seed, matrix, AXIS_ROW, rows), axis_keys(seed, matrix, AXIS_COL, cols),
                     bits=bits, dtype=dtype)


def matrix_values(seed: int, matrix: int, rows: Any, cols: Any, dtype: str = "float32") -> np.ndarray:
    """Element values (float32, exact) of the sub-matrix at the given indices, for a challenge in ``dtype``."""
    bits = bits_of(dtype)
    return matrix_ints(seed, matrix, rows, cols, bits=bits) * np.float32(value_scale(bits))


# ---------------------------------------------------------------- int64 path (torch)
def _mul32(x: Any, constant: int) -> Any:
    """x * constant mod 2**32 for 0 <= x < 2**32 without any intermediate above 2**49."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def ints_int64(row_keys: Any, col_keys: Any, bits: int = 24) -> Any:
    """Same values as ``ints_uint32`` using only int64 operators (torch, or numpy for tests).

    row_keys: int64 column vector (rows × 1); col_keys: int64 row vector (1 × cols); both
    hold the uint32 keys as non-negative values, so ``>>`` is a logical shift here.
    """
    z = row_keys ^ col_keys
    z = z ^ (z >> 16)
    z = _mul32(z, MIX1)
    z = z ^ (z >> 13)
    z = _mul32(z, MIX2)
    z = z ^ (z >> 16)
    top = z >> (32 - bits)  # the top `bits` bits: sign, then bits-1 of significand
    sign = top >> (bits - 1)
    mag = (top & ((1 << (bits - 1)) - 1)) | (1 << (bits - 1))
    return mag - ((sign * mag) << 1)  # sign 1 → -mag
