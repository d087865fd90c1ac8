"""What a claimed GPU model must prove: its memory (per variant) and its dense peaks.

A node's claim (prime.chain.types.Specs) names a GPU model, a count and the memory of one
GPU. ``check_claim`` holds it to this table *before* any challenge: an unknown model, a
memory that matches none of the model's variants, a model with zero GPUs (or GPUs with no
model), counts or cores past what one host has — each is refused with one sentence. An
unknown model is refused rather than given a "conservative" class: a conservative class
would be a small challenge, which is exactly what a spoofer wants to claim.

Peaks are vendor dense figures in TFLOP/s (no sparsity): ``fp32`` the CUDA-core float32
rate (no TF32), ``fp16`` the float16 tensor-core rate with float32 accumulation (the rate a
training job gets; bfloat16 is the same on every model here that has it). Where variants
share a memory size (H100 PCIe and SXM both have 80 GB) the slower variant's figure is
used, so an honest card is never held to a faster sibling's number. Memory is what
``nvidia-smi --query-gpu=memory.total`` reports (MiB); a claim matches a variant within
MEMORY_TOLERANCE (drivers and ECC settings move it by a few percent).

Matching is on case-insensitive substrings of the claimed model, first match wins, so
more specific names come first ("A100" before "A10", "L40S" before "L40" before "L4").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MEMORY_TOLERANCE = 0.04  # a claim within 4 % of a variant's memory matches it
MAX_GPUS = 16  # GPUs in one host (HGX boards carry 8; 16 leaves room)
MAX_CPU_CORES = 1024
MIN_RAM_MIB = 512


@dataclass(frozen=True)
class GpuVariant:
    memory_mib: int
    fp32: float  # TFLOP/s, CUDA cores
    fp16: float  # TFLOP/s, dense tensor cores, float32 accumulation
    label: str = ""


@dataclass(frozen=True)
class GpuModel:
    name: str
    patterns: tuple[str, ...]
    variants: tuple[GpuVariant, ...]

    def variant(self, memory_mib: int) -> GpuVariant | None:
        """The variant whose memory the claim matches (within MEMORY_TOLERANCE), else None."""
        for v in self.variants:
            if abs(memory_mib - v.memory_mib) <= MEMORY_TOLERANCE * v.memory_mib:
                return v
        return None

    def memories(self) -> str:
        return " or ".join(f"{v.memory_mib} MiB" for v in self.variants)


def _m(name: str, patterns: tuple[str, ...], *variants: GpuVariant) -> GpuModel:
    return GpuModel(name, patterns, variants)


V = GpuVariant
GPU_MODELS: tuple[GpuModel, ...] = (
    _m("B200", ("B200",), V(183359, 75.0, 2250.0, "HGX B200")),
    _m("H200", ("H200",), V(143771, 60.0, 835.0, "H200 NVL (SXM: 67 / 989)")),
    _m("H100", ("H100",), V(81559, 51.0, 756.0, "80 GB: PCIe (SXM: 67 / 989)"),
       V(95830, 60.0, 835.0, "NVL 94 GB")),
    _m("A100", ("A100",), V(40960, 19.5, 312.0, "40 GB"), V(81920, 19.5, 312.0, "80 GB")),
    _m("A10G", ("A10G",), V(23028, 31.2, 70.0, "AWS A10G")),
    _m("A10", ("A10",), V(23028, 31.2, 125.0)),
    _m("A40", ("A40",), V(46068, 37.4, 149.7)),
    _m("RTX A6000", ("A6000",), V(49140, 38.7, 154.8)),
    _m("L40S", ("L40S",), V(46068, 91.6, 362.0)),
    _m("L40", ("L40",), V(46068, 90.5, 181.0)),
    _m("L4", ("L4",), V(23034, 30.3, 121.0)),
    _m("RTX 4090", ("4090",), V(24564, 82.6, 165.2)),
    _m("RTX 3090", ("3090",), V(24576, 35.6, 71.0)),
    _m("V100", ("V100",), V(16384, 14.0, 112.0, "16 GB PCIe (SXM2: 15.7 / 125)"),
       V(32768, 14.0, 112.0, "32 GB PCIe")),
    _m("T4", ("T4",), V(15360, 8.1, 65.0)),
)
del V


def find_model(gpu_model: str) -> GpuModel | None:
    """The table's model for a claimed model name, None when none matches."""
    name = (gpu_model or "").upper()
    for model in GPU_MODELS:
        if any(p in name for p in model.patterns):
            return model
    return None


def _spec(specs: Any, name: str) -> Any:
    return specs.get(name) if isinstance(specs, Mapping) else getattr(specs, name, None)


def _count(specs: Any, name: str) -> int | None:
    value = _spec(specs, name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def check_claim(specs: Any) -> str | None:
    """None when the claim is one the table can size a challenge for, else one sentence why not.

    ``specs``: a prime.chain.types.Specs or a mapping with gpu_count, gpu_model,
    gpu_memory_mib, cpu_cores, ram_mib.
    """
    counts = {name: _count(specs, name) for name in ("gpu_count", "gpu_memory_mib", "cpu_cores", "ram_mib")}
    for name, value in counts.items():
        if value is None or value < 0:
            return f"the claimed {name} is not a non-negative integer"
    gpus, memory, cores, ram = (int(counts[k] or 0) for k in ("gpu_count", "gpu_memory_mib", "cpu_cores", "ram_mib"))
    model_name = str(_spec(specs, "gpu_model") or "").strip()
    if not 1 <= cores <= MAX_CPU_CORES:
        return f"the claim has {cores} CPU cores; a node has 1 to {MAX_CPU_CORES}"
    if ram < MIN_RAM_MIB:
        return f"the claim has {ram} MiB of RAM; a node has at least {MIN_RAM_MIB}"
    if gpus == 0:
        if model_name or memory:
            return (f"the claim names GPU model {model_name!r} with {memory} MiB but zero GPUs"
                    if model_name else f"the claim has {memory} MiB of GPU memory but zero GPUs")
        return None
    if gpus > MAX_GPUS:
        return f"the claim has {gpus} GPUs; one host has at most {MAX_GPUS}"
    if not model_name:
        return f"the claim has {gpus} GPUs but names no GPU model"
    model = find_model(model_name)
    if model is None:
        known = ", ".join(m.name for m in GPU_MODELS)
        return f"the claimed GPU model {model_name!r} is not in the validator's table ({known})"
    if model.variant(memory) is None:
        return (f"the claimed {model_name!r} has {memory} MiB of memory per GPU, but a {model.name} has "
                f"{model.memories()} (within {MEMORY_TOLERANCE:.0%})")
    return None


def claimed_variant(specs: Any) -> tuple[GpuModel, GpuVariant] | None:
    """The table's model and variant of a claim ``check_claim`` accepts (None: a CPU node or refused)."""
    if int(_spec(specs, "gpu_count") or 0) <= 0:
        return None
    model = find_model(str(_spec(specs, "gpu_model") or ""))
    if model is None:
        return None
    variant = model.variant(int(_spec(specs, "gpu_memory_mib") or 0))
    return None if variant is None else (model, variant)
