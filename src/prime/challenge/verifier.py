"""Validator side checks, each a pure function returning None (passed) or one sentence.

Cost: for k sampled rows and m entries per row the validator generates k rows of A and
k·m columns of B (O((k + k·m)·K) element hashes, whatever the number of parts: the rows
are drawn over all of them), hashes the k opened rows (O(k·n)) and takes k·m dot products
of length K — never a matrix.

Tolerance (docs/protocol.md "Tolerance" has the argument with numbers). Elements are
exact in the challenge's dtype and use all of its significand (generator.py), products are
exact in float32 for half-precision inputs and in float64 for float32 ones, so the
validator's float64 reference c = Σ a·b is exact up to ~K·2**-53 — far below anything
here. An honest prover differs from c by its float32 accumulation, about
2**-24·sqrt(K/6)·s for sequential round-to-nearest (s = sqrt(Σ (a·b)²), the entry's
natural scale), plus the final rounding to the output dtype, ≤ u·|c|. We accept

    |got - c| ≤ 2·u·|c| + ACC·s,   ACC = 4·sqrt(K)·2**-24 (float32), 2**-12 (half precision)

(the factor 2 admits hardware that truncates instead of rounding; for float32, 4·sqrt(K)
is about 10 standard deviations of sequential accumulation and 15× the largest error
measured with OpenBLAS; 2**-12 for half precision covers tensor cores that truncate while
they accumulate, as long as one GEMM call sums at most params.HALF_CHUNK_MAX of K, which the
torch prover keeps to). A product whose inputs were rounded to fewer bits than the dtype's —
TF32, float16 or bfloat16 units answering a float32 challenge, fp8 or int8 answering a
float16 one — is off by about 0.5·2**-b·s (one standard deviation; b the units' significand
bits): 2**-12·s for 11 bits against ACC·s = 2**-14·s at K = 2**16 (4× over), so nearly
every checked entry fails (tests/challenge/test_dtype_units.py).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from prime.challenge import generator as gen
from prime.challenge.merkle import NotInDtype, row_leaf, verify_many, verify_path
from prime.challenge.params import UNIT_ROUNDOFF, ChallengeParams
from prime.challenge.prover import RowOpening

TOLERANCE_FACTOR = 2.0  # on the output rounding: admits truncating hardware
ACC_SIGMAS = 4.0  # float32: ACC = 4·sqrt(K)·2**-24 (≈ 10 σ of honest sequential accumulation)
HALF_ACCUMULATION = 2.0**-12  # float16/bfloat16 challenges (float32 accumulation on tensor cores)


@dataclass(frozen=True)
class Draw:
    """One sampled row and the columns checked in it."""

    row: int
    cols: tuple[int, ...]


def draw_samples(n: int, k: int, m: int, rng: secrets.SystemRandom | None = None, *,
                 rows: int | None = None) -> list[Draw]:
    """k rows of ``rows`` (default n; a challenge's parts·n) drawn uniformly and independently
    (with replacement), m of the n columns in each.

    Independent uniform rows are what the (1 - f)**k bound assumes — over every part's rows
    at once, so a prover that skips one part of P has a fraction 1/P of its entries wrong;
    duplicates only happen when k is comparable to the rows and then cost nothing extra to open.
    """
    rng = rng or secrets.SystemRandom()
    rows = n if rows is None else rows
    return [Draw(row=rng.randrange(rows), cols=tuple(rng.randrange(n) for _ in range(m))) for _ in range(k)]


def rows_to_open(draws: Iterable[Draw]) -> list[int]:
    return sorted({d.row for d in draws})


# Elements of A or B generated per step of the entry check: 256 KiB buffers, reused,
# because fresh multi-megabyte arrays cost more in page faults than the hashing itself.
ENTRY_CHUNK = 1 << 16


def reference_entries(params: ChallengeParams, draws: list[Draw]) -> tuple[np.ndarray, np.ndarray]:
    """(c, s) for every draw, each of shape (len(draws), m), float64: c = C[row, col] as the
    exact sum of the exact products, s = sqrt(Σ (a·b)²) over the inner dimension. Row
    p·n + i is row i of part p's C_p (generator.part_matrix)."""
    m = len(draws[0].cols) if draws else 0
    if any(len(d.cols) != m for d in draws):
        raise ValueError("every draw must check the same number of columns")
    sums = np.empty((len(draws), m), np.float64)
    scales = np.empty((len(draws), m), np.float64)
    n = params.n
    for part in sorted({d.row // n for d in draws}):
        where = [i for i, d in enumerate(draws) if d.row // n == part]
        c, s = _part_entries(params, part, [Draw(row=draws[i].row % n, cols=draws[i].cols) for i in where], m)
        sums[where], scales[where] = c, s
    return sums, scales


def _part_entries(params: ChallengeParams, part: int, draws: list[Draw], m: int) -> tuple[np.ndarray, np.ndarray]:
    """reference_entries for draws whose rows are rows of part ``part``'s C_p."""
    k_inner, seed, bits = params.inner, params.seed, gen.bits_of(params.dtype)
    ma, mb = gen.part_matrix(part, gen.MATRIX_A), gen.part_matrix(part, gen.MATRIX_B)
    inner = np.arange(k_inner)
    a_cols = gen.axis_keys(seed, ma, gen.AXIS_COL, inner)
    b_rows = gen.axis_keys(seed, mb, gen.AXIS_ROW, inner)
    a_rows = gen.axis_keys(seed, ma, gen.AXIS_ROW, [d.row for d in draws])
    # columns of B as rows of Bᵀ: Bᵀ[j, t] = z(colkey_B(j) ^ rowkey_B(t)), xor is symmetric
    b_cols = gen.axis_keys(seed, mb, gen.AXIS_COL, [c for d in draws for c in d.cols])
    step = max(1, ENTRY_CHUNK // k_inner)  # draws per step
    a = np.empty((step, k_inner), np.float64)
    bt = np.empty((step * m, k_inner), np.float64)
    z = np.empty((step * max(m, 1), k_inner), np.uint32)
    t = np.empty_like(z)
    sums = np.empty((len(draws), m), np.float64)
    scales = np.empty((len(draws), m), np.float64)
    for s in range(0, len(draws), step):
        e = min(len(draws), s + step)
        rows, cols = e - s, (e - s) * m
        gen.ints_into(a_rows[s:e], a_cols, a[:rows], z[:rows], t[:rows], bits)
        gen.ints_into(b_cols[s * m:e * m], b_rows, bt[:cols], z[:cols], t[:cols], bits)
        # q products have at most 48 bits: exact in float64; the sum's error is ~K·2**-53
        prod = bt[:cols].reshape(rows, m, k_inner) * a[:rows, None, :]
        sums[s:e] = prod.sum(axis=-1)
        np.multiply(prod, prod, out=prod)
        scales[s:e] = np.sqrt(prod.sum(axis=-1))
    unit = gen.value_scale(2 * bits)
    return sums * unit, scales * unit


def exact_entries(params: ChallengeParams, draws: list[Draw]) -> np.ndarray:
    """C[row, col] for every draw, shape (len(draws), m), as float64 (see reference_entries)."""
    return reference_entries(params, draws)[0]


def accumulation_allowance(dtype: str, inner: int) -> float:
    """ACC: the accumulation error allowed per unit of s (module docstring)."""
    if dtype == "float32":
        return ACC_SIGMAS * math.sqrt(inner) * UNIT_ROUNDOFF["float32"]
    return HALF_ACCUMULATION


def tolerance(expected: np.ndarray, dtype: str, scale: np.ndarray | None = None, inner: int = 1) -> np.ndarray:
    """|got - c| allowed: 2·u·|c| + ACC·s (s = ``scale``; without one, the rounding term only)."""
    rounding = TOLERANCE_FACTOR * UNIT_ROUNDOFF[dtype] * np.abs(expected)
    if scale is None:
        return rounding
    return rounding + accumulation_allowance(dtype, inner) * np.asarray(scale)


def check_openings(root: bytes, n: int, requested: list[int],
                   openings: Mapping[int, RowOpening], *, rows: int | None = None,
                   dtype: str = "float32") -> str | None:
    """Every requested row opened, of length n, holding values of ``dtype``, and consistent
    with the root committed over ``rows`` rows (default n; a challenge's parts·n)."""
    rows = n if rows is None else rows
    missing = [r for r in requested if r not in openings]
    if missing:
        return f"the miner did not open row {missing[0]}"
    extra = sorted(set(openings) - set(requested))
    if extra:
        return f"the miner opened row {extra[0]} which was not requested"
    if not requested:
        return None
    proofs = {}
    for r in requested:
        opening = openings[r]
        if opening.values.shape != (n,):
            return f"row {r} has {opening.values.size} values instead of {n}"
        try:
            proofs[r] = (row_leaf(opening.values, dtype), opening.path)
        except NotInDtype:
            return f"row {r} holds values that are not {dtype} values, so it cannot be the committed row"
    if verify_many(root, rows, proofs):
        return None
    for r, (leaf, path) in proofs.items():  # name the first row that fails on its own
        if not verify_path(leaf, r, path, root, rows):
            return f"row {r} does not match the committed Merkle root"
    return "the opened rows do not match the committed Merkle root"


def check_entries(params: ChallengeParams, draws: list[Draw],
                  openings: Mapping[int, RowOpening]) -> str | None:
    """Recompute the sampled entries from the generator and compare within the tolerance."""
    if not draws:
        return None
    present = [d for d in draws if d.row in openings]
    if len(present) != len(draws):
        missing = next(d.row for d in draws if d.row not in openings)
        return f"row {missing} was not opened, so its entries cannot be checked"
    for d in draws:
        if openings[d.row].values.shape != (params.n,):
            return f"row {d.row} has the wrong length"
    expected, scale = reference_entries(params, draws)
    got = np.array([[openings[d.row].values[c] for c in d.cols] for d in draws], dtype=np.float64)
    bad = ~(np.abs(got - expected) <= tolerance(expected, params.dtype, scale, params.inner))  # NaN is bad
    if bad.any():
        di, ci = map(int, np.argwhere(bad)[0])
        d = draws[di]
        return (f"C[{d.row}, {d.cols[ci]}] is {float(got[di, ci])!r} but the generator gives "
                f"{float(expected[di, ci])!r} ({int(bad.sum())} of {bad.size} checked entries wrong)")
    return None


def check_time(elapsed_s: float, bound_s: float) -> str | None:
    if not elapsed_s <= bound_s:
        return f"the commitment took {elapsed_s:.3f} s, more than the {bound_s:.3f} s the claimed hardware needs"
    return None
