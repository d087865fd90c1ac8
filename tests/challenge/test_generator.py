"""The generator: one definition, identical through every access path and backend."""

from __future__ import annotations

import numpy as np
import pytest

from prime.challenge import generator as gen
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import NumpyBackend, round_to_dtype

SEED = 0xDEADBEEF12345678
FIXED_Q24 = [9347490, 13866016, -16181808, -8516439]
FIXED_Q11 = [1398, -1627, -1949, 2016]


def full(seed: int, matrix: int, rows: int, cols: int, dtype: str = "float32") -> np.ndarray:
    return gen.matrix_values(seed, matrix, np.arange(rows), np.arange(cols), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_vectorised_matches_pure_python_reference(dtype: str) -> None:
    values = full(SEED, gen.MATRIX_A, 23, 37, dtype)
    reference = np.array([[gen.element(SEED, gen.MATRIX_A, i, j, dtype) for j in range(37)] for i in range(23)])
    assert np.array_equal(values, reference)


def test_fixed_vector() -> None:
    # Pins the definition (generator.py docstring). These values changed with issue 12: the
    # elements used to be 4-bit nibbles / 16 (exact in fp8); they are now q / 2**p with
    # exactly p = 24 (float32) or 11 (float16) significant bits.
    assert [gen.element_int(SEED, gen.MATRIX_A, 0, j, 24) for j in range(4)] == FIXED_Q24
    assert [gen.element_int(SEED, gen.MATRIX_B, 5, j, 11) for j in range(4)] == FIXED_Q11


def test_single_elements_rows_and_columns_match_the_full_matrix() -> None:
    a = full(SEED, gen.MATRIX_B, 64, 200)
    for i, j in [(0, 0), (63, 199), (17, 101)]:
        assert gen.matrix_values(SEED, gen.MATRIX_B, [i], [j])[0, 0] == a[i, j]
    assert np.array_equal(gen.matrix_values(SEED, gen.MATRIX_B, [40], np.arange(200))[0], a[40])
    assert np.array_equal(gen.matrix_values(SEED, gen.MATRIX_B, np.arange(64), [77])[:, 0], a[:, 77])
    # arbitrary, unordered index sets (what the validator asks for)
    rows, cols = np.array([5, 60, 5, 1]), np.array([199, 0, 3])
    assert np.array_equal(gen.matrix_values(SEED, gen.MATRIX_B, rows, cols), a[np.ix_(rows, cols)])


def test_threaded_and_chunked_generation_is_identical() -> None:
    rows, cols = gen.matrix_keys(SEED, gen.MATRIX_A, 300, 700)  # several chunks per band
    for bits in (24, 11, 8):
        one = gen.fill_ints(rows, cols, bits=bits, threads=1)
        many = gen.fill_ints(rows, cols, bits=bits, threads=4)
        assert np.array_equal(one, many)
        assert np.array_equal(gen.ints_uint32(np, rows, cols, bits), one)


def test_int64_path_used_by_torch_matches_uint32_path() -> None:
    rows, cols = gen.matrix_keys(SEED, gen.MATRIX_A, 50, 90)
    for bits in (24, 11, 8):
        portable = gen.ints_int64(rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :], bits)
        assert np.array_equal(portable, gen.ints_uint32(np, rows, cols, bits))


def test_torch_generator_is_bit_identical() -> None:
    torch = pytest.importorskip("torch")
    rows, cols = gen.matrix_keys(SEED, gen.MATRIX_B, 70, 130)
    for bits in (24, 11, 8):
        t = gen.ints_int64(torch.from_numpy(rows.astype(np.int64))[:, None],
                           torch.from_numpy(cols.astype(np.int64))[None, :], bits)
        assert np.array_equal(t.numpy(), gen.ints_uint32(np, rows, cols, bits))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_backend_product_passes_the_verifier_like_numpy(dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from prime.challenge.prover import TorchBackend
    from prime.challenge.verifier import Draw, reference_entries, tolerance

    params = ChallengeParams(id="t", seed=SEED, n=70, dtype=dtype, repeat=2)
    # two "devices" on the CPU exercise the row split across GPUs; the inputs are bit-identical,
    # the float32 accumulation order is the library's (so: within the verifier's tolerance)
    backend = TorchBackend(devices=[torch.device("cpu"), torch.device("cpu")])
    got, ref = backend.product(params), NumpyBackend().product(params)
    draws = [Draw(i, tuple(range(70))) for i in range(70)]
    exact, scale = reference_entries(params, draws)
    for c in (got, ref):
        assert np.all(np.abs(c - exact) <= tolerance(exact, dtype, scale, params.inner))


@pytest.mark.parametrize("dtype, lower", [("float32", ["float16", "bfloat16", "tf32"]),
                                          ("float16", ["bfloat16", "fp8"])])
def test_values_use_every_bit_of_their_dtype(dtype: str, lower: list[str]) -> None:
    bits = gen.bits_of(dtype)
    q = gen.matrix_ints(SEED, gen.MATRIX_A, np.arange(256), np.arange(256), bits=bits, dtype=np.int64)
    mag = np.abs(q)
    assert mag.min() >= 1 << (bits - 1) and mag.max() < 1 << bits  # exactly `bits` significant bits
    assert 0.45 < np.mean(q < 0) < 0.55 and 0.45 < np.mean(q & 1) < 0.55  # random sign and lowest bit
    a = full(SEED, gen.MATRIX_A, 256, 256, dtype)
    assert np.all((np.abs(a) >= 0.5) & (np.abs(a) < 1))
    assert np.array_equal(a.astype(np.dtype(dtype) if dtype != "float32" else np.float32).astype(np.float32), a)
    for units in lower:  # rounded to fewer significand bits, about half the elements change
        kept = {"float16": 11, "bfloat16": 8, "tf32": 11, "fp8": 4}[units]
        step = 2.0 ** (1 - kept)  # spacing of values in [1/2, 1) with `kept` bits is 2**-kept
        rounded = np.round(a.astype(np.float64) / (step / 2)) * (step / 2)
        assert np.mean(rounded != a) > 0.45, units


def test_matrices_depend_on_seed_and_matrix_id() -> None:
    a = full(SEED, gen.MATRIX_A, 32, 32)
    assert not np.array_equal(a, full(SEED, gen.MATRIX_B, 32, 32))
    assert not np.array_equal(a, full(SEED + 1, gen.MATRIX_A, 32, 32))
    assert not np.array_equal(a, full(SEED ^ (1 << 63), gen.MATRIX_A, 32, 32))  # high seed bits count
    # rows are not shifted copies of each other
    assert np.mean(a[0] == a[1]) < 0.2


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("repeat", [1, 3])
def test_numpy_product_is_the_exact_product_within_float32_accumulation(dtype: str, repeat: int) -> None:
    params = ChallengeParams(id="t", seed=SEED, n=96, dtype=dtype, repeat=repeat)
    a = gen.matrix_values(SEED, gen.MATRIX_A, np.arange(96), np.arange(params.inner), dtype).astype(np.float64)
    b = gen.matrix_values(SEED, gen.MATRIX_B, np.arange(params.inner), np.arange(96), dtype).astype(np.float64)
    exact = a @ b  # float64: every product exact, the sum's error ~K·2**-53
    got = NumpyBackend().product(params).astype(np.float64)
    scale = np.sqrt((a * a) @ (b * b))  # s = sqrt(Σ (a·b)²) per entry
    if dtype == "float32":  # float32 accumulation: within a few 2**-24·sqrt(K)·s, never equal to fp64 rounding
        assert np.max(np.abs(got - exact) / scale) < 4 * np.sqrt(params.inner) * 2.0**-24
    else:  # half-precision inputs: products exact in float32, the result rounded once
        assert np.max(np.abs(got - exact) - 2.0**-gen.bits_of(dtype) * np.abs(exact) - 2.0**-20 * scale) <= 0


def test_bfloat16_rounding_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=4096).astype(np.float32) * 100
    ours = round_to_dtype(x.copy(), "bfloat16")
    assert np.array_equal(ours, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
