"""Cheating provers for tests (importable by end-to-end tests that start a real miner).

Each one defeats a different part of the protocol, so each is caught by exactly one
check: CorruptingProver by the entry check, LazyProver by the Merkle check, SlowProver
by the time bound. Use with ChallengeService(prover=...) or, for a miner process,
prime.challenge.prover.load_prover("tests.challenge.cheaters:CorruptingProver").
"""

from __future__ import annotations

import os
import time

import numpy as np

from prime.challenge import generator as gen
from prime.challenge.merkle import MerkleTree, tree_depth
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import Commitment, MatmulProver, NumpyBackend, RowOpening


class CorruptingProver(MatmulProver):
    """Computes C, then changes a fraction of its entries *before* committing.

    Its openings match its root perfectly; only recomputing entries exposes it.
    """

    def __init__(self, fraction: float = 0.10, delta: float = 0.5, seed: int | None = None) -> None:
        super().__init__(NumpyBackend())
        self.fraction = fraction
        self.delta = delta
        self.rng = np.random.default_rng(seed)

    def compute(self, params: ChallengeParams) -> np.ndarray:
        c = super().compute(params)
        flat = c.reshape(-1)
        wrong = self.rng.choice(flat.size, size=max(1, int(self.fraction * flat.size)), replace=False)
        flat[wrong] += np.float32(self.delta)
        return c


class LazyProver(MatmulProver):
    """Commits to a random root without computing anything, then at opening time computes
    only the requested rows — correct values, but paths that cannot match the root."""

    def __init__(self) -> None:
        super().__init__(NumpyBackend())

    def commit(self, params: ChallengeParams) -> Commitment:
        started = time.perf_counter()
        fake = MerkleTree(leaf_count=params.n, levels=[[os.urandom(32)]])
        return Commitment(params=params, root=fake.root, tree=fake, rows=np.empty((0, params.n), np.float32),
                          elapsed_s=time.perf_counter() - started, backend="lazy")

    def open(self, commitment: Commitment, rows: list[int]) -> list[RowOpening]:
        p = commitment.params
        a = gen.matrix_values(p.seed, gen.MATRIX_A, rows, np.arange(p.inner)).astype(np.float64)
        b = gen.matrix_values(p.seed, gen.MATRIX_B, np.arange(p.inner), np.arange(p.n)).astype(np.float64)
        values = (a @ b).astype(np.float32)
        depth = tree_depth(p.n)
        return [RowOpening(index=i, values=values[t], path=[os.urandom(32) for _ in range(depth)])
                for t, i in enumerate(rows)]


class SlowProver(MatmulProver):
    """Honest, but slower than the claimed hardware could be (sleeps before answering)."""

    def __init__(self, delay_s: float = 1.0) -> None:
        super().__init__(NumpyBackend())
        self.delay_s = delay_s

    def commit(self, params: ChallengeParams) -> Commitment:
        commitment = super().commit(params)
        time.sleep(self.delay_s)
        return commitment


class SwappingProver(MatmulProver):
    """Computes and commits honestly, then answers an opening with another row's values
    and path — a Merkle path is bound to its position, so this must fail."""

    def __init__(self) -> None:
        super().__init__(NumpyBackend())

    def open(self, commitment: Commitment, rows: list[int]) -> list[RowOpening]:
        n = commitment.params.n
        out = []
        for i in rows:
            j = (i + 1) % n
            out.append(RowOpening(index=i, values=commitment.rows[j].copy(), path=commitment.tree.path(j)))
        return out
