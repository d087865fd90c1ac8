"""Challenge parameters, sample sizes, the throughput table and the time bound.

A challenge asks for C = A·B where A is n × K and B is K × n with K = n·repeat, both
from the counter-based generator (generator.py). ``repeat`` lengthens the inner
dimension: the work is 2·n²·K flops while the commitment stays n rows, so the miner's
hashing stays small next to its matmul. It cannot be skipped: the product over K is one
matmul with no shortcut (splitting it into ``repeat`` n×n blocks and summing is allowed
and exact, see generator.py).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from prime.protocol.challenge import DTYPES, MAX_INNER, MAX_REPEAT, ChallengeRequest

# Unit roundoff of each output dtype (half an ulp at 1.0).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# The challenge's parameters are the wire message itself (prime.protocol.challenge), which
# carries their limits; built in Python it is trusted, decoded or ``checked_params`` it is checked.
ChallengeParams = ChallengeRequest

# Soundness: with k sampled rows (uniform, independent) and m ≥ 1 entries checked per
# row, a prover whose fraction f of entries is wrong passes with probability at most
# (1-f)**k whatever the pattern of its errors (worst case: whole rows wrong), and about
# (1-f)**(k·m) when its errors are spread over the rows. k alone therefore carries the
# guarantee: k = 132 gives 0.9**132 ≈ 9.1e-7 ≤ 1e-6 at f = 10 %.
TARGET_FAULT_FRACTION = 0.10
TARGET_PASS_PROBABILITY = 1e-6


def rows_needed(fault_fraction: float = TARGET_FAULT_FRACTION,
                pass_probability: float = TARGET_PASS_PROBABILITY) -> int:
    """Smallest k with (1 - f)**k ≤ p."""
    if not 0 < fault_fraction < 1 or not 0 < pass_probability < 1:
        raise ValueError("fault fraction and pass probability must lie strictly between 0 and 1")
    return math.ceil(math.log(pass_probability) / math.log1p(-fault_fraction))


DEFAULT_K = rows_needed()  # 132
# One entry per row already meets the bound (for m = 1 the two formulas coincide:
# every check is an independent uniform entry). More entries per row only help against
# errors spread thinly over many rows, which k = 132 rows already catch with p ≥ 1 - 1e-6,
# and each costs the validator another column of B.
DEFAULT_M = 1


def pass_probability_bound(k: int, fault_fraction: float = TARGET_FAULT_FRACTION) -> float:
    """Upper bound on the chance that a prover with that fraction of wrong entries passes."""
    return (1.0 - fault_fraction) ** k


class ChallengeParamError(ValueError):
    """A challenge field is missing, has the wrong type or is out of range."""


def checked_params(fields: Mapping[str, Any]) -> ChallengeParams:
    """Challenge parameters from plain values, held to the message's limits (ChallengeParamError)."""
    try:
        return msgspec.convert(dict(fields), ChallengeParams)
    except msgspec.ValidationError as exc:
        raise ChallengeParamError(f"invalid challenge: {exc}") from None


# ------------------------------------------------------------------ expected throughput
@dataclass(frozen=True)
class Throughput:
    """Dense matmul peak per GPU in TFLOP/s: float32 (no TF32) and float16/bfloat16 tensor cores."""

    fp32: float
    half: float

    def for_dtype(self, dtype: str) -> float:
        return self.fp32 if dtype == "float32" else self.half


# Matched as case-insensitive substrings of the claimed model, first match wins, so more
# specific names come first ("A100" before "A10", "L40S" before "L40" before "L4").
# Figures are vendor dense peaks, taking the slower variant (e.g. H100 PCIe, not SXM) so
# an honest card is never held to a faster sibling's number.
GPU_THROUGHPUT: tuple[tuple[str, Throughput], ...] = (
    ("B200", Throughput(75.0, 2250.0)),
    ("H200", Throughput(67.0, 989.0)),
    ("H100", Throughput(51.0, 756.0)),
    ("A100", Throughput(19.5, 312.0)),
    ("A10G", Throughput(31.2, 70.0)),
    ("A10", Throughput(31.2, 125.0)),
    ("A40", Throughput(37.4, 149.7)),
    ("A6000", Throughput(38.7, 154.8)),
    ("L40S", Throughput(91.6, 362.0)),
    ("L40", Throughput(90.5, 181.0)),
    ("L4", Throughput(30.3, 121.0)),
    ("4090", Throughput(82.6, 165.2)),
    ("3090", Throughput(35.6, 71.0)),
    ("V100", Throughput(15.7, 125.0)),
    ("T4", Throughput(8.1, 65.0)),
)
UNKNOWN_GPU = Throughput(5.0, 20.0)
# A whole CPU-only node: deliberately low (this 2-core test VM already does ~0.12 TFLOP/s
# in numpy float32), so no honest CPU fails the bound.
CPU_NODE = Throughput(0.01, 0.01)


def gpu_throughput(gpu_model: str) -> Throughput:
    model = (gpu_model or "").upper()
    for pattern, tput in GPU_THROUGHPUT:
        if pattern in model:
            return tput
    return UNKNOWN_GPU


# Time-bound constants (seconds, elements or bytes per second); all generous on purpose.
DEFAULT_SLACK = 4.0  # honest kernels reach 50-80 % of peak; 4× covers that with margin
DEFAULT_OVERHEAD_S = 2.0  # HTTP round trip, JSON, thread start-up, Python
CPU_GENERATION_RATE = 1e8  # generator elements per second on a CPU (measured ~5e8 here)
GPU_GENERATION_RATE = 1e10  # per GPU
HOST_HASH_RATE = 4e8  # bytes of C per second: device-to-host copy + sha256 (≥1.5e9 with SHA-NI)


def time_bound_s(params: ChallengeParams, *, gpu_model: str = "", gpu_count: int = 0,
                 slack: float = DEFAULT_SLACK, overhead_s: float = DEFAULT_OVERHEAD_S) -> float:
    """Seconds within which a node with the claimed GPUs must answer POST /challenge."""
    gen_elements = 2 * params.n * params.inner
    if gpu_count > 0:
        rate = gpu_count * gpu_throughput(gpu_model).for_dtype(params.dtype) * 1e12
        gen_s = gen_elements / (gpu_count * GPU_GENERATION_RATE)
    else:
        rate = CPU_NODE.for_dtype(params.dtype) * 1e12
        gen_s = gen_elements / CPU_GENERATION_RATE
    hash_s = 4 * params.n * params.n / HOST_HASH_RATE
    return overhead_s + slack * (params.flops / rate + gen_s + hash_s)


# ------------------------------------------------------------------ planning a challenge
@dataclass(frozen=True)
class ChallengePlan:
    """Everything the validator decides before sending a challenge."""

    params: ChallengeParams
    k: int
    m: int
    bound_s: float
    fault_fraction: float = TARGET_FAULT_FRACTION
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def pass_probability(self) -> float:
        return pass_probability_bound(self.k, self.fault_fraction)


_OVERRIDE_KEYS = {"id", "seed", "n", "dtype", "repeat", "k", "m", "bound_s", "slack", "overhead_s",
                  "target_s"}
N_LADDER = (1024, 2048, 4096, 8192, 16384)
DEFAULT_TARGET_S = 2.0


def _spec(specs: Any, name: str, default: Any) -> Any:
    if isinstance(specs, Mapping):
        return specs.get(name, default)
    return getattr(specs, name, default)


def prover_bytes(params: ChallengeParams, *, gpu_count: int = 0) -> tuple[int, int]:
    """(host bytes, bytes per GPU) our prover allocates for these parameters."""
    n, k = params.n, params.inner
    host = 4 * n * n * (2 if gpu_count else (4 if params.repeat > 1 else 3))
    if not gpu_count:
        return host, 0
    rows = -(-n // gpu_count)
    item = ITEMSIZE[params.dtype]
    # A band, B, C band in the dtype, C band widened to float32, and the int64
    # temporaries of one generation chunk (torch: up to ~6 alive at once)
    device = item * (rows * k + k * n + rows * n) + 4 * rows * n + 6 * 8 * (1 << 24)
    return host, device


def choose_size(specs: Any, *, dtype: str, target_s: float) -> tuple[int, int]:
    """(n, repeat) giving about target_s of work at the claimed throughput within the claimed memory."""
    gpu_count = int(_spec(specs, "gpu_count", 0) or 0)
    gpu_mem = int(_spec(specs, "gpu_memory_mib", 0) or 0) * (1 << 20)
    ram = int(_spec(specs, "ram_mib", 0) or 0) * (1 << 20)
    if gpu_count:
        rate = gpu_count * gpu_throughput(_spec(specs, "gpu_model", "")).for_dtype(dtype) * 1e12
    else:
        rate = CPU_NODE.for_dtype(dtype) * 1e12
    want = target_s * rate
    best = (N_LADDER[0], 1)
    for n in N_LADDER:
        repeat = max(1, min(MAX_REPEAT, MAX_INNER // n, math.ceil(want / (2 * n**3))))
        params = checked_params({"id": "plan", "seed": 0, "n": n, "dtype": dtype, "repeat": repeat})
        host, device = prover_bytes(params, gpu_count=gpu_count)
        if ram and host > 0.5 * ram:
            break
        if gpu_count and gpu_mem and device > 0.8 * gpu_mem:
            break
        best = (n, repeat)
        if params.flops >= want:
            break
    return best


def plan_challenge(specs: Any, overrides: Mapping[str, Any] | None = None) -> ChallengePlan:
    """Pick a challenge for a node with the claimed specs; ``overrides`` fixes any field.

    specs: a prime.chain.types.Specs or a mapping with gpu_count, gpu_model,
    gpu_memory_mib, ram_mib. overrides: id, seed, n, dtype, repeat, k, m, bound_s,
    slack, overhead_s, target_s.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - _OVERRIDE_KEYS)
    if unknown:
        raise ChallengeParamError(f"unknown challenge override(s): {', '.join(unknown)}")
    gpu_count = int(_spec(specs, "gpu_count", 0) or 0)
    gpu_model = str(_spec(specs, "gpu_model", "") or "")
    dtype = overrides.get("dtype", "float16" if gpu_count else "float32")
    if dtype not in DTYPES:
        raise ChallengeParamError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    n, repeat = choose_size(specs, dtype=dtype, target_s=float(overrides.get("target_s", DEFAULT_TARGET_S)))
    if "n" in overrides and "repeat" not in overrides:
        repeat = 1
    params = checked_params({
        "id": overrides.get("id", secrets.token_hex(8)),
        "seed": overrides.get("seed", secrets.randbits(64)),
        "n": overrides.get("n", n),
        "dtype": dtype,
        "repeat": overrides.get("repeat", repeat),
    })
    k = int(overrides.get("k", DEFAULT_K))
    m = int(overrides.get("m", DEFAULT_M))
    if k < 1 or m < 1:
        raise ChallengeParamError("k and m must be at least 1")
    bound = overrides.get("bound_s")
    if bound is None:
        bound = time_bound_s(params, gpu_model=gpu_model, gpu_count=gpu_count,
                             slack=float(overrides.get("slack", DEFAULT_SLACK)),
                             overhead_s=float(overrides.get("overhead_s", DEFAULT_OVERHEAD_S)))
    return ChallengePlan(params=params, k=k, m=m, bound_s=float(bound),
                         notes={"gpu_model": gpu_model, "gpu_count": gpu_count})
