"""Compute backends of the challenge prover: what they promise, and the CPU one (numpy).

A backend computes every part's C_p = A_p·B_p of a challenge and hands each, as float32
on the host holding exactly the values of the challenge's dtype, to a ``deliver``
callback as soon as it is done (prover.MatmulProver hashes it then). The GPU backends
(torch, cupy) live in gpu.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from prime.challenge import generator as gen
from prime.challenge.params import ChallengeParams, prover_bytes

# Share of the currently free memory a challenge may take.
MEMORY_HEADROOM = 0.8


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
Deliver = Callable[[int, np.ndarray], None]  # (part, its C_p as float32 n × n, rounded to the dtype)


class ComputeBackend(Protocol):
    name: str

    def products(self, params: ChallengeParams, deliver: Deliver) -> None:
        """Compute every part's C_p and hand each to ``deliver`` as soon as it is done (from
        the thread that computed it: parts on different GPUs are delivered concurrently)."""
        ...

    def parallel_parts(self, params: ChallengeParams) -> int:
        """How many parts are computed (and delivered) at the same time."""
        ...

    def required_bytes(self, params: ChallengeParams) -> int: ...

    def memory_problem(self, params: ChallengeParams) -> str | None: ...


def stacked_product(backend: ComputeBackend, params: ChallengeParams) -> np.ndarray:
    """Every part's C_p stacked (parts·n × n, float32): for tests and the benchmark."""
    out = np.empty((params.rows, params.n), np.float32)

    def keep(part: int, c: np.ndarray) -> None:
        out[part * params.n:(part + 1) * params.n] = c

    backend.products(params, keep)
    return out


def _host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class NumpyBackend:
    """CPU: float32 BLAS over repeat blocks of n×n on the generator's integers q (exact
    inputs for every dtype, float32 accumulation), scaled by a power of two; half-precision
    results are rounded once at the end. Parts one after the other (a CPU node has one)."""

    name = "numpy"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or gen.worker_count()

    def parallel_parts(self, params: ChallengeParams) -> int:
        return 1

    def required_bytes(self, params: ChallengeParams) -> int:
        return prover_bytes(params)[0]

    def memory_problem(self, params: ChallengeParams) -> str | None:
        need, free = self.required_bytes(params), int(_host_available_bytes() * MEMORY_HEADROOM)
        if need > free:
            return f"needs {need} bytes of RAM but only {free} are free"
        return None

    def products(self, params: ChallengeParams, deliver: Deliver) -> None:
        for part in range(params.parts):
            deliver(part, self.part_product(params, part))

    def product(self, params: ChallengeParams) -> np.ndarray:
        """Every part's C_p stacked (the single part's C for a one-part challenge)."""
        return stacked_product(self, params)

    def part_product(self, params: ChallengeParams, part: int) -> np.ndarray:
        n, seed, bits = params.n, params.seed, gen.bits_of(params.dtype)
        ma, mb = gen.part_matrix(part, gen.MATRIX_A), gen.part_matrix(part, gen.MATRIX_B)
        a_rows = gen.axis_keys(seed, ma, gen.AXIS_ROW, np.arange(n))
        b_cols = gen.axis_keys(seed, mb, gen.AXIS_COL, np.arange(n))
        a = np.empty((n, n), np.float32)
        b = np.empty((n, n), np.float32)
        c = np.empty((n, n), np.float32)
        tmp: np.ndarray | None = None  # the second and later blocks' product (repeat > 1 only)
        for r in range(params.repeat):
            block = np.arange(r * n, (r + 1) * n)
            gen.fill_ints(a_rows, gen.axis_keys(seed, ma, gen.AXIS_COL, block), a,
                          bits=bits, threads=self.threads)
            gen.fill_ints(gen.axis_keys(seed, mb, gen.AXIS_ROW, block), b_cols, b,
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


