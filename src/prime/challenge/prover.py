"""Miner side of the challenge: compute C = A·B, commit to its rows, open rows on request.

Compute backends: torch (CUDA) or cupy when importable *and* a GPU is present, numpy
otherwise. Each hands every part's C_p to the prover on the host as float32 holding exactly
the values of the challenge's dtype (float16/bfloat16 results are widened, which is exact),
as soon as that part is done; the prover keeps it in the dtype's committed encoding. The prover is
a strategy object so tests can substitute cheating ones (tests/challenge/cheaters.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from prime.challenge import generator as gen
from prime.challenge.backends import (
    MEMORY_HEADROOM,
    ComputeBackend,
    NumpyBackend,
    round_to_dtype,
    stacked_product,
)
from prime.challenge.gpu import CupyBackend, TorchBackend, _GpuMemory
from prime.challenge.merkle import COMMITTED_DTYPE, ROW_DTYPE, MerkleTree, committed_rows, hash_rows, row_values
from prime.challenge.params import ChallengeParams
from prime.protocol.challenge import ROW_ITEMSIZE, OpenedRow

log = logging.getLogger(__name__)

# Re-exported: tests and tools import the backends from here.
__all__ = ["MEMORY_HEADROOM", "Commitment", "ComputeBackend", "CupyBackend", "MatmulProver", "NumpyBackend",
           "Prover", "RowOpening", "TorchBackend", "_GpuMemory", "detect_backend", "load_prover",
           "round_to_dtype", "stacked_product"]

# ------------------------------------------------------------------ results
@dataclass
class Commitment:
    """A computed and committed challenge, kept by the miner until it is opened."""

    params: ChallengeParams
    root: bytes
    tree: MerkleTree
    rows: np.ndarray  # parts·n × n, in the dtype's committed encoding (merkle.COMMITTED_DTYPE)
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
        """Every part's C_p stacked, float32 (a subclass may override it to alter C: test provers)."""
        return stacked_product(self.backend, params)

    def commit(self, params: ChallengeParams) -> Commitment:
        """Compute every part, hash its rows as soon as it is done (its own threads: parts on
        several GPUs are hashed while the others compute), build the tree over all rows."""
        started = time.perf_counter()
        n, dtype = params.n, params.dtype
        store = np.empty((params.rows, n), COMMITTED_DTYPE[dtype])
        leaves: list[bytes] = [b""] * params.rows
        threads = max(1, gen.worker_count() // self.backend.parallel_parts(params))

        def deliver(part: int, c: np.ndarray) -> None:
            band = store[part * n:(part + 1) * n]
            band[...] = committed_rows(c, dtype)  # exact: c holds the dtype's values
            leaves[part * n:(part + 1) * n] = hash_rows(band, threads=threads)

        if type(self).compute is not MatmulProver.compute:  # a subclass alters the stacked C
            c = self.compute(params)
            for part in range(params.parts):
                deliver(part, c[part * n:(part + 1) * n])
        else:
            self.backend.products(params, deliver)
        tree = MerkleTree.from_leaves(leaves)
        return Commitment(params=params, root=tree.root, tree=tree, rows=store,
                          elapsed_s=time.perf_counter() - started, backend=self.name)

    def open(self, commitment: Commitment, rows: list[int]) -> list[RowOpening]:
        dtype = commitment.params.dtype
        return [RowOpening(index=i, values=row_values(commitment.rows[i], dtype), path=commitment.tree.path(i))
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
