"""Validator checks, without HTTP. Each cheater fails exactly one check — so each
rejection below would turn into an approval if that one check were removed."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from prime.challenge import generator as gen
from prime.challenge.params import ChallengeParams, plan_challenge
from prime.challenge.prover import MatmulProver, NumpyBackend, RowOpening
from prime.challenge.runner import ChallengeReport, build_report, evaluate_openings
from prime.challenge.verifier import (
    Draw,
    check_entries,
    check_openings,
    check_time,
    draw_samples,
    exact_entries,
    rows_to_open,
    tolerance,
)
from prime.protocol.challenge import OpenedRow, OpeningAnswer, encode
from tests.challenge.cheaters import (
    CorruptingProver,
    LazyProver,
    SlowProver,
    SwappingProver,
)

N = 96


def run_locally(prover: Any, *, dtype: str = "float32", repeat: int = 1, elapsed_s: float | None = None,
                bound_s: float = 10.0) -> ChallengeReport:
    """Commit, draw after the commitment, open through the wire bytes, evaluate: the runner minus HTTP."""
    plan = plan_challenge({}, {"n": N, "dtype": dtype, "repeat": repeat, "bound_s": bound_s})
    commitment = prover.commit(plan.params)
    elapsed = commitment.elapsed_s if elapsed_s is None else elapsed_s
    draws = draw_samples(plan.params.n, plan.k, plan.m)
    opened = prover.open(commitment, rows_to_open(draws))
    raw = encode(OpeningAnswer(id=plan.params.id, rows=[o.to_wire() for o in opened]))
    checks = evaluate_openings(plan, commitment.root, draws, raw, elapsed)
    return build_report(plan, checks=checks, elapsed_s=elapsed, root=commitment.root.hex(), draws=draws)


def failing(report: ChallengeReport) -> list[str]:
    return [name for name, problem in report.checks.items() if problem is not None]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_honest_prover_passes_every_check(dtype: str) -> None:
    report = run_locally(MatmulProver(NumpyBackend()), dtype=dtype, repeat=2)
    assert report.approved, report.reason
    assert failing(report) == [] and set(report.checks) == {"response", "merkle", "entries", "time"}
    assert report.checked_entries == report.k * report.m


def test_corrupted_entries_fail_only_the_entry_check() -> None:
    report = run_locally(CorruptingProver(fraction=0.10))
    assert not report.approved
    assert failing(report) == ["entries"], report.checks


def test_inconsistent_openings_fail_only_the_merkle_check() -> None:
    report = run_locally(LazyProver())
    assert not report.approved
    assert failing(report) == ["merkle"], report.checks


def test_slow_prover_fails_only_the_time_check() -> None:
    report = run_locally(SlowProver(delay_s=0.0), elapsed_s=2.0, bound_s=1.0)
    assert not report.approved
    assert failing(report) == ["time"], report.checks


def test_rows_opened_from_another_position_are_rejected() -> None:
    report = run_locally(SwappingProver())
    assert not report.approved and report.checks["merkle"] is not None


def test_exact_entries_match_a_dense_product() -> None:
    params = ChallengeParams(id="x", seed=3, n=40, repeat=3)
    a = gen.matrix_values(3, gen.MATRIX_A, np.arange(40), np.arange(120)).astype(np.float64)
    b = gen.matrix_values(3, gen.MATRIX_B, np.arange(120), np.arange(40)).astype(np.float64)
    draws = [Draw(0, (0, 39)), Draw(17, (5, 5)), Draw(39, (21, 0))]
    expected = exact_entries(params, draws)
    dense = a @ b  # float64: exact products, the sums' error ~K·2**-53
    assert np.allclose(expected, [[dense[d.row, c] for c in d.cols] for d in draws], rtol=0, atol=1e-12)


def honest(params: ChallengeParams) -> tuple[MatmulProver, Any]:
    prover = MatmulProver(NumpyBackend())
    commitment = prover.commit(params)
    return prover, commitment


def openings_for(prover: MatmulProver, commitment: Any, rows: list[int]) -> dict[int, RowOpening]:
    return {o.index: o for o in prover.open(commitment, rows)}


def test_entry_check_catches_a_single_wrong_value_and_nan() -> None:
    params = ChallengeParams(id="x", seed=11, n=32)
    prover, commitment = honest(params)
    draws = [Draw(4, (7,))]
    ops = openings_for(prover, commitment, [4])
    assert check_entries(params, draws, ops) is None
    wrong = ops[4].values.copy()
    wrong[7] += np.float32(2.0**-12)  # far below 2**-11 (an fp16 input's error), far above 2**-24·sqrt(K)
    assert "C[4, 7]" in check_entries(params, draws, {4: RowOpening(4, wrong, ops[4].path)})
    wrong[7] = np.nan
    assert check_entries(params, draws, {4: RowOpening(4, wrong, ops[4].path)}) is not None


def test_tolerance_admits_one_rounding_plus_float32_accumulation() -> None:
    exact, scale = np.array([1000.3984375]), np.array([40.0])
    fp16 = np.float16(exact[0])
    assert abs(float(fp16) - exact[0]) <= tolerance(exact, "float16", scale, 4096)[0]
    two_ulps_up = np.nextafter(np.nextafter(fp16, np.float16(np.inf)), np.float16(np.inf))
    assert abs(float(two_ulps_up) - exact[0]) > tolerance(exact, "float16", scale, 4096)[0]
    # float32: 2·2**-24·|c| + 4·sqrt(K)·2**-24·s, far below an fp16 input's ~2**-11.7·s
    assert tolerance(exact, "float32", scale, 4096)[0] == pytest.approx(
        2 * 2.0**-24 * exact[0] + 4 * 64 * 2.0**-24 * scale[0])
    assert tolerance(exact, "float32", scale, 1 << 17)[0] < 2.0**-13 * scale[0]


def test_opening_check_reports_missing_extra_short_and_forged_rows() -> None:
    params = ChallengeParams(id="x", seed=5, n=32)
    prover, commitment = honest(params)
    ops = openings_for(prover, commitment, [1, 2])
    root = commitment.root
    assert check_openings(root, 32, [1, 2], ops) is None
    assert "did not open row 2" in check_openings(root, 32, [1, 2], {1: ops[1]})
    assert "not requested" in check_openings(root, 32, [1], ops)
    short = RowOpening(1, ops[1].values[:-1], ops[1].path)
    assert "values instead of 32" in check_openings(root, 32, [1], {1: short})
    forged = RowOpening(1, ops[1].values + np.float32(1), ops[1].path)
    assert "Merkle root" in check_openings(root, 32, [1], {1: forged})


def test_time_check() -> None:
    assert check_time(0.5, 1.0) is None
    assert "more than" in check_time(1.5, 1.0)
    assert check_time(float("nan"), 1.0) is not None


def test_draws_are_uniform_rows_with_m_columns() -> None:
    draws = draw_samples(10, 500, 3)
    assert len(draws) == 500 and all(len(d.cols) == 3 for d in draws)
    assert set(rows_to_open(draws)) == set(range(10))
    assert all(0 <= c < 10 for d in draws for c in d.cols)


def test_malformed_openings_are_a_response_failure() -> None:
    plan = plan_challenge({}, {"n": 16, "bound_s": 10, "id": "c1"})
    draws = draw_samples(16, 4, 1)
    row = OpenedRow(index=1, values=bytes(4 * 16), path=[bytes(32)] * 4)
    good_row = json.loads(encode(row))

    def answer(rows: Any, ident: str = "c1") -> bytes:
        return json.dumps({"id": ident, "rows": rows}).encode()

    replies = [
        b"", b"null", b"[]", b"{}", b"{not json", answer("x"), answer([None]),
        answer([{**good_row, "values": "zz"}]),                         # not base64
        answer([{**good_row, "index": True}]),                          # a bool is not an index
        answer([{**good_row, "index": 1 << 70}]),                       # huge int
        answer([{**good_row, "path": ["00" * 32]}]),                    # hex, not base64 of 32 bytes
        answer([{**good_row, "extra": 1}]),                             # unknown field
        answer([{**good_row, "values": encode(bytes(4 * 15)).decode().strip('"')}]),  # 15 values, not 16
        answer([{**good_row, "values": encode(bytes(4 * 16 + 2)).decode().strip('"')}]),  # not whole float32s
        answer([good_row, good_row]),                                   # opened twice
        answer([good_row], ident="other"),                              # another challenge
        answer([{**good_row, "path": [[[[[[[[[[]]]]]]]]]]}]),
        b'{"id": "c1", "rows": [{"index": 1, "values": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
    ]
    for raw in replies:
        checks = evaluate_openings(plan, bytes(32), draws, raw, 0.1)
        assert checks["response"] is not None and "entries" not in checks, raw[:80]
    assert "opened twice" in evaluate_openings(plan, bytes(32), draws, answer([good_row] * 2), 0.1)["response"]
    assert "64 bytes" in evaluate_openings(plan, bytes(32), draws, replies[12], 0.1)["response"]


def test_report_hash_is_stable_and_covers_the_outcome() -> None:
    report = run_locally(MatmulProver(NumpyBackend()))
    digest = report.report_hash()
    assert len(digest) == 32 and digest == report.report_hash()
    assert json.loads(report.canonical_bytes()) == json.loads(json.dumps(report.to_json()))
    report.approved = False
    assert report.report_hash() != digest
