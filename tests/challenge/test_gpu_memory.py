"""The GPU backends' shared memory check, with devices whose free memory the test sets (no GPU needed)."""

from __future__ import annotations

from typing import Any

from prime.challenge.params import ChallengeParams, prover_bytes
from prime.challenge.prover import MEMORY_HEADROOM, _GpuMemory


class FakeGpus(_GpuMemory):
    def __init__(self, free: dict[Any, int | None], doubles_bfloat16: bool = False) -> None:
        self.devices = list(free)
        self.free = free
        self.doubles = doubles_bfloat16

    def free_device_bytes(self, device: Any) -> int | None:
        return self.free[device]

    def device_bytes(self, params: ChallengeParams, per_device: int) -> int:
        return per_device * (2 if self.doubles and params.dtype == "bfloat16" else 1)


PARAMS = ChallengeParams(id="c1", seed=1, n=1024)


def test_required_bytes_counts_the_host_and_every_device() -> None:
    host, device = prover_bytes(PARAMS, gpu_count=2)
    assert FakeGpus({0: 10**12, 1: 10**12}).required_bytes(PARAMS) == host + 2 * device


def test_a_device_without_room_is_named_and_non_gpu_devices_are_skipped() -> None:
    _host, device = prover_bytes(PARAMS, gpu_count=3)
    assert FakeGpus({"cpu": None, 0: 10**12, 1: 10**12}).memory_problem(PARAMS) is None
    problem = FakeGpus({0: 10**12, 1: device // 2, 2: 10**12}).memory_problem(PARAMS)
    assert problem is not None and "GPU 1" in problem


def test_bfloat16_computed_in_float32_needs_twice_the_room() -> None:
    bf16 = ChallengeParams(id="c1", seed=1, n=1024, dtype="bfloat16")
    _host, device = prover_bytes(bf16, gpu_count=1)
    free = int(device * 1.5 / MEMORY_HEADROOM)  # room for 1.5 results after the headroom
    assert FakeGpus({0: free}).memory_problem(bf16) is None
    assert FakeGpus({0: free}, doubles_bfloat16=True).memory_problem(bf16) is not None
