"""Benchmark of the proof-of-compute challenge (prints figures; not part of the tests).

For each n: the prover's time (generate A and B, multiply, hash rows, build the tree),
the validator's time (its generation included), the time to recompute C fully (what a
validator without this protocol would spend: generate A and B and multiply), their
ratio, and the prover's FLOP/s against a plain numpy matmul of two ready float32
matrices in the same run.

"+decode" adds decoding the opening answer exactly as it arrives: the bytes the miner's
route sends (prime.protocol.challenge.OpeningAnswer, rows as base64 of float32) through
the validator's decode path (runner.read_openings: msgspec, length checks, frombuffer).
"+hex" is the same with the decoding the rows cost before (one JSON object per row with
the values as hex, json.loads + bytes.fromhex), measured on the same rows in the same run.

Before that, the class table (issue 12): per class of docs/protocol.md's GPU table (1, 2
and 8 GPUs of each model variant) and CPU nodes of 1, 2, 8 and 64 cores, the planned
challenge (n, K, work in TFLOP), the share of one GPU's memory (or of the claimed RAM) it
takes, the bound, the spoof margin (the slowest throughput that passes with no fixed
costs at all, as a share of the claimed peak) and, for the CPU class with this machine's
cores, the honest time of the planned challenge here and the share of the class's peak
it reached.

    python bench/challenge.py                     # classes, then n = 1024, 2048, 4096, 8192
    python bench/challenge.py --sizes 1024,2048   # shorter
    python bench/challenge.py --classes-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from prime.challenge.classes import GPU_MODELS
from prime.challenge.generator import worker_count
from prime.challenge.merkle import hash_rows
from prime.challenge.params import (
    DEFAULT_K,
    DEFAULT_M,
    HASH_THREADS_PER_GPU,
    HOST_HASH_RATE,
    checked_params,
    claimed_class,
    memory_share,
    pass_probability_bound,
    plan_challenge,
    spoof_margin,
    time_budget,
)
from prime.challenge.prover import (
    MatmulProver,
    NumpyBackend,
    RowOpening,
    detect_backend,
)
from prime.challenge.runner import read_openings
from prime.challenge.verifier import (
    check_entries,
    check_openings,
    draw_samples,
    rows_to_open,
)
from prime.protocol.challenge import OpeningAnswer, encode


def best_of(runs: int, fn: Callable[[], Any]) -> float:
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


def hex_wire(ident: str, opened: list[RowOpening]) -> bytes:
    """The opening answer as it was before (values as hex), for the comparison column."""
    rows = [{"index": o.index, "values": np.ascontiguousarray(o.values, "<f4").tobytes().hex(),
             "path": [p.hex() for p in o.path]} for o in opened]
    return json.dumps({"id": ident, "rows": rows}).encode()


def hex_decode(raw: bytes, n: int) -> dict[int, np.ndarray]:
    """The old decode path: json.loads, then bytes.fromhex and frombuffer per row."""
    out = {}
    for row in json.loads(raw)["rows"]:
        if len(row["values"]) != 8 * n:
            raise ValueError("wrong length")
        [bytes.fromhex(p) for p in row["path"]]
        out[row["index"]] = np.frombuffer(bytes.fromhex(row["values"]), "<f4")
    return out


def bench_size(n: int, *, dtype: str, repeat: int, k: int, m: int, runs: int) -> dict[str, Any]:
    params = checked_params({"id": f"bench-{n}", "seed": secrets.randbits(64), "n": n, "dtype": dtype,
                             "repeat": repeat})
    flops = params.flops
    rng = np.random.default_rng(0)

    numpy_s = plain_matmul_s(n, params.inner, runs, rng)

    prover = MatmulProver(detect_backend())
    holder: dict[str, Any] = {}
    prover_s = best_of(runs, lambda: holder.__setitem__("commitment", prover.commit(params)))
    commitment = holder.pop("commitment")

    recompute_s = best_of(runs, lambda: NumpyBackend().product(params))

    # validator: the answer's bytes exactly as the miner's route encodes them; time the
    # checks with and without decoding them, and the old hex decoding of the same rows
    full_s, verify_s, hex_s = float("inf"), float("inf"), float("inf")
    for _ in range(max(5, runs)):
        draws = draw_samples(n, k, m)
        rows = rows_to_open(draws)
        opened = prover.open(commitment, rows)
        wire = encode(OpeningAnswer(id=params.id, rows=[o.to_wire() for o in opened]))
        old = hex_wire(params.id, opened)
        t0 = time.perf_counter()
        openings, problem = read_openings(params, wire)
        t1 = time.perf_counter()
        assert problem is None, problem
        assert check_openings(commitment.root, n, rows, openings) is None
        assert check_entries(params, draws, openings) is None
        t2 = time.perf_counter()
        hex_decode(old, n)
        t3 = time.perf_counter()
        full_s, verify_s, hex_s = min(full_s, t2 - t0), min(verify_s, t2 - t1), min(hex_s, t3 - t2)
    return {
        "n": n, "backend": prover.name, "prover_s": prover_s, "validator_s": verify_s,
        "validator_with_decode_s": full_s, "hex_decode_s": hex_s, "recompute_s": recompute_s,
        "wire_bytes": len(wire), "hex_wire_bytes": len(old),
        "ratio": verify_s / recompute_s, "ratio_with_decode": full_s / recompute_s,
        "ratio_with_hex": (verify_s + hex_s) / recompute_s,
        "prover_flops": flops / prover_s, "numpy_flops": flops / numpy_s,
        "efficiency": numpy_s / prover_s, "opened_rows": len(rows),
    }


def class_specs() -> list[dict[str, Any]]:
    cpus = [{"gpu_count": 0, "cpu_cores": c, "ram_mib": 16384} for c in sorted({1, 2, 8, 64, worker_count()})]
    gpus = [{"gpu_count": g, "gpu_model": m.name, "gpu_memory_mib": v.memory_mib, "cpu_cores": 64, "ram_mib": 512000}
            for m in GPU_MODELS for v in m.variants for g in (1, 2, 8)]
    return cpus + gpus


def honest_time(specs: dict[str, Any]) -> float:
    plan = plan_challenge(specs)
    prover = MatmulProver(NumpyBackend())
    return min(prover.commit(plan.params).elapsed_s for _ in range(2))


def print_classes(measure: bool) -> None:
    print(f"{'class':<24} {'dtype':>8} {'parts':>5} {'n':>6} {'K':>8} {'TFLOP':>8} {'mem %':>6} {'gen s':>6} {'hash s':>6} "
          f"{'compute s':>9} {'bound s':>8} {'margin':>7} {'honest s':>9} {'of peak':>8}")
    for specs in class_specs():
        cls = claimed_class(specs)
        plan = plan_challenge(specs)
        p, b = plan.params, time_budget(plan.params, claimed_class(specs))
        honest = share = ""
        if measure and not cls.gpu_count and cls.cpu_cores == worker_count():
            t = honest_time(specs)
            honest, share = f"{t:9.3f}", f"{p.flops / t / cls.peak_flops * 100:7.1f}%"
        print(f"{cls.label:<24} {p.dtype:>8} {p.parts:>5} {p.n:>6} {p.inner:>8} {p.flops / 1e12:>8.2f} "
              f"{memory_share(p, cls) * 100:>6.1f} {b.generation_s:>6.2f} {b.hash_s:>6.2f} {b.compute_s:>9.2f} "
              f"{plan.bound_s:>8.2f} {spoof_margin(p, cls, plan.bound_s) * 100:>6.1f}% {honest:>9} {share:>8}", flush=True)


def hashing_rates(n: int = 16384, rows: int = 4096) -> list[tuple[int, float]]:
    """(threads, bytes/s) of hashing committed float16 rows of length n (the bound assumes
    HOST_HASH_RATE per thread): what this host's threads reach."""
    block = np.random.default_rng(1).standard_normal((rows, n)).astype("<f2")
    out = []
    for threads in sorted({1, 2, worker_count()}):
        t = best_of(3, lambda: hash_rows(block, threads=threads))
        out.append((threads, block.nbytes / t))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,4096,8192")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--m", type=int, default=DEFAULT_M)
    parser.add_argument("--runs", type=int, default=0, help="timed runs per figure (default: 3 below n=4096, else 1)")
    parser.add_argument("--classes-only", action="store_true", help="print the class table only")
    parser.add_argument("--no-measure", action="store_true", help="class table without the honest CPU run")
    args = parser.parse_args()
    print_classes(measure=not args.no_measure)
    margins = [plan_challenge(s).notes["spoof_margin"] for s in class_specs()]
    print(f"\nlowest spoof margin of any class: {min(margins) * 100:.1f}% (goal >= 40%)")
    print("row hashing here (float16 rows of 16384, the bound assumes "
          f"{HOST_HASH_RATE / 1e9:.1f} GB/s a thread, {HASH_THREADS_PER_GPU} threads a GPU): "
          + ", ".join(f"{t} thread{'s' if t > 1 else ''} {rate / 1e9:.2f} GB/s" for t, rate in hashing_rates()))
    if args.classes_only:
        return
    print()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    warm_memory(max(sizes))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    print(f"k={args.k} rows, m={args.m} entries per row, dtype={args.dtype}, repeat={args.repeat}; "
          f"a prover with 10% wrong entries passes with p <= {pass_probability_bound(args.k):.2e}")
    head = (f"{'n':>6} {'backend':>7} {'prover s':>9} {'validator ms':>12} {'+decode ms':>10} {'+hex ms':>7} "
            f"{'recompute s':>11} {'ratio':>8} {'+decode':>8} {'+hex':>8} {'wire MB':>7} {'hex MB':>6} "
            f"{'prover GF/s':>11} {'numpy GF/s':>10} {'eff':>6}")
    print(head)
    for n in sizes:
        runs = args.runs or (3 if n < 4096 else 1)
        r = bench_size(n, dtype=args.dtype, repeat=args.repeat, k=args.k, m=args.m, runs=runs)
        print(f"{r['n']:>6} {r['backend']:>7} {r['prover_s']:>9.3f} {r['validator_s'] * 1e3:>12.2f} "
              f"{r['validator_with_decode_s'] * 1e3:>10.2f} {(r['validator_s'] + r['hex_decode_s']) * 1e3:>7.2f} "
              f"{r['recompute_s']:>11.3f} {r['ratio'] * 100:>7.3f}% {r['ratio_with_decode'] * 100:>7.3f}% "
              f"{r['ratio_with_hex'] * 100:>7.3f}% {r['wire_bytes'] / 1e6:>7.2f} {r['hex_wire_bytes'] / 1e6:>6.2f} "
              f"{r['prover_flops'] / 1e9:>11.1f} {r['numpy_flops'] / 1e9:>10.1f} {r['efficiency'] * 100:>5.1f}%",
              flush=True)


if __name__ == "__main__":
    main()
