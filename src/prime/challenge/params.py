"""Challenge parameters, sample sizes, sizing by the claimed class, the time bound and the spoof margin.

A challenge asks for C_p = A_p·B_p for each of its ``parts`` parts, where A_p is n × K and
B_p is K × n with K = n·repeat, all from the counter-based generator (generator.py). A GPU
node gets one part per claimed GPU, so every GPU computes its own share at the same time
and hashes it on its own host threads. ``repeat`` lengthens the inner dimension: the work
is 2·parts·n²·K flops while the commitment stays parts·n rows, so the miner's hashing
stays small next to its matmul. It cannot be skipped: the product over K is one matmul
with no shortcut (splitting it into ``repeat`` n×n blocks summed in float32 is allowed,
see verifier.py's tolerance).

Sizing (docs/protocol.md "Sizing and the time bound"): the claim is held to the GPU table
(classes.py); each part's work is TARGET_COMPUTE_S at REQUIRED_SHARE of one GPU's peak,
shaped within the table's memory for the best spoof margin; the bound is overhead +
generation + hashing + tree + work / (peak × share), and the spoof margin work / (peak ×
bound).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from prime.challenge.classes import MIN_CORES_PER_GPU, MIN_RAM_MIB, check_claim, claimed_variant
from prime.protocol.challenge import DTYPES, MAX_INNER, MAX_N, MAX_REPEAT, ChallengeRequest

# Unit roundoff of each output dtype (half an ulp at 1.0).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # also each value's bytes in a committed row

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
HOST_HASH_RATE = 1e9  # bytes of committed rows per second per host thread: copy + sha256 (1.6e9 here, SHA-NI)
HASH_THREADS_PER_GPU = MIN_CORES_PER_GPU  # host threads hashing one GPU's part (classes.py makes claims have them)
TREE_NODE_RATE = 1e6  # inner Merkle nodes per second (64-byte hashes hold the GIL: one thread in effect)
CPU_GENERATION_RATE = 1e8  # generator elements per second per CPU core (measured ~2-4e8 here)
# A GPU generates its part's elements on its CUDA cores: the fused int64 generator
# (gpu.fused_generator) is ~100 32-bit integer operations an element, so a GPU is held
# to its float32 peak / GEN_FLOPS_PER_ELEMENT elements a second (H100 PCIe: 5.1e11/s).
GEN_FLOPS_PER_ELEMENT = 100
PLAN_MAX_INNER = 1 << 21  # the validator's cost per challenge is 2·k·K element hashes (~4 s here at 2**21)
MAX_MEMORY_SHARE = 0.5  # of one GPU's memory (the model's, from the table) the prover's working set may take
HOST_RAM_SHARE = 0.25  # of the claimed RAM the prover's host arrays may take
DEFAULT_RAM_MIB = 4096  # planning a CPU node whose RAM is not given
# CPU shapes are sized for the cores, with host arrays of at most HOST_RAM_SHARE of
# CPU_PLAN_RAM_BYTES per MAX_PLAN_CORES cores (1 GiB a core: 64 cores plan n = 8192).
CPU_PLAN_RAM_BYTES = 64 << 30
MAX_PLAN_CORES = 64
N_LADDER = (256, 512, 1024, 2048, 4096, 8192, 16384, MAX_N)
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
    gpu_fp32_flops: float = 0.0  # one GPU's CUDA-core float32 peak (sets its generation rate)

    @property
    def required_flops(self) -> float:
        return self.peak_flops * self.required_share

    @property
    def parts(self) -> int:
        """Parts of its challenge: one per GPU (a CPU node: one)."""
        return max(1, self.gpu_count)

    @property
    def generation_rate(self) -> float:
        """Elements a second one part's generation is held to (per GPU, or the whole CPU)."""
        if self.gpu_count:
            return self.gpu_fp32_flops / GEN_FLOPS_PER_ELEMENT
        return self.cpu_cores * CPU_GENERATION_RATE

    @property
    def hash_threads(self) -> int:
        """Host threads hashing one part: HASH_THREADS_PER_GPU a GPU, every core for a CPU node."""
        return HASH_THREADS_PER_GPU if self.gpu_count else self.cpu_cores


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
                        gpus * variant.fp16 * 1e12, REQUIRED_SHARE, variant.memory_mib << 20, ram << 20, cores,
                        variant.fp32 * 1e12)


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

    Host: every part's committed rows in the dtype, plus the float32 results in flight (one
    part per GPU at once; the numpy backend's A, B and C blocks on a CPU node). A GPU: its
    part's A and B for one K-chunk of ``inner_chunk`` (default: all of K) in the dtype, its
    C_p and one chunk's product in float32, and the generator's temporaries.
    """
    n, k = params.n, params.inner
    committed = ITEMSIZE[params.dtype] * params.rows * n
    if not gpu_count:
        return committed + 4 * n * n * (4 if params.repeat > 1 else 3), 0
    in_flight = min(params.parts, gpu_count)
    kc = min(k, inner_chunk or k)
    device = ITEMSIZE[params.dtype] * kc * 2 * n + 8 * n * n + GEN_TEMPORARY_BYTES
    return committed + 4 * n * n * in_flight, device


def inner_chunk(params: ChallengeParams, gpu_count: int, budget_bytes: float) -> int:
    """The largest K-chunk whose working set (prover_bytes) fits ``budget_bytes`` on one GPU (≤ K; 0: none)."""
    room = budget_bytes - 8 * params.n * params.n - GEN_TEMPORARY_BYTES
    return max(0, min(params.inner, int(room // (ITEMSIZE[params.dtype] * 2 * params.n))))


@dataclass(frozen=True)
class TimeBudget:
    """The honest answer time of a challenge on its claimed class, term by term (seconds)."""

    overhead_s: float
    generation_s: float
    hash_s: float
    compute_s: float  # the work at the class's required share of its peak
    tree_s: float = 0.0

    @property
    def bound_s(self) -> float:
        return self.overhead_s + self.generation_s + self.hash_s + self.tree_s + self.compute_s


def time_budget(params: ChallengeParams, cls: ClaimedClass, *, overhead_s: float = DEFAULT_OVERHEAD_S) -> TimeBudget:
    """Parts run side by side, one per GPU (rounds: parts beyond the GPUs wait for one);
    each is generated and hashed in its own time, so a GPU node's bound is one part's."""
    n, k = params.n, params.inner
    rounds = -(-params.parts // cls.parts)
    gen_s = rounds * 2 * n * k / cls.generation_rate  # a part's A and B
    hash_s = rounds * ITEMSIZE[params.dtype] * n * n / (HOST_HASH_RATE * cls.hash_threads)
    tree_s = params.rows / TREE_NODE_RATE  # the tree over every part's rows: rows - 1 inner nodes
    return TimeBudget(overhead_s, gen_s, hash_s, params.flops / cls.required_flops, tree_s)


def time_bound_s(params: ChallengeParams, cls: ClaimedClass, *, overhead_s: float = DEFAULT_OVERHEAD_S) -> float:
    """bound = overhead + generation + hashing + tree + work / (peak × required share)."""
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
    """Whether the shape fits the class's memory: a GPU's (the table's), and for a CPU node
    the host RAM the largest CPU class holds (a claim's RAM never shrinks its challenge:
    ``claim_problem`` refuses a claim with less RAM than its challenge needs)."""
    host, _ = prover_bytes(params, gpu_count=cls.gpu_count)
    if not cls.gpu_count:
        return host <= HOST_RAM_SHARE * CPU_PLAN_RAM_BYTES * max(1, cls.cpu_cores) / MAX_PLAN_CORES or \
            params.n <= N_LADDER[0]
    kc = inner_chunk(params, cls.gpu_count, GPU_CHUNK_SHARE * cls.gpu_memory_bytes)
    return kc >= min(params.inner, MIN_INNER_CHUNK)


def ram_needed_mib(params: ChallengeParams, cls: ClaimedClass) -> int:
    """RAM a claim must have for its challenge: what our prover holds on the host, at most
    HOST_RAM_SHARE of it."""
    host, _ = prover_bytes(params, gpu_count=cls.gpu_count)
    return max(MIN_RAM_MIB, math.ceil(host / HOST_RAM_SHARE / (1 << 20)))


def claim_problem(specs: Any) -> str | None:
    """None when a challenge can be sized for the claim, else one sentence why not: the
    table's refusals (classes.check_claim), or less RAM than the class's challenge needs.

    The validator checks this before any challenge. The RAM rule closes what a small RAM
    claim would otherwise buy: a smaller challenge (the work is the class's; the RAM a
    prover holds it in is not allowed to shrink it)."""
    problem = check_claim(specs)
    if problem is not None:
        return problem
    cls = claimed_class(specs)
    n, repeat = choose_size(cls)
    need = ram_needed_mib(_plan_params(n, repeat, cls), cls)
    have = cls.ram_bytes >> 20
    if have < need:
        return (f"the claim has {have} MiB of RAM; a node of its class ({cls.label}) needs at least {need} MiB "
                f"to hold its proof of compute")
    return None


def _plan_params(n: int, repeat: int, cls: ClaimedClass) -> ChallengeParams:
    return checked_params({"id": "plan", "seed": 0, "n": n, "dtype": cls.dtype, "repeat": repeat, "parts": cls.parts})


def choose_size(cls: ClaimedClass, *, target_s: float = TARGET_COMPUTE_S,
                overhead_s: float = DEFAULT_OVERHEAD_S) -> tuple[int, int]:
    """(n, repeat) of each part: the work of ``target_s`` at one GPU's (or the CPU's) required
    rate, shaped for the best spoof margin.

    For each n of the ladder the inner dimension K = n·repeat carries the work (K ≫ n, so
    hashing n² outputs stays small next to the n²·K multiply-adds), capped by the
    validator's cost (PLAN_MAX_INNER) and the memory limits. Of the shapes with at most
    1.5× the work asked for, the one with the largest spoof margin wins (more work spreads
    the fixed costs thinner, so this is usually the most work there is up to that cap).
    Never below the class's work because a claim is small: the class, not the claimed
    memory, sets the work (memory only caps the shape).
    """
    want = target_s * cls.required_flops / cls.parts  # one part's
    candidates: list[tuple[int, int, float, float]] = []  # (n, repeat, flops of a part, margin)
    for n in N_LADDER:
        repeat = max(1, min(MAX_REPEAT, PLAN_MAX_INNER // n, MAX_INNER // n, math.ceil(want / (2 * n**3))))
        params = _plan_params(n, repeat, cls)
        while repeat > 1 and not _fits(params, cls):
            repeat = max(1, repeat // 2)
            params = _plan_params(n, repeat, cls)
        if _fits(params, cls):
            margin = spoof_margin(params, cls, time_bound_s(params, cls, overhead_s=overhead_s))
            candidates.append((n, repeat, float(params.flops) / params.parts, margin))
    if not candidates:
        return N_LADDER[0], 1
    capped = [c for c in candidates if c[2] <= 1.5 * want]
    if capped:
        n, repeat, _, _ = max(capped, key=lambda c: (c[3], -c[0]))
    else:  # even the smallest shape is more than asked for: the least work
        n, repeat, _, _ = min(candidates, key=lambda c: (c[2], c[0]))
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


_OVERRIDE_KEYS = {"id", "seed", "n", "dtype", "repeat", "parts", "k", "m", "bound_s", "overhead_s", "target_s"}


def plan_challenge(specs: Any, overrides: Mapping[str, Any] | None = None) -> ChallengePlan:
    """Pick a challenge for a node with the claimed specs; ``overrides`` fixes any field.

    specs: a prime.chain.types.Specs or a mapping with gpu_count, gpu_model,
    gpu_memory_mib, cpu_cores, ram_mib (a GPU claim the table refuses raises
    ChallengeParamError: check classes.check_claim first). overrides: id, seed, n, dtype,
    repeat, parts, k, m, bound_s, overhead_s, target_s. The bound follows the parameters actually
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
        "parts": overrides.get("parts", cls.parts),
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
