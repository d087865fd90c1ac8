"""Miner side of the challenge: compute C = A·B, commit to its rows, open rows on request.

Compute backends: torch (CUDA) or cupy when importable *and* a GPU is present, numpy
otherwise. Each returns C on the host as float32 holding exactly the values of the
challenge's dtype (float16/bfloat16 results are widened, which is exact). The prover is
a strategy object so tests can substitute cheating ones (tests/challenge/cheaters.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from prime.challenge import generator as gen
from prime.challenge.merkle import ROW_DTYPE, MerkleTree, hash_rows
from prime.challenge.params import (
    GPU_CHUNK_SHARE,
    HALF_CHUNK_MAX,
    MIN_INNER_CHUNK,
    ChallengeParams,
    inner_chunk,
    prover_bytes,
)
from prime.protocol.challenge import ROW_ITEMSIZE, OpenedRow

log = logging.getLogger(__name__)

# Share of the currently free memory a challenge may take.
MEMORY_HEADROOM = 0.8


# ------------------------------------------------------------------ results
@dataclass
class Commitment:
    """A computed and committed challenge, kept by the miner until it is opened."""

    params: ChallengeParams
    root: bytes
    tree: MerkleTree
    rows: np.ndarray  # float32, n × n
    elapsed_s: float
    backend: str

    def nbytes(self) -> int:
        return int(self.rows.nbytes)


@dataclass(frozen=True)
class RowOpening:
    """One opened row: its values and the Merkle path from its leaf to the root."""

    index: int
    values: np.ndarray  # float32, length n
    path: list[bytes]

    def to_wire(self) -> OpenedRow:
        """As the wire message: the row's little-endian float32 bytes, the path's digests."""
        values = np.ascontiguousarray(self.values, dtype=ROW_DTYPE).tobytes()
        return OpenedRow(index=self.index, values=values, path=list(self.path))

    @classmethod
    def from_wire(cls, row: OpenedRow, n: int) -> RowOpening:
        """The opening of a decoded OpenedRow; ValueError unless it holds exactly n values."""
        if len(row.values) != ROW_ITEMSIZE * n:
            raise ValueError(f"row {row.index}: values must be {ROW_ITEMSIZE * n} bytes "
                             f"({n} float32), not {len(row.values)}")
        return cls(index=row.index, values=np.frombuffer(row.values, dtype=ROW_DTYPE), path=row.path)


# ------------------------------------------------------------------ output rounding
def round_to_dtype(c: np.ndarray, dtype: str) -> np.ndarray:
    """Round a float32 array in place to the challenge dtype's values (kept as float32)."""
    if dtype == "float16":
        c[...] = c.astype(np.float16)
    elif dtype == "bfloat16":
        bits = c.view(np.uint32)
        # round to nearest, ties to even, on the upper 16 bits (values are finite here)
        bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        bits &= np.uint32(0xFFFF0000)
    return c


# ------------------------------------------------------------------ backends
class ComputeBackend(Protocol):
    name: str

    def product(self, params: ChallengeParams) -> np.ndarray: ...

    def required_bytes(self, params: ChallengeParams) -> int: ...

    def memory_problem(self, params: ChallengeParams) -> str | None: ...


def _host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class NumpyBackend:
    """CPU: float32 BLAS over repeat blocks of n×n on the generator's integers q (exact
    inputs for every dtype, float32 accumulation), scaled by a power of two; half-precision
    results are rounded once at the end."""

    name = "numpy"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or gen.worker_count()

    def required_bytes(self, params: ChallengeParams) -> int:
        return prover_bytes(params)[0]

    def memory_problem(self, params: ChallengeParams) -> str | None:
        need, free = self.required_bytes(params), int(_host_available_bytes() * MEMORY_HEADROOM)
        if need > free:
            return f"needs {need} bytes of RAM but only {free} are free"
        return None

    def product(self, params: ChallengeParams) -> np.ndarray:
        n, seed, bits = params.n, params.seed, gen.bits_of(params.dtype)
        a_rows = gen.axis_keys(seed, gen.MATRIX_A, gen.AXIS_ROW, np.arange(n))
        b_cols = gen.axis_keys(seed, gen.MATRIX_B, gen.AXIS_COL, np.arange(n))
        a = np.empty((n, n), np.float32)
        b = np.empty((n, n), np.float32)
        c = np.empty((n, n), np.float32)
        tmp: np.ndarray | None = None  # the second and later blocks' product (repeat > 1 only)
        for r in range(params.repeat):
            block = np.arange(r * n, (r + 1) * n)
            gen.fill_ints(a_rows, gen.axis_keys(seed, gen.MATRIX_A, gen.AXIS_COL, block), a,
                          bits=bits, threads=self.threads)
            gen.fill_ints(gen.axis_keys(seed, gen.MATRIX_B, gen.AXIS_ROW, block), b_cols, b,
                          bits=bits, threads=self.threads)
            if r == 0:
                np.matmul(a, b, out=c)
            else:
                if tmp is None:
                    tmp = np.empty((n, n), np.float32)
                np.matmul(a, b, out=tmp)
                c += tmp  # float32 accumulation, like the blocks' own
        del a, b, tmp
        c *= np.float32(gen.value_scale(2 * bits))  # q products → values; a power of two, exact
        return round_to_dtype(c, params.dtype)


def _device_rows(n: int, parts: int) -> list[np.ndarray]:
    return [r for r in np.array_split(np.arange(n), parts) if r.size]


def _run_per_device(work: Any, devices: list[Any], splits: list[np.ndarray]) -> None:
    if len(splits) == 1:
        work(devices[0], splits[0])
        return
    with ThreadPoolExecutor(max_workers=len(splits)) as pool:
        list(pool.map(work, devices[: len(splits)], splits))


class _GpuMemory:
    """What the GPU backends share: the memory a challenge needs on the host and on each device.

    A backend that ``chunks_inner`` multiplies K in chunks as large as fit GPU_CHUNK_SHARE of
    a device's free memory, so it only needs room for the smallest chunk; one that does not
    holds all of K at once.
    """

    devices: list[Any]
    chunks_inner = False

    def _chunk(self, params: ChallengeParams) -> int | None:
        return min(params.inner, MIN_INNER_CHUNK) if self.chunks_inner else None

    def free_device_bytes(self, device: Any) -> int | None:
        """Free bytes on ``device`` (None: not a GPU, nothing to check)."""
        raise NotImplementedError

    def device_bytes(self, params: ChallengeParams, per_device: int) -> int:
        return per_device

    def required_bytes(self, params: ChallengeParams) -> int:
        host, device = prover_bytes(params, gpu_count=len(self.devices), inner_chunk=self._chunk(params))
        return host + device * len(self.devices)

    def memory_problem(self, params: ChallengeParams) -> str | None:
        host, device = prover_bytes(params, gpu_count=len(self.devices), inner_chunk=self._chunk(params))
        free_host = int(_host_available_bytes() * MEMORY_HEADROOM)
        if host > free_host:
            return f"needs {host} bytes of RAM but only {free_host} are free"
        for d in self.devices:
            free_raw = self.free_device_bytes(d)
            if free_raw is None:
                continue
            free = int(free_raw * MEMORY_HEADROOM)
            if self.device_bytes(params, device) > free:
                return f"needs {device} bytes on GPU {d} but only {free} are free"
        return None


class TorchBackend(_GpuMemory):
    """CUDA through torch: rows of C split across the GPUs, one thread per GPU.

    Each GPU builds, K-chunk by K-chunk (as large as GPU_CHUNK_SHARE of its free memory
    holds; in half precision at most HALF_CHUNK_MAX, since tensor cores truncate while they
    accumulate), its band of A and the chunk of B with the int64 generator, multiplies them
    into a float32 result (half-precision inputs: ``torch.mm(..., out_dtype=torch.float32)``,
    torch ≥ 2.8 on CUDA) and adds it to its band of C in float32 (round to nearest); a
    half-precision result is rounded once, on the host. TF32 is turned off: a
    float32 challenge's elements have 24 significant bits, which TF32 (11) would round
    away, and the verifier rejects that (docs/protocol.md "Tolerance"); reduced-precision
    split-K reductions are turned off so half-precision products accumulate in float32.
    """

    name = "torch"
    GEN_CHUNK = 1 << 24  # int64 elements per generation step (128 MiB per temporary)
    chunks_inner = True

    def __init__(self, devices: list[Any] | None = None) -> None:
        import torch

        self.torch = torch
        self.devices = devices or [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

    def free_device_bytes(self, device: Any) -> int | None:
        return int(self.torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None

    def matrix(self, row_keys: np.ndarray, col_keys: np.ndarray, dtype: Any, device: Any, bits: int) -> Any:
        """Element values (q / 2**bits, exact) in ``dtype`` on ``device``, generated in row chunks."""
        torch = self.torch
        out = torch.empty((row_keys.size, col_keys.size), dtype=dtype, device=device)
        cols = torch.from_numpy(col_keys.astype(np.int64)).to(device)[None, :]
        step = max(1, self.GEN_CHUNK // max(col_keys.size, 1))
        for s in range(0, row_keys.size, step):
            rows = torch.from_numpy(row_keys[s:s + step].astype(np.int64)).to(device)[:, None]
            out[s:s + step] = gen.ints_int64(rows, cols, bits).to(dtype) * gen.value_scale(bits)
        return out

    def product(self, params: ChallengeParams) -> np.ndarray:
        torch = self.torch
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[params.dtype]
        n, k, seed, bits = params.n, params.inner, params.seed, gen.bits_of(params.dtype)
        a_rows, a_cols = gen.matrix_keys(seed, gen.MATRIX_A, n, k)
        b_rows, b_cols = gen.matrix_keys(seed, gen.MATRIX_B, k, n)
        out = np.empty((n, n), np.float32)
        splits = _device_rows(n, len(self.devices))

        def work(device: Any, rows: np.ndarray) -> None:
            ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
            with ctx:
                free = self.free_device_bytes(device)
                kc = k if free is None else inner_chunk(params, len(self.devices), GPU_CHUNK_SHARE * free)
                kc = max(min(k, MIN_INNER_CHUNK), kc)
                # half precision on a GPU: GEMM calls of at most HALF_CHUNK_MAX of K, so the tensor
                # cores' truncating accumulation stays short; their results add up in float32
                step = HALF_CHUNK_MAX if dtype != torch.float32 and device.type == "cuda" else kc
                c = None
                for k0 in range(0, k, kc):
                    a = self.matrix(a_rows[rows], a_cols[k0:k0 + kc], dtype, device, bits)
                    b = self.matrix(b_rows[k0:k0 + kc], b_cols, dtype, device, bits)
                    width = min(kc, k - k0)
                    for s0 in range(0, width, step):
                        part = (self.mm32(a, b, dtype, device) if step >= width else
                                self.mm32(a[:, s0:s0 + step], b[s0:s0 + step], dtype, device))
                        c = part if c is None else c.add_(part)
                        del part
                    del a, b
                assert c is not None
                out[rows[0]:rows[-1] + 1] = c.cpu().numpy()
                del c
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        _run_per_device(work, self.devices, splits)
        return round_to_dtype(out, params.dtype)

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


class CupyBackend(_GpuMemory):
    """CUDA through cupy with the uint32 generator (same code as numpy). bfloat16 has no
    cupy dtype, so it is computed in float32 and rounded on the host (same values)."""

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

    def product(self, params: ChallengeParams) -> np.ndarray:
        cp = self.cp
        dtype = cp.float16 if params.dtype == "float16" else cp.float32
        n, k, seed, bits = params.n, params.inner, params.seed, gen.bits_of(params.dtype)
        a_rows, a_cols = gen.matrix_keys(seed, gen.MATRIX_A, n, k)
        b_rows, b_cols = gen.matrix_keys(seed, gen.MATRIX_B, k, n)
        out = np.empty((n, n), np.float32)
        splits = _device_rows(n, len(self.devices))

        def values(rows: np.ndarray, cols: np.ndarray) -> Any:
            return (gen.ints_uint32(cp, cp.asarray(rows), cp.asarray(cols), bits).astype(dtype)
                    * dtype(gen.value_scale(bits)))

        def work(device: int, rows: np.ndarray) -> None:
            with cp.cuda.Device(device):
                c = cp.matmul(values(a_rows[rows], a_cols), values(b_rows, b_cols))
                out[rows[0]:rows[-1] + 1] = cp.asnumpy(c.astype(cp.float32))
                del c
                cp.get_default_memory_pool().free_all_blocks()

        _run_per_device(work, self.devices, splits)
        return round_to_dtype(out, params.dtype)


_probe_lock = threading.Lock()
_probed: ComputeBackend | None = None


def detect_backend(prefer: str | None = None) -> ComputeBackend:
    """torch (CUDA) if importable with a GPU, else cupy with a GPU, else numpy.

    ``prefer`` ("torch", "cupy", "numpy") picks one explicitly. Probing is lazy and any
    failure (no driver, no device, broken install) degrades to numpy with a log line.
    """
    global _probed
    if prefer == "numpy":
        return NumpyBackend()
    with _probe_lock:
        if _probed is not None and prefer is None:
            return _probed
        candidates = [prefer] if prefer else ["torch", "cupy"]
        chosen: ComputeBackend = NumpyBackend()
        for name in candidates:
            try:
                if name == "torch":
                    import torch

                    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
                        chosen = TorchBackend()
                        break
                elif name == "cupy":
                    import cupy

                    if cupy.cuda.runtime.getDeviceCount() > 0:
                        chosen = CupyBackend()
                        break
            except Exception as exc:  # noqa: BLE001 - any probe failure means "not this one"
                log.info("challenge backend %s unavailable: %s", name, exc)
        if prefer is None:
            _probed = chosen
        return chosen


# ------------------------------------------------------------------ provers
class Prover(Protocol):
    """What the miner's challenge service needs from a prover."""

    @property
    def name(self) -> str: ...

    def required_bytes(self, params: ChallengeParams) -> int: ...

    def memory_problem(self, params: ChallengeParams) -> str | None: ...

    def commit(self, params: ChallengeParams) -> Commitment: ...

    def open(self, commitment: Commitment, rows: list[int]) -> list[RowOpening]: ...


class MatmulProver:
    """The honest prover: compute C, hash its rows, build the tree, open rows on demand."""

    def __init__(self, backend: ComputeBackend | None = None) -> None:
        self._backend = backend

    @property
    def backend(self) -> ComputeBackend:
        if self._backend is None:
            self._backend = detect_backend()
        return self._backend

    @property
    def name(self) -> str:
        return self.backend.name

    def required_bytes(self, params: ChallengeParams) -> int:
        return self.backend.required_bytes(params)

    def memory_problem(self, params: ChallengeParams) -> str | None:
        return self.backend.memory_problem(params)

    def compute(self, params: ChallengeParams) -> np.ndarray:
        return self.backend.product(params)

    def commit(self, params: ChallengeParams) -> Commitment:
        started = time.perf_counter()
        c = self.compute(params)
        tree = MerkleTree.from_leaves(hash_rows(c))
        return Commitment(params=params, root=tree.root, tree=tree, rows=c,
                          elapsed_s=time.perf_counter() - started, backend=self.name)

    def open(self, commitment: Commitment, rows: list[int]) -> list[RowOpening]:
        return [RowOpening(index=i, values=commitment.rows[i].copy(), path=commitment.tree.path(i))
                for i in rows]


def load_prover(spec: str) -> Prover:
    """Build a prover from "package.module:factory" (a class or function taking no arguments).

    Lets a miner be started with a different prover (e.g. a cheating one in end-to-end
    tests) without code changes; "" or "default" gives the honest MatmulProver.
    """
    if spec in ("", "default"):
        return MatmulProver()
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"prover spec {spec!r} must look like 'package.module:factory'")
    import importlib

    factory = getattr(importlib.import_module(module_name), attr)
    return factory()
