"""Benchmark of the proof-of-compute challenge (prints figures; not part of the tests).

For each n: the prover's time (generate A and B, multiply, hash rows, build the tree),
the validator's time (its generation included), the time to recompute C fully (what a
validator without this protocol would spend: generate A and B and multiply), their
ratio, and the prover's FLOP/s against a plain numpy matmul of two ready float32
matrices in the same run.

    python bench/challenge.py                     # n = 1024, 2048, 4096, 8192
    python bench/challenge.py --sizes 1024,2048   # shorter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import time

import numpy as np

from prime.challenge.params import (
    DEFAULT_K,
    DEFAULT_M,
    ChallengeParams,
    pass_probability_bound,
)
from prime.challenge.prover import MatmulProver, NumpyBackend, detect_backend
from prime.challenge.runner import parse_openings
from prime.challenge.verifier import (
    check_entries,
    check_openings,
    draw_samples,
    rows_to_open,
)


def best_of(runs: int, fn) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def plain_matmul_s(n: int, inner: int, runs: int, rng: np.random.Generator) -> float:
    """Plain numpy matmul of two ready float32 matrices: the throughput ceiling here."""
    a = rng.standard_normal((n, inner), dtype=np.float32)
    b = rng.standard_normal((inner, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    return best_of(runs, lambda: np.matmul(a, b, out=c))


def warm_memory(n: int) -> None:
    """The first touch of fresh memory is slow on some VMs; pay it before timing anything."""
    block = np.empty((5 * n * n,), np.float32)
    block.fill(1.0)
    del block


def bench_size(n: int, *, dtype: str, repeat: int, k: int, m: int, runs: int) -> dict:
    params = ChallengeParams(id=f"bench-{n}", seed=secrets.randbits(64), n=n, dtype=dtype, repeat=repeat)
    flops = params.flops
    rng = np.random.default_rng(0)

    numpy_s = plain_matmul_s(n, params.inner, runs, rng)

    prover = MatmulProver(detect_backend())
    holder: dict = {}
    prover_s = best_of(runs, lambda: holder.__setitem__("commitment", prover.commit(params)))
    commitment = holder.pop("commitment")

    recompute_s = best_of(runs, lambda: NumpyBackend().product(params))

    # validator: what arrives over HTTP is JSON; time with and without decoding it
    full_s, verify_s = float("inf"), float("inf")
    for _ in range(max(3, runs)):
        draws = draw_samples(n, k, m)
        rows = rows_to_open(draws)
        wire = json.dumps({"rows": [o.to_json() for o in prover.open(commitment, rows)]})
        t0 = time.perf_counter()
        openings, problem = parse_openings(json.loads(wire), n)
        t1 = time.perf_counter()
        assert problem is None
        assert check_openings(commitment.root, n, rows, openings) is None
        assert check_entries(params, draws, openings) is None
        t2 = time.perf_counter()
        full_s, verify_s = min(full_s, t2 - t0), min(verify_s, t2 - t1)
    return {
        "n": n, "backend": prover.name, "prover_s": prover_s, "validator_s": verify_s,
        "validator_with_decode_s": full_s, "recompute_s": recompute_s,
        "ratio": verify_s / recompute_s, "ratio_with_decode": full_s / recompute_s,
        "prover_flops": flops / prover_s, "numpy_flops": flops / numpy_s,
        "efficiency": numpy_s / prover_s, "opened_rows": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,4096,8192")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--m", type=int, default=DEFAULT_M)
    parser.add_argument("--runs", type=int, default=0, help="timed runs per figure (default: 3 below n=4096, else 1)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    warm_memory(max(sizes))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print(f"k={args.k} rows, m={args.m} entries per row, dtype={args.dtype}, repeat={args.repeat}; "
          f"a prover with 10% wrong entries passes with p <= {pass_probability_bound(args.k):.2e}")
    head = (f"{'n':>6} {'backend':>7} {'prover s':>9} {'validator ms':>12} {'+decode ms':>10} "
            f"{'recompute s':>11} {'ratio':>8} {'+decode':>8} {'prover GF/s':>11} {'numpy GF/s':>10} {'eff':>6}")
    print(head)
    for n in sizes:
        runs = args.runs or (3 if n < 4096 else 1)
        r = bench_size(n, dtype=args.dtype, repeat=args.repeat, k=args.k, m=args.m, runs=runs)
        print(f"{r['n']:>6} {r['backend']:>7} {r['prover_s']:>9.3f} {r['validator_s'] * 1e3:>12.2f} "
              f"{r['validator_with_decode_s'] * 1e3:>10.2f} {r['recompute_s']:>11.3f} "
              f"{r['ratio'] * 100:>7.3f}% {r['ratio_with_decode'] * 100:>7.3f}% "
              f"{r['prover_flops'] / 1e9:>11.1f} {r['numpy_flops'] / 1e9:>10.1f} {r['efficiency'] * 100:>5.1f}%",
              flush=True)


if __name__ == "__main__":
    main()
