"""Challenges of several parts (one per claimed GPU) and rows committed in the challenge's dtype (issue 12)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from prime.challenge import generator as gen
from prime.challenge.classes import check_claim
from prime.challenge.merkle import NotInDtype, committed_rows, row_leaf, row_values
from prime.challenge.params import ChallengeParams, ChallengePlan, plan_challenge
from prime.challenge.prover import MatmulProver, NumpyBackend
from prime.challenge.runner import read_commitment
from prime.challenge.verifier import Draw, check_entries, check_openings, draw_samples, rows_to_open
from prime.protocol.challenge import CommitmentAnswer, encode

N = 32


def params(parts: int = 3, dtype: str = "float32", **more: Any) -> ChallengeParams:
    return ChallengeParams(id="parts", seed=11, n=N, dtype=dtype, repeat=2, parts=parts, **more)  # type: ignore[arg-type]


def every_row_checked(p: ChallengeParams) -> list[Draw]:
    return [Draw(row=r, cols=(r % p.n, (r * 7 + 3) % p.n)) for r in range(p.rows)]


def verify(p: ChallengeParams, prover: MatmulProver, draws: list[Draw]) -> tuple[str | None, str | None]:
    commitment = prover.commit(p)
    rows = rows_to_open(draws)
    openings = {o.index: o for o in prover.open(commitment, rows)}
    return (check_openings(commitment.root, p.n, rows, openings, rows=p.rows, dtype=p.dtype),
            check_entries(p, draws, openings))


# ---------------------------------------------------------------- the generator's parts
def test_part_zero_is_the_single_part_challenge_and_other_parts_are_other_matrices() -> None:
    one = NumpyBackend().product(params(parts=1))
    three = NumpyBackend().product(params(parts=3))
    assert three.shape == (3 * N, N)
    assert np.array_equal(three[:N], one)
    assert not np.array_equal(three[N:2 * N], three[:N]) and not np.array_equal(three[2 * N:], three[N:2 * N])
    assert [gen.part_matrix(p, m) for p in range(2) for m in (gen.MATRIX_A, gen.MATRIX_B)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        gen.part_matrix(16, gen.MATRIX_A)


# ---------------------------------------------------------------- honest and dishonest provers
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_an_honest_prover_of_three_parts_passes_every_row_of_every_part(dtype: str) -> None:
    p = params(dtype=dtype)
    assert verify(p, MatmulProver(NumpyBackend()), every_row_checked(p)) == (None, None)


class OneDeviceForAll(MatmulProver):
    """A node claiming three GPUs that computes one part and passes it off as every part."""

    def compute(self, params: ChallengeParams) -> np.ndarray:
        first = NumpyBackend().part_product(params, 0)
        return np.concatenate([first] * params.parts)


class SkipsLastPart(MatmulProver):
    """Computes every part but the last, which it fills with zeros (a GPU short)."""

    def compute(self, params: ChallengeParams) -> np.ndarray:
        c = NumpyBackend().product(params)
        c[(params.parts - 1) * params.n:] = 0.0
        return c


@pytest.mark.parametrize("cheat", [OneDeviceForAll, SkipsLastPart])
def test_a_prover_with_fewer_parts_than_claimed_fails_the_entries_of_the_missing_ones(cheat: type) -> None:
    p = params()
    merkle, entries = verify(p, cheat(NumpyBackend()), every_row_checked(p))
    assert merkle is None  # it committed to what it computed
    assert entries is not None and "wrong" in entries
    wrong = int(entries.split("(")[-1].split(" of ")[0])
    assert wrong >= N  # every checked row of a missing part (an entry or two of each)


def test_rows_are_drawn_over_every_part() -> None:
    draws = draw_samples(N, 600, 2, rows=3 * N)
    parts = {d.row // N for d in draws}
    assert parts == {0, 1, 2}
    assert all(0 <= c < N for d in draws for c in d.cols)  # columns stay within one part's n


def test_a_row_opened_from_another_part_does_not_match_the_root() -> None:
    p = params()
    prover = MatmulProver(NumpyBackend())
    commitment = prover.commit(p)
    opened = {o.index: o for o in prover.open(commitment, [1, N + 1])}
    swapped = {1: opened[N + 1].__class__(index=1, values=opened[N + 1].values, path=opened[1].path),
               N + 1: opened[N + 1]}
    problem = check_openings(commitment.root, N, [1, N + 1], swapped, rows=p.rows)
    assert problem is not None and "row 1" in problem


# ---------------------------------------------------------------- rows committed in the dtype
def test_half_precision_rows_are_committed_in_two_bytes_a_value() -> None:
    values = np.array([1.0, -2.5, 0.099975586, 65504.0], np.float32)  # float16 values
    assert committed_rows(values, "float16").dtype == np.dtype("<f2")
    assert row_leaf(values, "float16") == hashlib.sha256(b"\x00" + values.astype("<f2").tobytes()).digest()
    bf = np.array([1.0, -2.5, 3.0e38], np.float32)
    bf_bits = (bf.view(np.uint32) >> 16).astype("<u2")
    bf = (bf_bits.astype(np.uint32) << 16).view(np.float32)  # exact bfloat16 values
    assert row_leaf(bf, "bfloat16") == hashlib.sha256(b"\x00" + bf_bits.tobytes()).digest()
    assert np.array_equal(row_values(committed_rows(bf, "bfloat16"), "bfloat16"), bf)
    assert row_leaf(values, "float32") == hashlib.sha256(b"\x00" + values.astype("<f4").tobytes()).digest()


@pytest.mark.parametrize("dtype, value", [("float16", 1.0 + 2.0**-12), ("bfloat16", 1.0 + 2.0**-9),
                                          ("float16", 70000.0), ("float16", float("nan"))])
def test_a_row_holding_values_its_dtype_lacks_is_refused_not_rounded(dtype: str, value: float) -> None:
    row = np.array([1.0, value], np.float32)
    if not np.isnan(value):
        with pytest.raises(NotInDtype):
            committed_rows(row, dtype)
    p = ChallengeParams(id="x", seed=1, n=2, dtype=dtype)  # type: ignore[arg-type]
    prover = MatmulProver(NumpyBackend())
    commitment = prover.commit(p)
    (honest,) = prover.open(commitment, [0])
    if np.isnan(value):  # float16 has NaN: refused by the root, not by the encoding
        row[1] = np.float32(np.nan)
    forged = honest.__class__(index=0, values=row, path=honest.path)
    problem = check_openings(commitment.root, 2, [0], {0: forged}, dtype=dtype)
    assert problem is not None and "row 0" in problem


# ---------------------------------------------------------------- the plan and the commitment
def test_a_claim_of_n_gpus_is_planned_as_n_parts_and_needs_four_cores_each() -> None:
    h100 = {"gpu_count": 8, "gpu_model": "NVIDIA H100 PCIe", "gpu_memory_mib": 81559, "cpu_cores": 32,
            "ram_mib": 1 << 20}
    assert check_claim(h100) is None
    assert plan_challenge(h100).params.parts == 8
    problem = check_claim({**h100, "cpu_cores": 31})
    assert problem is not None and "4 a GPU" in problem
    assert plan_challenge({"gpu_count": 0, "cpu_cores": 2, "ram_mib": 4096}).params.parts == 1


def test_a_commitment_for_other_parts_is_the_miners_failure() -> None:
    p = params(parts=2)
    plan = ChallengePlan(params=p, k=4, m=1, bound_s=10.0)
    answer = CommitmentAnswer(id=p.id, root=bytes(32), n=p.n, dtype=p.dtype, repeat=p.repeat, elapsed_s=0.1,
                              backend="numpy", parts=1)
    got, problem = read_commitment(plan, encode(answer))
    assert got is None and problem is not None and "parts=1" in problem and "parts=2" in problem
    ok, problem = read_commitment(plan, encode(CommitmentAnswer(
        id=p.id, root=bytes(32), n=p.n, dtype=p.dtype, repeat=p.repeat, elapsed_s=0.1, backend="numpy", parts=2)))
    assert ok is not None and problem is None


# ---------------------------------------------------------------- RAM never shrinks a challenge
H100X8 = {"gpu_count": 8, "gpu_model": "H100", "gpu_memory_mib": 81559, "cpu_cores": 64}


@pytest.mark.parametrize("specs", [H100X8, {"gpu_count": 1, "gpu_model": "B200", "gpu_memory_mib": 183359,
                                            "cpu_cores": 8}, {"gpu_count": 0, "cpu_cores": 64}])
def test_the_claimed_ram_does_not_change_the_challenge_and_too_little_is_refused(specs: dict[str, Any]) -> None:
    from prime.challenge.params import claim_problem

    small, large = {**specs, "ram_mib": 1024}, {**specs, "ram_mib": 4 << 20}
    a, b = plan_challenge(small), plan_challenge(large)
    assert (a.params.n, a.params.repeat, a.params.parts, a.bound_s) == (b.params.n, b.params.repeat, b.params.parts,
                                                                         b.bound_s)
    assert claim_problem(large) is None
    problem = claim_problem(small)
    assert problem is not None and "1024 MiB of RAM" in problem and "needs at least" in problem
    need = int(problem.split("needs at least ")[1].split(" MiB")[0])
    assert claim_problem({**specs, "ram_mib": need}) is None and claim_problem({**specs, "ram_mib": need - 1})
