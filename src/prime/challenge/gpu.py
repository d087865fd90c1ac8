"""GPU backends of the challenge prover: torch (CUDA) and cupy, one part per GPU.

Tested here on the CPU as far as one allows (torch's CPU device runs the same code with
widened products; tests/challenge/test_prover_devices.py); the fused generator and the
tensor-core paths only run on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from prime.challenge import generator as gen
from prime.challenge.backends import MEMORY_HEADROOM, Deliver, _host_available_bytes, round_to_dtype, stacked_product
from prime.challenge.params import (
    GPU_CHUNK_SHARE,
    HALF_CHUNK_MAX,
    MIN_INNER_CHUNK,
    ChallengeParams,
    inner_chunk,
    prover_bytes,
)

log = logging.getLogger(__name__)


def _parts_per_device(parts: int, devices: int) -> list[list[int]]:
    """Part p on device p mod devices (one part per GPU when the claim is honest)."""
    return [list(range(d, parts, devices)) for d in range(min(parts, devices))]


def _run_per_device(work: Any, devices: list[Any], params: ChallengeParams) -> None:
    assignment = _parts_per_device(params.parts, len(devices))
    if len(assignment) == 1:
        work(devices[0], assignment[0])
        return
    with ThreadPoolExecutor(max_workers=len(assignment)) as pool:
        list(pool.map(work, devices[: len(assignment)], assignment))


class _GpuMemory:
    """What the GPU backends share: the memory a challenge needs on the host and on each device.

    A backend that ``chunks_inner`` multiplies K in chunks as large as fit GPU_CHUNK_SHARE of
    a device's free memory, so it only needs room for the smallest chunk; one that does not
    holds all of K at once.
    """

    devices: list[Any]
    chunks_inner = False

    def parallel_parts(self, params: ChallengeParams) -> int:
        return max(1, min(params.parts, len(self.devices)))

    def _chunk(self, params: ChallengeParams) -> int | None:
        return min(params.inner, MIN_INNER_CHUNK) if self.chunks_inner else None

    def free_device_bytes(self, device: Any) -> int | None:
        """Free bytes on ``device`` (None: not a GPU, nothing to check)."""
        raise NotImplementedError

    def device_bytes(self, params: ChallengeParams, per_device: int) -> int:
        return per_device

    def required_bytes(self, params: ChallengeParams) -> int:
        host, device = prover_bytes(params, gpu_count=len(self.devices), inner_chunk=self._chunk(params))
        return host + device * self.parallel_parts(params)

    def memory_problem(self, params: ChallengeParams) -> str | None:
        host, device = prover_bytes(params, gpu_count=len(self.devices), inner_chunk=self._chunk(params))
        free_host = int(_host_available_bytes() * MEMORY_HEADROOM)
        if host > free_host:
            return f"needs {host} bytes of RAM but only {free_host} are free"
        for d in self.devices[: self.parallel_parts(params)]:
            free_raw = self.free_device_bytes(d)
            if free_raw is None:
                continue
            free = int(free_raw * MEMORY_HEADROOM)
            if self.device_bytes(params, device) > free:
                return f"needs {device} bytes on GPU {d} but only {free} are free"
        return None

    def product(self, params: ChallengeParams) -> np.ndarray:
        return stacked_product(self, params)  # type: ignore[arg-type]


class TorchBackend(_GpuMemory):
    """CUDA through torch: one part per GPU (part p on device p mod the GPU count), one
    thread per GPU, all at once.

    Each GPU builds, K-chunk by K-chunk (as large as GPU_CHUNK_SHARE of its free memory
    holds; in half precision at most HALF_CHUNK_MAX, since tensor cores truncate while they
    accumulate), its part's A and B with the int64 generator — fused into one kernel by
    ``torch.compile`` where that works (``fused_generator``), the bound counts on it —
    multiplies them into a float32 result (half-precision inputs: ``torch.mm(...,
    out_dtype=torch.float32)``, torch ≥ 2.8 on CUDA) and adds it to its C_p in float32
    (round to nearest); a half-precision result is rounded once, on the host, and handed
    over for hashing while the other GPUs still compute. TF32 is turned off: a float32
    challenge's elements have 24 significant bits, which TF32 (11) would round away, and
    the verifier rejects that (docs/protocol.md "Tolerance"); reduced-precision split-K
    reductions are turned off so half-precision products accumulate in float32.
    """

    name = "torch"
    GEN_CHUNK = 1 << 24  # int64 elements per generation step (128 MiB per temporary)
    chunks_inner = True

    def __init__(self, devices: list[Any] | None = None, *, fuse: bool = True) -> None:
        import torch

        self.torch = torch
        self.devices = devices or [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        self._ints = fused_generator(torch) if fuse and any(d.type == "cuda" for d in self.devices) else None

    def free_device_bytes(self, device: Any) -> int | None:
        return int(self.torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None

    def warm_up(self) -> bool:
        """Compile the fused generator now, for every dtype's width on every GPU, so no challenge
        pays for it (the miner calls this before it registers); False when it fell back to eager."""
        if self._ints is None:
            return False
        torch = self.torch
        for device in self.devices:
            rows = torch.arange(64, dtype=torch.int64, device=device)[:, None]
            cols = torch.arange(64, dtype=torch.int64, device=device)[None, :]
            for bits in sorted(set(gen.SIGNIFICAND_BITS.values())):
                got = self.ints(rows, cols, bits)
                if self._ints is None:
                    return False
                if not bool((got == gen.ints_int64(rows, cols, bits)).all()):  # never trust a miscompile
                    log.warning("fused challenge generator disagrees with the reference; using the unfused one")
                    self._ints = None
                    return False
        return True

    def ints(self, rows: Any, cols: Any, bits: int) -> Any:
        """q for int64 key vectors (rows × 1, 1 × cols): the fused kernel, else eager torch."""
        if self._ints is not None:
            try:
                return self._ints(rows, cols, bits)
            except Exception as exc:  # noqa: BLE001 - a compiler failure only costs speed
                log.warning("fused challenge generator failed (%s); using the unfused one", exc)
                self._ints = None
        return gen.ints_int64(rows, cols, bits)

    def matrix(self, row_keys: np.ndarray, col_keys: np.ndarray, dtype: Any, device: Any, bits: int) -> Any:
        """Element values (q / 2**bits, exact) in ``dtype`` on ``device``, generated in row chunks."""
        torch = self.torch
        out = torch.empty((row_keys.size, col_keys.size), dtype=dtype, device=device)
        cols = torch.from_numpy(col_keys.astype(np.int64)).to(device)[None, :]
        step = max(1, self.GEN_CHUNK // max(col_keys.size, 1))
        for s in range(0, row_keys.size, step):
            rows = torch.from_numpy(row_keys[s:s + step].astype(np.int64)).to(device)[:, None]
            out[s:s + step] = self.ints(rows, cols, bits).to(dtype) * gen.value_scale(bits)
        return out

    def products(self, params: ChallengeParams, deliver: Deliver) -> None:
        torch = self.torch
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[params.dtype]
        n, k, seed, bits = params.n, params.inner, params.seed, gen.bits_of(params.dtype)

        def part_product(device: Any, part: int) -> np.ndarray:
            a_rows, a_cols = gen.matrix_keys(seed, gen.part_matrix(part, gen.MATRIX_A), n, k)
            b_rows, b_cols = gen.matrix_keys(seed, gen.part_matrix(part, gen.MATRIX_B), k, n)
            free = self.free_device_bytes(device)
            kc = k if free is None else inner_chunk(params, 1, GPU_CHUNK_SHARE * free)
            kc = max(min(k, MIN_INNER_CHUNK), kc)
            # half precision on a GPU: GEMM calls of at most HALF_CHUNK_MAX of K, so the tensor
            # cores' truncating accumulation stays short; their results add up in float32
            step = HALF_CHUNK_MAX if dtype != torch.float32 and device.type == "cuda" else kc
            c = None
            for k0 in range(0, k, kc):
                a = self.matrix(a_rows, a_cols[k0:k0 + kc], dtype, device, bits)
                b = self.matrix(b_rows[k0:k0 + kc], b_cols, dtype, device, bits)
                width = min(kc, k - k0)
                for s0 in range(0, width, step):
                    chunk = (self.mm32(a, b, dtype, device) if step >= width else
                             self.mm32(a[:, s0:s0 + step], b[s0:s0 + step], dtype, device))
                    c = chunk if c is None else c.add_(chunk)
                    del chunk
                del a, b
            assert c is not None
            host = c.cpu().numpy()
            del c
            return round_to_dtype(host, params.dtype)

        def work(device: Any, parts: list[int]) -> None:
            ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
            with ctx:
                for part in parts:
                    deliver(part, part_product(device, part))
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        _run_per_device(work, self.devices, params)

    def mm32(self, a: Any, b: Any, dtype: Any, device: Any) -> Any:
        """a·b as float32 with float32 accumulation: on CUDA half-precision inputs stay on the
        tensor cores (out_dtype); elsewhere (tests on the CPU) the exact inputs are widened."""
        torch = self.torch
        if dtype == torch.float32:
            return a @ b
        if device.type == "cuda":
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except TypeError:  # torch < 2.8: no float32 output from half-precision inputs
                raise RuntimeError("half-precision challenges need torch >= 2.8 (torch.mm with out_dtype); "
                                   f"this is torch {getattr(torch, '__version__', '?')}") from None
        return a.float() @ b.float()


def fused_generator(torch: Any) -> Callable[[Any, Any, int], Any] | None:
    """``gen.ints_int64`` compiled by torch.compile into one elementwise kernel, or None.

    Unfused, the generator is ~20 torch kernels each reading and writing every int64
    element; fused it writes each element once, which is what the bound's generation term
    assumes (params.GEN_FLOPS_PER_ELEMENT).
    ``dynamic=True`` so every chunk shape reuses one kernel; the miner warms it up once at
    start (``warm_up``), so no challenge pays the compilation.
    """
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        return None
    try:
        return compile_fn(gen.ints_int64, dynamic=True)
    except Exception as exc:  # noqa: BLE001 - no compiler: the eager generator still works
        log.info("torch.compile unavailable for the challenge generator: %s", exc)
        return None


class CupyBackend(_GpuMemory):
    """CUDA through cupy with the uint32 generator (same code as numpy), one part per GPU.
    bfloat16 has no cupy dtype, so it is computed in float32 and rounded on the host (same values)."""

    name = "cupy"

    def __init__(self, devices: list[int] | None = None) -> None:
        import cupy

        self.cp = cupy
        self.devices = devices or list(range(cupy.cuda.runtime.getDeviceCount()))

    def free_device_bytes(self, device: Any) -> int | None:
        with self.cp.cuda.Device(device):
            return int(self.cp.cuda.runtime.memGetInfo()[0])

    def device_bytes(self, params: ChallengeParams, per_device: int) -> int:
        return per_device * (2 if params.dtype == "bfloat16" else 1)  # float32 result, rounded on the host

    def products(self, params: ChallengeParams, deliver: Deliver) -> None:
        cp = self.cp
        dtype = cp.float16 if params.dtype == "float16" else cp.float32
        n, k, seed, bits = params.n, params.inner, params.seed, gen.bits_of(params.dtype)

        def values(rows: np.ndarray, cols: np.ndarray) -> Any:
            return (gen.ints_uint32(cp, cp.asarray(rows), cp.asarray(cols), bits).astype(dtype)
                    * dtype(gen.value_scale(bits)))

        def work(device: int, parts: list[int]) -> None:
            with cp.cuda.Device(device):
                for part in parts:
                    a_rows, a_cols = gen.matrix_keys(seed, gen.part_matrix(part, gen.MATRIX_A), n, k)
                    b_rows, b_cols = gen.matrix_keys(seed, gen.part_matrix(part, gen.MATRIX_B), k, n)
                    c = cp.matmul(values(a_rows, a_cols), values(b_rows, b_cols))
                    host = cp.asnumpy(c.astype(cp.float32))
                    del c
                    cp.get_default_memory_pool().free_all_blocks()
                    deliver(part, round_to_dtype(host, params.dtype))

        _run_per_device(work, self.devices, params)


