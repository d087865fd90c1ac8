"""Parameter validation, sample sizes, time bound and planning (the class table: test_classes.py)."""

from __future__ import annotations

import msgspec
import pytest

from prime.challenge.params import (
    DEFAULT_K,
    MAX_MEMORY_SHARE,
    ChallengeParamError,
    ChallengeParams,
    checked_params,
    claimed_class,
    pass_probability_bound,
    plan_challenge,
    prover_bytes,
    rows_needed,
    time_bound_s,
)
from prime.protocol.challenge import MAX_N, MAX_REPEAT

GOOD = {"id": "c-1", "seed": 7, "n": 64, "dtype": "float32", "repeat": 1}


def test_round_trip() -> None:
    params = checked_params(GOOD)
    assert msgspec.to_builtins(params) == {**GOOD, "parts": 1}
    assert msgspec.to_builtins(checked_params({**GOOD, "parts": 4}))["parts"] == 4
    assert checked_params({**GOOD, "parts": 4}).rows == 256 and checked_params({**GOOD, "parts": 4}).flops == 8 * 64**3
    assert params.inner == 64 and params.flops == 2 * 64**3
    assert checked_params({"id": "x", "seed": 1, "n": 8}).dtype == "float32"


@pytest.mark.parametrize("change, words", [
    ({"n": 0}, r"`int` >= 1 - at `\$.n`"),
    ({"n": MAX_N + 1}, r"`int` <= 32768 - at `\$.n`"),
    ({"n": "64"}, r"Expected `int`, got `str` - at `\$.n`"),
    ({"n": True}, r"Expected `int`, got `bool` - at `\$.n`"),
    ({"dtype": "float64"}, r"Invalid enum value 'float64' - at `\$.dtype`"),
    ({"repeat": MAX_REPEAT + 1}, r"`\$.repeat`"),
    ({"n": 32768, "repeat": 128}, r"n \* repeat"),
    ({"seed": -1}, r"`\$.seed`"),
    ({"seed": 1 << 64}, "seed must be below"),
    ({"id": "../etc"}, r"`\$.id`"),
    ({"extra": 1}, "unknown field `extra`"),
])
def test_checked_params_hold_the_message_limits(change: dict[str, object], words: str) -> None:
    with pytest.raises(ChallengeParamError, match=words):
        checked_params({**GOOD, **change})
    with pytest.raises(ChallengeParamError, match="required field `seed`"):
        checked_params({"id": "x", "n": 4})


def test_k_gives_the_promised_detection_probability() -> None:
    assert DEFAULT_K == rows_needed(0.1, 1e-6) == 132
    assert pass_probability_bound(DEFAULT_K, 0.1) <= 1e-6 < pass_probability_bound(DEFAULT_K - 1, 0.1)


H100 = {"gpu_count": 1, "gpu_model": "NVIDIA H100 80GB HBM3", "gpu_memory_mib": 81559, "cpu_cores": 32,
        "ram_mib": 1 << 19}


def test_time_bound_follows_the_claimed_hardware() -> None:
    p = ChallengeParams(id="x", seed=1, n=8192, dtype="float16", repeat=16)
    h100x8 = time_bound_s(p, claimed_class({**H100, "gpu_count": 8}))
    h100 = time_bound_s(p, claimed_class(H100))
    t4 = time_bound_s(p, claimed_class({**H100, "gpu_model": "Tesla T4", "gpu_memory_mib": 15360}))
    cpu = time_bound_s(p, claimed_class({"cpu_cores": 4, "ram_mib": 1 << 16}))
    assert h100x8 < h100 < t4 < cpu
    assert time_bound_s(p, claimed_class(H100), overhead_s=2.0) == pytest.approx(h100 + 1.5)


def test_plan_for_a_cpu_node_is_float32_sized_by_its_cores() -> None:
    plan = plan_challenge({"gpu_count": 0, "cpu_cores": 2, "ram_mib": 16384})
    assert plan.params.dtype == "float32"
    assert plan.k == DEFAULT_K and plan.m >= 1 and plan.bound_s > 2
    assert plan.params.id and 0 <= plan.params.seed < 1 << 64
    assert plan.notes["class"] == "CPU 2 cores"


def test_plan_for_gpus_uses_half_precision_and_fits_the_models_memory() -> None:
    specs = {**H100, "gpu_count": 8}
    plan = plan_challenge(specs)
    assert plan.params.dtype == "float16"
    assert plan.notes["memory_share"] <= MAX_MEMORY_SHARE  # the K-chunks fill 40 % of each GPU's memory
    assert prover_bytes(plan.params, gpu_count=8, inner_chunk=1024)[1] < prover_bytes(plan.params, gpu_count=8)[1]
    # a GPU claim the table refuses gets no challenge at all, never a small one
    with pytest.raises(ChallengeParamError, match="no challenge for this claim"):
        plan_challenge({**specs, "gpu_memory_mib": 1100})


def test_plan_accepts_overrides_and_rejects_unknown_ones() -> None:
    plan = plan_challenge({}, {"n": 64, "k": 10, "m": 3, "bound_s": 0.5, "seed": 9, "id": "abc"})
    assert (plan.params.n, plan.params.repeat, plan.k, plan.m, plan.bound_s) == (64, 1, 10, 3, 0.5)
    with pytest.raises(ChallengeParamError, match="unknown challenge override"):
        plan_challenge({}, {"nn": 64})
    with pytest.raises(ChallengeParamError, match="k and m"):
        plan_challenge({}, {"k": 0})
    with pytest.raises(ChallengeParamError, match="unknown dtype"):
        plan_challenge({}, {"dtype": "int8"})
    with pytest.raises(ChallengeParamError, match=r"\$.n"):
        plan_challenge({}, {"n": 0})
