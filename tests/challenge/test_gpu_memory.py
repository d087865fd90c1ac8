"""The GPU backends' shared memory check, with devices whose free memory the test sets (no GPU needed)."""

from __future__ import annotations

from typing import Any

import pytest

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
THREE_PARTS = ChallengeParams(id="c1", seed=1, n=1024, parts=3)


def test_required_bytes_counts_the_host_and_every_device_computing_a_part() -> None:
    two = ChallengeParams(id="c1", seed=1, n=1024, parts=2)
    host, device = prover_bytes(two, gpu_count=2)
    assert FakeGpus({0: 10**12, 1: 10**12}).required_bytes(two) == host + 2 * device
    host, device = prover_bytes(PARAMS, gpu_count=2)  # one part: one GPU computes it
    assert FakeGpus({0: 10**12, 1: 10**12}).required_bytes(PARAMS) == host + device
    # the host holds every part's committed rows
    assert prover_bytes(THREE_PARTS, gpu_count=3)[0] - prover_bytes(PARAMS, gpu_count=1)[0] >= 2 * 4 * 1024 * 1024


def test_a_device_without_room_is_named_and_non_gpu_devices_are_skipped() -> None:
    _host, device = prover_bytes(THREE_PARTS, gpu_count=3)
    assert FakeGpus({"cpu": None, 0: 10**12, 1: 10**12}).memory_problem(THREE_PARTS) is None
    problem = FakeGpus({0: 10**12, 1: device // 2, 2: 10**12}).memory_problem(THREE_PARTS)
    assert problem is not None and "GPU 1" in problem


def test_bfloat16_computed_in_float32_needs_twice_the_room() -> None:
    bf16 = ChallengeParams(id="c1", seed=1, n=1024, dtype="bfloat16")
    _host, device = prover_bytes(bf16, gpu_count=1)
    free = int(device * 1.5 / MEMORY_HEADROOM)  # room for 1.5 results after the headroom
    assert FakeGpus({0: free}).memory_problem(bf16) is None
    assert FakeGpus({0: free}, doubles_bfloat16=True).memory_problem(bf16) is not None


# ---------------------------------------------------------------- the torch backend's K-chunks
class ArrayTensor:
    """Just enough of a torch tensor, over numpy, for TorchBackend.product."""

    def __init__(self, array: Any, device: Any) -> None:
        self.array, self.device = array, device

    def __matmul__(self, other: ArrayTensor) -> ArrayTensor:
        return ArrayTensor(self.array @ other.array, self.device)

    def __getitem__(self, index: Any) -> ArrayTensor:
        return ArrayTensor(self.array[index], self.device)

    def add_(self, other: ArrayTensor) -> ArrayTensor:
        self.array += other.array
        return self

    def cpu(self) -> ArrayTensor:
        return self

    def numpy(self) -> Any:
        return self.array


def chunking_torch(free_bytes: int, calls: list[tuple[int, int]]) -> Any:
    import contextlib
    import types

    import numpy as np

    torch = types.ModuleType("torch")
    torch.float32, torch.float16, torch.bfloat16 = "float32", "float16", "bfloat16"
    flags = types.SimpleNamespace()
    torch.backends = types.SimpleNamespace(cuda=types.SimpleNamespace(matmul=flags), cudnn=types.SimpleNamespace())

    def mm(a: ArrayTensor, b: ArrayTensor, out_dtype: Any = None) -> ArrayTensor:
        assert out_dtype == "float32" and a.array.dtype == np.float16 == b.array.dtype
        calls.append((a.array.shape[1], b.array.shape[0]))
        return ArrayTensor(a.array.astype(np.float32) @ b.array.astype(np.float32), a.device)

    torch.mm = mm
    torch.cuda = types.SimpleNamespace(mem_get_info=lambda device: (free_bytes, free_bytes),
                                       device=lambda device: contextlib.nullcontext(), empty_cache=lambda: None)
    return torch


def test_torch_multiplies_k_in_chunks_that_fit_and_accumulates_in_float32(monkeypatch: Any) -> None:
    import sys
    import types

    import numpy as np

    from prime.challenge import generator as gen
    from prime.challenge.params import GPU_CHUNK_SHARE, HALF_CHUNK_MAX, inner_chunk
    from prime.challenge.prover import NumpyBackend, TorchBackend
    from prime.challenge.verifier import Draw, reference_entries, tolerance

    params = ChallengeParams(id="c1", seed=3, n=64, dtype="float16", repeat=160, parts=2)  # K = 10240, a part a GPU
    calls: list[tuple[int, int]] = []
    free = int((6 * 8 * (1 << 24) + 8 * 64 * 64 + 6000 * 2 * (64 + 64)) / GPU_CHUNK_SHARE)  # ~6000 of K per chunk
    monkeypatch.setitem(sys.modules, "torch", chunking_torch(free, calls))
    gpus = [types.SimpleNamespace(type="cuda", index=i) for i in range(2)]
    backend = TorchBackend(devices=gpus)
    kc = inner_chunk(params, 2, GPU_CHUNK_SHARE * free)
    assert HALF_CHUNK_MAX < kc < params.inner  # several generated chunks, each multiplied in slices

    def matrix(row_keys: Any, col_keys: Any, dtype: Any, device: Any, bits: int) -> ArrayTensor:
        q = gen.fill_ints(row_keys, col_keys, bits=bits)
        return ArrayTensor((q * np.float32(gen.value_scale(bits))).astype(np.float16), device)

    monkeypatch.setattr(backend, "matrix", matrix)
    got = backend.product(params)
    widths = [min(kc, params.inner - k0) for k0 in range(0, params.inner, kc)]
    slices = sum(-(-w // HALF_CHUNK_MAX) for w in widths)
    assert len(calls) == 2 * slices and sum(c[0] for c in calls) == 2 * params.inner
    assert max(c[0] for c in calls) == HALF_CHUNK_MAX  # no GEMM call accumulates more of K
    assert backend.memory_problem(params) is None
    draws = [Draw(i, tuple(range(64))) for i in range(128)]  # every row of both parts
    exact, scale = reference_entries(params, draws)
    assert np.all(np.abs(got - exact) <= tolerance(exact, "float16", scale, params.inner))
    assert np.all(np.abs(NumpyBackend().product(params) - exact) <= tolerance(exact, "float16", scale, params.inner))


# ---------------------------------------------------------------- the fused generator's warm-up
def compiling_torch(compile_fn: Any) -> Any:
    import types

    import numpy as np

    torch = chunking_torch(10**12, [])
    torch.int64 = np.int64
    torch.arange = lambda n, dtype=None, device=None: np.arange(n, dtype=np.int64)
    if compile_fn is not None:
        torch.compile = compile_fn
    return types.SimpleNamespace(module=torch)


@pytest.mark.parametrize("compiled, fused", [
    (lambda fn, dynamic: fn, True),  # a faithful kernel is kept
    (lambda fn, dynamic: (lambda r, c, b: fn(r, c, b) ^ 1), False),  # a miscompiled one is dropped
    (lambda fn, dynamic: (lambda r, c, b: (_ for _ in ()).throw(RuntimeError("no triton"))), False),
    (None, False),  # a torch without compile: the unfused generator
])
def test_the_fused_generator_is_checked_against_the_reference_before_any_challenge(
        monkeypatch: Any, compiled: Any, fused: bool) -> None:
    import sys
    import types

    from prime.challenge import generator as gen
    from prime.challenge.prover import TorchBackend

    monkeypatch.setitem(sys.modules, "torch", compiling_torch(compiled).module)
    backend = TorchBackend(devices=[types.SimpleNamespace(type="cuda", index=0)])
    assert backend.warm_up() is fused
    assert (backend._ints is not None) is fused
    import numpy as np

    rows, cols = np.arange(5, dtype=np.int64)[:, None] * 977, np.arange(7, dtype=np.int64)[None, :] * 131
    assert np.array_equal(backend.ints(rows, cols, 11), gen.ints_int64(rows, cols, 11))  # right values either way
