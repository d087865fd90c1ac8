"""The dtype proves its units: a product computed from inputs rounded to lower-precision units
fails the entry check (docs/protocol.md "Tolerance"); the honest float32 / float16 product passes.

The cheats below are generous to the cheater: its rounded inputs are multiplied and summed in
float64 (no accumulation error at all) and the result rounded once to the challenge's dtype,
so the only error left is the units' input rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from prime.challenge import generator as gen
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import MatmulProver, NumpyBackend, round_to_dtype
from tests.challenge.test_verifier import failing, run_locally

UNITS_BITS = {"tf32": 11, "float16": 11, "bfloat16": 8, "fp8_e4m3": 4}


def round_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """x rounded to nearest (ties to even) with ``bits`` significant bits (what a narrower format keeps)."""
    m, e = np.frexp(x)
    return np.ldexp(np.round(m * 2.0**bits) / 2.0**bits, e)


def int8_per_row(x: np.ndarray) -> np.ndarray:
    """Symmetric int8 quantisation with one scale per row (what an int8 GEMM would be fed)."""
    scale = np.abs(x).max(axis=1, keepdims=True) / 127
    return np.round(x / scale).clip(-127, 127) * scale


class LowPrecisionProver(MatmulProver):
    """Answers with A·B computed from inputs rounded as lower-precision units would hold them."""

    def __init__(self, units: str) -> None:
        super().__init__(NumpyBackend())
        self.units = units

    def narrow(self, x: np.ndarray, axis_rows: bool) -> np.ndarray:
        if self.units == "int8":
            return int8_per_row(x) if axis_rows else int8_per_row(x.T).T
        return round_bits(x, UNITS_BITS[self.units])

    def compute(self, params: ChallengeParams) -> np.ndarray:
        n, k = params.n, params.inner
        a = gen.matrix_values(params.seed, gen.MATRIX_A, np.arange(n), np.arange(k), params.dtype).astype(np.float64)
        b = gen.matrix_values(params.seed, gen.MATRIX_B, np.arange(k), np.arange(n), params.dtype).astype(np.float64)
        c = (self.narrow(a, True) @ self.narrow(b, False)).astype(np.float32)
        return round_to_dtype(c, params.dtype)


@pytest.mark.parametrize("repeat", [4, 64])  # K = 384 and 6144
def test_float32_challenge_passes_in_float32_and_fails_on_tf32_fp16_bf16_units(repeat: int) -> None:
    assert run_locally(MatmulProver(NumpyBackend()), dtype="float32", repeat=repeat).approved
    for units in ("tf32", "float16", "bfloat16"):
        report = run_locally(LowPrecisionProver(units), dtype="float32", repeat=repeat)
        assert failing(report) == ["entries"], (units, report.reason)
        wrong, checked = (int(x) for x in report.reason.split("(")[-1].split(" checked")[0].split(" of "))
        assert wrong > 0.5 * checked, (units, report.reason)  # most entries, not a lucky few


@pytest.mark.parametrize("repeat", [4, 64])
def test_float16_challenge_passes_in_float16_and_fails_on_fp8_int8_bf16_units(repeat: int) -> None:
    assert run_locally(MatmulProver(NumpyBackend()), dtype="float16", repeat=repeat).approved
    for units in ("fp8_e4m3", "int8", "bfloat16"):
        report = run_locally(LowPrecisionProver(units), dtype="float16", repeat=repeat)
        assert failing(report) == ["entries"], (units, report.reason)


def test_old_nibble_inputs_would_have_been_exact_in_fp8() -> None:
    # Why the generator changed: 4-bit nibbles / 16 are exact in fp8 e4m3, so fp8 units answered
    # a float16 challenge bit-exact. The new float16 elements are not.
    nibbles = np.arange(-8, 8) / 16
    assert np.array_equal(round_bits(nibbles, 4), nibbles)
    a = gen.matrix_values(1, gen.MATRIX_A, np.arange(64), np.arange(64), "float16").astype(np.float64)
    assert np.mean(round_bits(a, 4) != a) > 0.9
