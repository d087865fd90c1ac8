"""Challenge parameters, sample sizes, sizing by the claimed class, the time bound and the spoof margin.

A challenge asks for C = A·B where A is n × K and B is K × n with K = n·repeat, both
from the counter-based generator (generator.py). ``repeat`` lengthens the inner
dimension: the work is 2·n²·K flops while the commitment stays n rows, so the miner's
hashing stays small next to its matmul. It cannot be skipped: the product over K is one
matmul with no shortcut (splitting it into ``repeat`` n×n blocks summed in float32 is
allowed, see verifier.py's tolerance).

Sizing (docs/protocol.md "Sizing and the time bound"): the claim is held to the GPU table
(classes.py); the work is TARGET_COMPUTE_S at REQUIRED_SHARE of the class's peak, shaped
within the table's memory; the bound is overhead + generation + hashing + work / (peak ×
share), and the spoof margin work / (peak × bound).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from prime.challenge.classes import MIN_RAM_MIB, check_claim, claimed_variant
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


def _spec(specs: Any, name: str, default: Any) -> Any:
    if isinstance(specs, Mapping):
        return specs.get(name, default)
    return getattr(specs, name, default)


# ------------------------------------------------------------------ what a claim must prove
# A challenge is sized by the claimed class (classes.py), never by a small claim: the work
# is what the class must do in TARGET_COMPUTE_S at REQUIRED_SHARE of its dense peak.
REQUIRED_SHARE = 0.6  # of the vendor dense peak; honest large GEMMs reach 65-80 %
# Nominal numpy float32 FLOP/s per claimed core (a logical CPU, as hardware.py counts them).
# What an honest core must show is 0.6 × 5e10 = 3e10: an SMT thread of a Zen 3 or Skylake
# server core (~45-60 in BLAS) or a Graviton2 core (~35) meets it; this VM's AVX-512 cores
# do 155 each (310 with both), so a fast core can pass for up to ~5 slower ones.
CPU_CORE_PEAK = 5e10
CPU_REQUIRED_SHARE = 0.6
TARGET_COMPUTE_S = 3.0  # seconds of pure compute at the required share
DEFAULT_OVERHEAD_S = 0.5  # HTTP round trip, signing, JSON, thread start-up
HOST_HASH_RATE = 1e9  # bytes of C per second: device-to-host copy + sha256 of rows (1.6e9 here, SHA-NI)
CPU_GENERATION_RATE = 1e8  # generator elements per second per CPU core (measured ~2-4e8 here)
GPU_GENERATION_RATE = 1e12  # per GPU: what a GPU prover must reach (a fused generator kernel)
PLAN_MAX_INNER = 1 << 21  # the validator's cost per challenge is 2·k·K element hashes (~4 s here at 2**21)
MAX_MEMORY_SHARE = 0.5  # of one GPU's memory (the model's, from the table) the prover's working set may take
HOST_RAM_SHARE = 0.25  # of the claimed RAM the prover's host arrays may take
DEFAULT_RAM_MIB = 4096  # planning a CPU node whose RAM is not given
N_LADDER = (256, 512, 1024, 2048, 4096, 8192, 16384)
GPU_DTYPE = "float16"  # tensor-core units; elements of 11 significant bits (not fp8/int8-exact)
CPU_DTYPE = "float32"  # elements of 24 significant bits (not TF32/fp16/bf16-exact)


@dataclass(frozen=True)
class ClaimedClass:
    """What one claim must prove: its units' dtype, aggregate peak and memory."""

    label: str
    dtype: str
    gpu_count: int
    peak_flops: float  # aggregate dense peak in the dtype, FLOP/s
    required_share: float
    gpu_memory_bytes: int  # per GPU, the table's (0 for a CPU node)
    ram_bytes: int  # claimed host RAM
    cpu_cores: int

    @property
    def required_flops(self) -> float:
        return self.peak_flops * self.required_share


def claimed_class(specs: Any) -> ClaimedClass:
    """The class a claim is held to; ChallengeParamError for a GPU claim the table refuses."""
    gpus = int(_spec(specs, "gpu_count", 0) or 0)
    cores = max(1, int(_spec(specs, "cpu_cores", 0) or 0))
    ram = int(_spec(specs, "ram_mib", 0) or 0) or DEFAULT_RAM_MIB
    if gpus == 0:
        return ClaimedClass(f"CPU {cores} core{'s' if cores > 1 else ''}", CPU_DTYPE, 0, cores * CPU_CORE_PEAK,
                            CPU_REQUIRED_SHARE, 0, ram << 20, cores)
    claim = {"cpu_cores": cores, "ram_mib": max(ram, MIN_RAM_MIB)}  # defaults where a mapping leaves them out
    for name in ("gpu_count", "gpu_model", "gpu_memory_mib", "cpu_cores", "ram_mib"):
        if _spec(specs, name, None) is not None:
            claim[name] = _spec(specs, name, None)
    problem = check_claim(claim)
    found = claimed_variant(specs)
    if problem is not None or found is None:
        raise ChallengeParamError(f"no challenge for this claim: {problem or 'unknown GPU'}")
    model, variant = found
    return ClaimedClass(f"{gpus}×{model.name} {variant.memory_mib} MiB", GPU_DTYPE, gpus,
                        gpus * variant.fp16 * 1e12, REQUIRED_SHARE, variant.memory_mib << 20, ram << 20, cores)


GEN_TEMPORARY_BYTES = 6 * 8 * (1 << 24)  # int64 temporaries of one torch generation step (~6 alive)
MIN_INNER_CHUNK = 1024  # the smallest K-chunk worth a GEMM call
GPU_CHUNK_SHARE = 0.4  # of a GPU's memory the torch prover's K-chunks may fill (planner: of the model's)
# The longest K one half-precision GEMM call on a GPU accumulates by itself: tensor cores add
# with truncation along an MMA chain, an error growing like K·2**-24·s/37, so the prover
# multiplies each generated chunk in slices of HALF_CHUNK_MAX and sums their float32 results
# on the CUDA cores (round to nearest; docs/protocol.md "Tolerance"): ≤ 2**-15·s per slice
# at 4096 (2**-13·s if they truncate every 4 products, not 16).
HALF_CHUNK_MAX = 4096


def prover_bytes(params: ChallengeParams, *, gpu_count: int = 0, inner_chunk: int | None = None) -> tuple[int, int]:
    """(host bytes, bytes per GPU) our prover allocates for these parameters.

    On a GPU: its band of A and B for one K-chunk of ``inner_chunk`` (default: all of K)
    in the dtype, its band of C and one chunk's product in float32, and the generator's
    temporaries.
    """
    n, k = params.n, params.inner
    host = 4 * n * n * (2 if gpu_count else (4 if params.repeat > 1 else 3))
    if not gpu_count:
        return host, 0
    rows = -(-n // gpu_count)
    kc = min(k, inner_chunk or k)
    device = ITEMSIZE[params.dtype] * kc * (rows + n) + 8 * rows * n + GEN_TEMPORARY_BYTES
    return host, device


def inner_chunk(params: ChallengeParams, gpu_count: int, budget_bytes: float) -> int:
    """The largest K-chunk whose working set (prover_bytes) fits ``budget_bytes`` on each GPU (≤ K; 0: none)."""
    rows = -(-params.n // gpu_count)
    room = budget_bytes - 8 * rows * params.n - GEN_TEMPORARY_BYTES
    return max(0, min(params.inner, int(room // (ITEMSIZE[params.dtype] * (rows + params.n)))))


@dataclass(frozen=True)
class TimeBudget:
    """The honest answer time of a challenge on its claimed class, term by term (seconds)."""

    overhead_s: float
    generation_s: float
    hash_s: float
    compute_s: float  # the work at the class's required share of its peak

    @property
    def bound_s(self) -> float:
        return self.overhead_s + self.generation_s + self.hash_s + self.compute_s


def time_budget(params: ChallengeParams, cls: ClaimedClass, *, overhead_s: float = DEFAULT_OVERHEAD_S) -> TimeBudget:
    n, k = params.n, params.inner
    if cls.gpu_count:
        gen_s = (-(-n // cls.gpu_count) + n) * k / GPU_GENERATION_RATE  # each GPU: its band of A and all of B
    else:
        gen_s = 2 * n * k / (cls.cpu_cores * CPU_GENERATION_RATE)
    return TimeBudget(overhead_s, gen_s, 4 * n * n / HOST_HASH_RATE, params.flops / cls.required_flops)


def time_bound_s(params: ChallengeParams, cls: ClaimedClass, *, overhead_s: float = DEFAULT_OVERHEAD_S) -> float:
    """bound = overhead + generation + hashing + work / (peak × required share)."""
    return time_budget(params, cls, overhead_s=overhead_s).bound_s


def spoof_margin(params: ChallengeParams, cls: ClaimedClass, bound_s: float) -> float:
    """The slowest throughput that still passes, as a share of the claimed peak, for a prover
    whose generation, hashing and round trip cost nothing: work / (peak × bound)."""
    return params.flops / (cls.peak_flops * bound_s)


def passes(params: ChallengeParams, cls: ClaimedClass, bound_s: float, *, flops_per_s: float,
           fixed_s: float = 0.0) -> bool:
    """Whether a prover doing the matmul at ``flops_per_s`` (plus ``fixed_s`` of everything else) answers in time."""
    return fixed_s + params.flops / flops_per_s <= bound_s


def memory_share(params: ChallengeParams, cls: ClaimedClass) -> float:
    """Share of one GPU's memory (GPU classes: the torch prover's K-chunks fill GPU_CHUNK_SHARE
    of it, or less when all of K fits) or of the claimed RAM (CPU) the prover's working set takes."""
    if not cls.gpu_count:
        return prover_bytes(params)[0] / cls.ram_bytes
    kc = inner_chunk(params, cls.gpu_count, GPU_CHUNK_SHARE * cls.gpu_memory_bytes)
    return prover_bytes(params, gpu_count=cls.gpu_count, inner_chunk=max(kc, 1))[1] / cls.gpu_memory_bytes


def _fits(params: ChallengeParams, cls: ClaimedClass) -> bool:
    host, _ = prover_bytes(params, gpu_count=cls.gpu_count)
    if host > HOST_RAM_SHARE * cls.ram_bytes and params.n > N_LADDER[0]:
        return False
    if not cls.gpu_count:
        return True
    kc = inner_chunk(params, cls.gpu_count, GPU_CHUNK_SHARE * cls.gpu_memory_bytes)
    return kc >= min(params.inner, MIN_INNER_CHUNK)


def choose_size(cls: ClaimedClass, *, target_s: float = TARGET_COMPUTE_S,
                overhead_s: float = DEFAULT_OVERHEAD_S) -> tuple[int, int]:
    """(n, repeat): the work of ``target_s`` at the class's required rate, shaped for the best spoof margin.

    For each n of the ladder the inner dimension K = n·repeat carries the work (K ≫ n, so
    hashing n² outputs stays small next to the n²·K multiply-adds), capped by the
    validator's cost (PLAN_MAX_INNER) and the memory limits; the shape with the largest
    spoof margin wins. Never below the class's work because a claim is small: the class,
    not the claimed memory, sets the work (memory only caps the shape).
    """
    want = target_s * cls.required_flops
    candidates: list[tuple[int, int, float, float]] = []  # (n, repeat, flops, margin)
    for n in N_LADDER:
        repeat = max(1, min(MAX_REPEAT, PLAN_MAX_INNER // n, MAX_INNER // n, math.ceil(want / (2 * n**3))))
        params = checked_params({"id": "plan", "seed": 0, "n": n, "dtype": cls.dtype, "repeat": repeat})
        while repeat > 1 and not _fits(params, cls):
            repeat = max(1, repeat // 2)
            params = checked_params({"id": "plan", "seed": 0, "n": n, "dtype": cls.dtype, "repeat": repeat})
        if _fits(params, cls):
            margin = spoof_margin(params, cls, time_bound_s(params, cls, overhead_s=overhead_s))
            candidates.append((n, repeat, float(params.flops), margin))
    if not candidates:
        return N_LADDER[0], 1
    # the work asked for (0.9 to 1.5× of it: the ladder's steps), best margin first; else the
    # least work above it; else (memory or the validator's cap bind) the most work there is
    near = [c for c in candidates if 0.9 * want <= c[2] <= 1.5 * want]
    if near:
        n, repeat, _, _ = max(near, key=lambda c: (c[3], -c[0]))
    elif any(c[2] >= want for c in candidates):
        n, repeat, _, _ = min((c for c in candidates if c[2] >= want), key=lambda c: (c[2], c[0]))
    else:
        n, repeat, _, _ = max(candidates, key=lambda c: (c[2], c[3]))
    return n, repeat


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


_OVERRIDE_KEYS = {"id", "seed", "n", "dtype", "repeat", "k", "m", "bound_s", "overhead_s", "target_s"}


def plan_challenge(specs: Any, overrides: Mapping[str, Any] | None = None) -> ChallengePlan:
    """Pick a challenge for a node with the claimed specs; ``overrides`` fixes any field.

    specs: a prime.chain.types.Specs or a mapping with gpu_count, gpu_model,
    gpu_memory_mib, cpu_cores, ram_mib (a GPU claim the table refuses raises
    ChallengeParamError: check classes.check_claim first). overrides: id, seed, n, dtype,
    repeat, k, m, bound_s, overhead_s, target_s. The bound follows the parameters actually
    sent (a forced small n gets a small bound).
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - _OVERRIDE_KEYS)
    if unknown:
        raise ChallengeParamError(f"unknown challenge override(s): {', '.join(unknown)}")
    cls = claimed_class(specs)
    dtype = overrides.get("dtype", cls.dtype)
    if dtype not in DTYPES:
        raise ChallengeParamError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype != cls.dtype:
        cls = replace(cls, dtype=dtype)
    overhead = float(overrides.get("overhead_s", DEFAULT_OVERHEAD_S))
    n, repeat = choose_size(cls, target_s=float(overrides.get("target_s", TARGET_COMPUTE_S)), overhead_s=overhead)
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
    budget = time_budget(params, cls, overhead_s=overhead)
    bound = overrides.get("bound_s")
    if bound is None:
        bound = budget.bound_s
    return ChallengePlan(params=params, k=k, m=m, bound_s=float(bound),
                         notes={"class": cls.label, "gpu_count": cls.gpu_count,
                                "spoof_margin": spoof_margin(params, cls, float(bound)),
                                "memory_share": memory_share(params, cls)})
