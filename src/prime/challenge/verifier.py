"""Validator side checks, each a pure function returning None (passed) or one sentence.

Cost: for k sampled rows and m entries per row the validator generates k rows of A and
k·m columns of B (O((k + k·m)·K) element hashes), hashes the k opened rows (O(k·n)) and
takes k·m dot products of length K — never a matrix.

Tolerance (why the entry check is almost an equality). Every element is a nibble/16 with
at most 3 significant bits, every product a multiple of 2**-8 of magnitude ≤ 1/4, and
with K ≤ 2**17 every partial sum — in whatever order a BLAS, a GPU split-K or a tensor
core adds them — is a multiple of 2**-8 of magnitude ≤ 2**15, which float32 (24-bit
significand) holds exactly. So an honest float32 accumulation yields exactly
c = Σ a·b, which the validator computes exactly in integers. The only rounding left is
the final conversion of c to the challenge dtype: |round(c) - c| ≤ u·|c| with u the
dtype's unit roundoff (2**-24, 2**-11, 2**-8). We accept |got - c| ≤ 2·u·|c|: the factor
2 admits hardware that truncates instead of rounding to nearest (error < 1 ulp ≤ 2u|c|).
The classical worst-case bound for inexact summation, γ_K·Σ|a||b| with γ_K ≈ K·u, would
be up to K·|c| times wider and let a prover guess; exactness makes it unnecessary. For
float32 the check is equality.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from prime.challenge import generator as gen
from prime.challenge.merkle import row_leaf, verify_many, verify_path
from prime.challenge.params import UNIT_ROUNDOFF, ChallengeParams
from prime.challenge.prover import RowOpening

TOLERANCE_FACTOR = 2.0


@dataclass(frozen=True)
class Draw:
    """One sampled row and the columns checked in it."""

    row: int
    cols: tuple[int, ...]


def draw_samples(n: int, k: int, m: int, rng: secrets.SystemRandom | None = None) -> list[Draw]:
    """k rows drawn uniformly and independently (with replacement), m columns in each.

    Independent uniform rows are what the (1 - f)**k bound assumes; duplicates only
    happen when k is comparable to n and then cost nothing extra to open.
    """
    rng = rng or secrets.SystemRandom()
    return [Draw(row=rng.randrange(n), cols=tuple(rng.randrange(n) for _ in range(m))) for _ in range(k)]


def rows_to_open(draws: Iterable[Draw]) -> list[int]:
    return sorted({d.row for d in draws})


# Elements of A or B generated per step of the entry check: 256 KiB buffers, reused,
# because fresh multi-megabyte arrays cost more in page faults than the hashing itself.
ENTRY_CHUNK = 1 << 16


def exact_entries(params: ChallengeParams, draws: list[Draw]) -> np.ndarray:
    """Exact C[row, col] for every draw, shape (len(draws), m), as float64."""
    k_inner, seed = params.inner, params.seed
    m = len(draws[0].cols) if draws else 0
    if any(len(d.cols) != m for d in draws):
        raise ValueError("every draw must check the same number of columns")
    inner = np.arange(k_inner)
    a_cols = gen.axis_keys(seed, gen.MATRIX_A, gen.AXIS_COL, inner)
    b_rows = gen.axis_keys(seed, gen.MATRIX_B, gen.AXIS_ROW, inner)
    a_rows = gen.axis_keys(seed, gen.MATRIX_A, gen.AXIS_ROW, [d.row for d in draws])
    # columns of B as rows of Bᵀ: Bᵀ[j, t] = nibble(colkey_B(j) ^ rowkey_B(t)), xor is symmetric
    b_cols = gen.axis_keys(seed, gen.MATRIX_B, gen.AXIS_COL, [c for d in draws for c in d.cols])
    step = max(1, ENTRY_CHUNK // k_inner)  # draws per step
    a = np.empty((step, k_inner), np.float32)
    bt = np.empty((step * m, k_inner), np.float32)
    z = np.empty((step * max(m, 1), k_inner), np.uint32)
    t = np.empty_like(z)
    sums = np.empty((len(draws), m), np.float32)
    for s in range(0, len(draws), step):
        e = min(len(draws), s + step)
        rows, cols = e - s, (e - s) * m
        gen.nibbles_into(a_rows[s:e], a_cols, a[:rows], z[:rows], t[:rows])
        gen.nibbles_into(b_cols[s * m:e * m], b_rows, bt[:cols], z[:cols], t[:cols])
        # nibble products are integers ≤ 64 and |Σ| ≤ 64·K ≤ 2**23: float32 BLAS is exact
        sums[s:e] = np.matmul(bt[:cols].reshape(rows, m, k_inner), a[:rows, :, None])[:, :, 0]
    return sums.astype(np.float64) * gen.PRODUCT_SCALE


def tolerance(expected: np.ndarray, dtype: str) -> np.ndarray:
    return TOLERANCE_FACTOR * UNIT_ROUNDOFF[dtype] * np.abs(expected)


def check_openings(root: bytes, n: int, requested: list[int],
                   openings: Mapping[int, RowOpening]) -> str | None:
    """Every requested row opened, of length n, and consistent with the committed root."""
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
        proofs[r] = (row_leaf(opening.values), opening.path)
    if verify_many(root, n, proofs):
        return None
    for r, (leaf, path) in proofs.items():  # name the first row that fails on its own
        if not verify_path(leaf, r, path, root, n):
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
    expected = exact_entries(params, draws)
    got = np.array([[openings[d.row].values[c] for c in d.cols] for d in draws], dtype=np.float64)
    bad = ~(np.abs(got - expected) <= tolerance(expected, params.dtype))  # NaN counts as bad
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
