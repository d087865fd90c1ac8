"""The generator: one definition, identical through every access path and backend."""

from __future__ import annotations

import numpy as np
import pytest

from prime.challenge import generator as gen
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import NumpyBackend, round_to_dtype

SEED = 0xDEADBEEF12345678


def full(seed: int, matrix: int, rows: int, cols: int) -> np.ndarray:
    return gen.matrix_values(seed, matrix, np.arange(rows), np.arange(cols))


def test_vectorised_matches_pure_python_reference() -> None:
    values = full(SEED, gen.MATRIX_A, 23, 37)
    reference = np.array([[gen.element(SEED, gen.MATRIX_A, i, j) for j in range(37)] for i in range(23)])
    assert np.array_equal(values, reference)


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
    one = gen.fill_nibbles(rows, cols, threads=1)
    many = gen.fill_nibbles(rows, cols, threads=4)
    assert np.array_equal(one, many)
    assert np.array_equal(gen.nibbles_uint32(np, rows, cols), one)


def test_int64_path_used_by_torch_matches_uint32_path() -> None:
    rows, cols = gen.matrix_keys(SEED, gen.MATRIX_A, 50, 90)
    portable = gen.nibbles_int64(rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :])
    assert np.array_equal(portable, gen.nibbles_uint32(np, rows, cols))


def test_torch_generator_is_bit_identical() -> None:
    torch = pytest.importorskip("torch")
    rows, cols = gen.matrix_keys(SEED, gen.MATRIX_B, 70, 130)
    t = gen.nibbles_int64(torch.from_numpy(rows.astype(np.int64))[:, None],
                          torch.from_numpy(cols.astype(np.int64))[None, :])
    assert np.array_equal(t.numpy(), gen.nibbles_uint32(np, rows, cols))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_backend_product_matches_numpy_bit_for_bit(dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from prime.challenge.prover import TorchBackend

    params = ChallengeParams(id="t", seed=SEED, n=70, dtype=dtype, repeat=2)
    # two "devices" on the CPU exercise the row split across GPUs
    backend = TorchBackend(devices=[torch.device("cpu"), torch.device("cpu")])
    assert np.array_equal(backend.product(params), NumpyBackend().product(params))


def test_values_are_small_dyadics_evenly_spread() -> None:
    a = full(SEED, gen.MATRIX_A, 256, 256)
    nibbles = a * 16
    assert np.array_equal(nibbles, np.round(nibbles)) and nibbles.min() == -8 and nibbles.max() == 7
    counts = np.bincount((nibbles.ravel() + 8).astype(int), minlength=16)
    assert counts.min() > 0.85 * a.size / 16 and counts.max() < 1.15 * a.size / 16
    # exact in every supported dtype
    assert np.array_equal(a.astype(np.float16).astype(np.float32), a)


def test_matrices_depend_on_seed_and_matrix_id() -> None:
    a = full(SEED, gen.MATRIX_A, 32, 32)
    assert not np.array_equal(a, full(SEED, gen.MATRIX_B, 32, 32))
    assert not np.array_equal(a, full(SEED + 1, gen.MATRIX_A, 32, 32))
    assert not np.array_equal(a, full(SEED ^ (1 << 63), gen.MATRIX_A, 32, 32))  # high seed bits count
    # rows are not shifted copies of each other
    assert np.mean(a[0] == a[1]) < 0.2


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("repeat", [1, 3])
def test_numpy_product_is_the_exact_product_rounded_once(dtype: str, repeat: int) -> None:
    params = ChallengeParams(id="t", seed=SEED, n=96, dtype=dtype, repeat=repeat)
    a = gen.matrix_values(SEED, gen.MATRIX_A, np.arange(96), np.arange(params.inner)).astype(np.float64)
    b = gen.matrix_values(SEED, gen.MATRIX_B, np.arange(params.inner), np.arange(96)).astype(np.float64)
    exact = a @ b  # float64: exact for these integers times 2**-8
    got = NumpyBackend().product(params)
    assert np.array_equal(got, round_to_dtype(exact.astype(np.float32), dtype))
    if dtype == "float32":
        assert np.array_equal(got, exact)


def test_bfloat16_rounding_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=4096).astype(np.float32) * 100
    ours = round_to_dtype(x.copy(), "bfloat16")
    assert np.array_equal(ours, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
