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
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from prime.challenge import generator as gen
from prime.challenge.merkle import row_leaf, verify_path
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


def exact_entries(params: ChallengeParams, draws: list[Draw]) -> np.ndarray:
    """Exact C[row, col] for every draw, shape (len(draws), m), as float64."""
    k_inner, seed = params.inner, params.seed
    inner = np.arange(k_inner)
    rows = np.array([d.row for d in draws], dtype=np.int64)
    cols = np.array([c for d in draws for c in d.cols], dtype=np.int64)
    m = len(draws[0].cols) if draws else 0
    a = gen.matrix_nibbles(seed, gen.MATRIX_A, rows, inner)  # len(draws) × K
    # columns of B as rows of Bᵀ: Bᵀ[j, t] = nibble(colkey_B(j) ^ rowkey_B(t)), xor is symmetric
    bt = gen.fill_nibbles(gen.axis_keys(seed, gen.MATRIX_B, gen.AXIS_COL, cols),
                          gen.axis_keys(seed, gen.MATRIX_B, gen.AXIS_ROW, inner), threads=1)
    # nibble products are integers ≤ 64 and |Σ| ≤ 64·K ≤ 2**23, so float32 sums are exact
    bt = bt.reshape(len(draws), m, k_inner)
    sums = np.einsum("dk,dmk->dm", a, bt, optimize=False)
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
    for r in requested:
        opening = openings[r]
        if opening.values.shape != (n,):
            return f"row {r} has {opening.values.size} values instead of {n}"
        if not verify_path(row_leaf(opening.values), r, opening.path, root, n):
            return f"row {r} does not match the committed Merkle root"
    return None


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
        return (f"C[{d.row}, {d.cols[ci]}] is {got[di, ci]!r} but the generator gives "
                f"{expected[di, ci]!r} ({int(bad.sum())} of {bad.size} checked entries wrong)")
    return None


def check_time(elapsed_s: float, bound_s: float) -> str | None:
    if not elapsed_s <= bound_s:
        return f"the commitment took {elapsed_s:.3f} s, more than the {bound_s:.3f} s the claimed hardware needs"
    return None
