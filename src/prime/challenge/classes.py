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

Matching is on case-insensitive substrings of the claimed model; the longest matching
pattern wins ("A100" over "A10", "L40S" over "L40" over "L4"), ties going to the earlier
model.

A validator operator extends the table without a release (``prime validator start
--gpu-classes FILE``): ``parse_gpu_classes`` reads a JSON or TOML file of models (strictly,
one sentence per error), ``extended_table`` adds them to the built-in table (an entry named
like a built-in model replaces it), and ``use_gpu_table`` installs the result for the whole
process, once, at validator start. It is process-wide on purpose: the claim check, the
planner and the challenge runner (which re-plans from the claim to check the answer) all
read the same table through ``gpu_table()``, and one validator process runs one validator.
``find_model``, ``check_claim`` and ``claimed_variant`` also take a table explicitly
(``table=``), for tests and tools that must not touch the process's; the planner
(params.claimed_class) reads the process's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MEMORY_TOLERANCE = 0.04  # a claim within 4 % of a variant's memory matches it
MAX_GPUS = 16  # GPUs in one host (HGX boards carry 8; 16 leaves room)
MAX_CPU_CORES = 1024
MIN_RAM_MIB = 512
# A GPU node hashes every GPU's share of the challenge on the host at once, with this many
# threads a GPU (params.HASH_THREADS_PER_GPU): the time bound counts on them, so a claim
# must have the cores (servers have 12-24 a GPU; a claim with fewer would loosen the bound).
MIN_CORES_PER_GPU = 4


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


GpuTable = tuple[GpuModel, ...]
_active: GpuTable = GPU_MODELS  # the process's table (use_gpu_table), the built-in one unless a validator extends it


def gpu_table() -> GpuTable:
    """The table this process holds claims to: the built-in one, or what ``use_gpu_table`` installed."""
    return _active


def use_gpu_table(table: GpuTable) -> None:
    """Install ``table`` for the whole process (a validator does this once, at start, from
    --gpu-classes); ``use_gpu_table(GPU_MODELS)`` restores the built-in one."""
    global _active
    if not table or not all(isinstance(m, GpuModel) for m in table):
        raise ValueError("a GPU table is a non-empty tuple of GpuModel")
    _active = tuple(table)


def find_model(gpu_model: str, table: GpuTable | None = None) -> GpuModel | None:
    """The table's model for a claimed model name (the longest matching pattern; ties: the
    earlier model), None when none matches."""
    name = (gpu_model or "").upper()
    best: tuple[int, GpuModel] | None = None
    for model in gpu_table() if table is None else table:
        length = max((len(p) for p in model.patterns if p.upper() in name), default=0)
        if length and (best is None or length > best[0]):
            best = (length, model)
    return None if best is None else best[1]


def _spec(specs: Any, name: str) -> Any:
    return specs.get(name) if isinstance(specs, Mapping) else getattr(specs, name, None)


def _count(specs: Any, name: str) -> int | None:
    value = _spec(specs, name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def check_claim(specs: Any, table: GpuTable | None = None) -> str | None:
    """None when the claim is one the table can size a challenge for, else one sentence why not.

    ``specs``: a prime.chain.types.Specs or a mapping with gpu_count, gpu_model,
    gpu_memory_mib, cpu_cores, ram_mib; ``table``: default the process's (``gpu_table()``).
    """
    table = gpu_table() if table is None else table
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
    if cores < MIN_CORES_PER_GPU * gpus:
        return (f"the claim has {cores} CPU cores for {gpus} GPU{'s' if gpus > 1 else ''}; a GPU node needs at "
                f"least {MIN_CORES_PER_GPU} a GPU to hash its proof of compute in time")
    if not model_name:
        return f"the claim has {gpus} GPUs but names no GPU model"
    model = find_model(model_name, table)
    if model is None:
        known = ", ".join(m.name for m in table)
        return f"the claimed GPU model {model_name!r} is not in the validator's table ({known})"
    if model.variant(memory) is None:
        return (f"the claimed {model_name!r} has {memory} MiB of memory per GPU, but a {model.name} has "
                f"{model.memories()} (within {MEMORY_TOLERANCE:.0%})")
    return None


def claimed_variant(specs: Any, table: GpuTable | None = None) -> tuple[GpuModel, GpuVariant] | None:
    """The table's model and variant of a claim ``check_claim`` accepts (None: a CPU node or refused)."""
    if int(_spec(specs, "gpu_count") or 0) <= 0:
        return None
    model = find_model(str(_spec(specs, "gpu_model") or ""), table)
    if model is None:
        return None
    variant = model.variant(int(_spec(specs, "gpu_memory_mib") or 0))
    return None if variant is None else (model, variant)


# ------------------------------------------------------------------ extending the table from a file
# prime validator start --gpu-classes FILE; FILE is JSON or TOML (by its suffix), e.g. in TOML:
#
#   [[gpu]]
#   name = "RTX 5090"                 # the table's name of the model
#   patterns = ["5090"]               # optional: substrings of a claimed model (default: the name)
#   variants = [{ memory_mib = 32607, fp32 = 104.8, fp16 = 209.5, label = "32 GB" }]
#
# or in JSON {"gpu": [{"name": "RTX 5090", "variants": [{"memory_mib": 32607, "fp32": 104.8, "fp16": 209.5}]}]}.
# Peaks are dense TFLOP/s as in the table above (fp16: tensor cores, float32 accumulation).
MAX_NAME_LENGTH = 64
MAX_PEAK_TFLOPS = 100_000.0
MAX_MEMORY_MIB = 1 << 24  # 16 TiB per GPU
MAX_FILE_MODELS = 256
_MODEL_KEYS = {"name", "patterns", "variants"}
_VARIANT_KEYS = {"memory_mib", "fp32", "fp16", "label"}


class GpuClassError(ValueError):
    """A GPU classes file that cannot be used; the message is one sentence naming what to fix."""


def _keys(entry: Any, allowed: set[str], required: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise GpuClassError(f"{where} must be a table (an object), not {type(entry).__name__}")
    unknown = sorted(set(map(str, entry)) - allowed)
    if unknown:
        raise GpuClassError(f"{where} has unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(allowed))}")
    missing = sorted(required - set(entry))
    if missing:
        raise GpuClassError(f"{where} lacks {', '.join(missing)}")
    return entry


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > MAX_NAME_LENGTH:
        raise GpuClassError(f"{what} must be a non-empty string of at most {MAX_NAME_LENGTH} characters, not {value!r}")
    return value.strip()


def _number(value: Any, what: str, low: float, high: float, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low < value <= high:
        kind = "an integer" if integer else "a number"
        top = f"{int(high)}" if integer else f"{high:g}"
        raise GpuClassError(f"{what} must be {kind} above {low:g} and at most {top}, not {value!r}")
    return value


def _variant(entry: Any, where: str) -> GpuVariant:
    v = _keys(entry, _VARIANT_KEYS, {"memory_mib", "fp32", "fp16"}, where)
    label = v.get("label", "")
    if not isinstance(label, str) or len(label) > MAX_NAME_LENGTH:
        raise GpuClassError(f"{where}: label must be a string of at most {MAX_NAME_LENGTH} characters")
    return GpuVariant(int(_number(v["memory_mib"], f"{where}: memory_mib (MiB per GPU)", 0, MAX_MEMORY_MIB, integer=True)),
                      float(_number(v["fp32"], f"{where}: fp32 (TFLOP/s)", 0, MAX_PEAK_TFLOPS)),
                      float(_number(v["fp16"], f"{where}: fp16 (TFLOP/s)", 0, MAX_PEAK_TFLOPS)), label)


def _model(entry: Any, where: str) -> GpuModel:
    m = _keys(entry, _MODEL_KEYS, {"name", "variants"}, where)
    name = _text(m["name"], f"{where}: name")
    where = f"{where} ({name!r})"
    patterns = m.get("patterns", [name])
    if not isinstance(patterns, list) or not patterns:
        raise GpuClassError(f"{where}: patterns must be a non-empty list of strings")
    upper = tuple(dict.fromkeys(_text(p, f"{where}: each pattern").upper() for p in patterns))
    variants = m["variants"]
    if not isinstance(variants, list) or not variants:
        raise GpuClassError(f"{where}: variants must be a non-empty list of tables (memory_mib, fp32, fp16)")
    parsed = tuple(_variant(v, f"{where} variant {i + 1}") for i, v in enumerate(variants))
    for i, v in enumerate(parsed):
        for w in parsed[:i]:
            if abs(v.memory_mib - w.memory_mib) <= MEMORY_TOLERANCE * max(v.memory_mib, w.memory_mib):
                raise GpuClassError(f"{where}: variants of {w.memory_mib} and {v.memory_mib} MiB are within "
                                    f"{MEMORY_TOLERANCE:.0%} of each other; give one variant with the slower peaks")
    return GpuModel(name, upper, parsed)


def parse_gpu_classes(text: str, *, fmt: str, source: str = "the GPU classes file") -> GpuTable:
    """The models a GPU classes file defines (``fmt``: "json" or "toml"); GpuClassError, one sentence, otherwise."""
    try:
        if fmt == "json":
            import json

            data = json.loads(text)
        elif fmt == "toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            raise GpuClassError(f"{source} must be .json or .toml, not {fmt!r}")
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, GpuClassError):
            raise
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GpuClassError(f"{source} is not valid {fmt.upper()} ({detail})") from None
    top = _keys(data, {"gpu"}, {"gpu"}, source)
    entries = top["gpu"]
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_FILE_MODELS:
        raise GpuClassError(f"{source}: gpu must be a list of 1 to {MAX_FILE_MODELS} models")
    models = tuple(_model(e, f"{source}: model {i + 1}") for i, e in enumerate(entries))
    seen: dict[str, str] = {}
    for model in models:
        if model.name.upper() in seen:
            raise GpuClassError(f"{source} defines the model {model.name!r} twice")
        seen[model.name.upper()] = model.name
    return models


def load_gpu_classes(path: Any) -> GpuTable:
    """The models the file at ``path`` defines (JSON or TOML by its suffix); GpuClassError otherwise."""
    from pathlib import Path

    file = Path(path).expanduser()
    fmt = file.suffix.lower().lstrip(".")
    if fmt not in ("json", "toml"):
        raise GpuClassError(f"the GPU classes file {file} must end in .json or .toml")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise GpuClassError(f"cannot read the GPU classes file {file} ({why})") from None
    return parse_gpu_classes(text, fmt=fmt, source=f"the GPU classes file {file}")


def extended_table(models: GpuTable, base: GpuTable = GPU_MODELS) -> GpuTable:
    """``base`` with ``models`` added: one named like a base model (case-insensitive) replaces it
    in place, the others come first. GpuClassError when a pattern would match two models
    equally (the same pattern in two models)."""
    by_name = {m.name.upper(): m for m in models}
    replaced = [by_name.pop(m.name.upper(), m) for m in base]
    table = tuple(by_name.values()) + tuple(replaced)
    owners: dict[str, str] = {}
    for model in table:
        for pattern in model.patterns:
            if owners.setdefault(pattern, model.name) != model.name:
                raise GpuClassError(f"the models {owners[pattern]!r} and {model.name!r} both have the pattern {pattern!r}; "
                                    "name a model like the one it replaces, or give it a pattern of its own")
    return table
