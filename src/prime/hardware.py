"""What this machine has: GPUs (through NVML), CPU, RAM and free disk.

GPUs come from NVML (``pynvml`` of nvidia-ml-py), which finds the driver's
library through the system loader — never a hard-coded path — and lists every
GPU, not just the first. A machine without the NVIDIA driver simply has zero
GPUs; that is not an error. NVML is initialised once per process and reused, so
the heartbeat's ``gpu_sample()`` stays cheap.

GPU indices are NVML's, which are also what the NVIDIA container runtime means
by ``device_ids``, so a task can be pinned to exact cards on hosts with mixed
models. NVML lists GPUs in PCI bus order; CUDA's ordinals follow it only with
CUDA_DEVICE_ORDER=PCI_BUS_ID and no CUDA_VISIBLE_DEVICES, so the challenge prover
maps NVML GPUs to CUDA devices by UUID or PCI bus id (prime.challenge.prover).

What NVML says is checked before it is believed: a GPU whose UUID is not of NVML's
canonical form (``GPU-``/``MIG-`` and a lowercase 8-4-4-4-12 hex UUID; empty, non-ASCII
or overlong ones included) is left out with the reason in ``gpu_error``, and a driver
or CUDA version of another form is reported as unknown (None) with its reason. The UUIDs
of the offered GPUs and the driver's identity go into every challenge commitment
(``identity``), where the validator records them in its report.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from prime.errors import PrimeError
from prime.protocol.challenge import (
    CUDA_VERSION_PATTERN,
    DRIVER_VERSION_PATTERN,
    GPU_UUID_PATTERN,
    DriverIdentity,
)

MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it; a reading NVML does not support on this card is None."""

    index: int
    uuid: str
    model: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: int | None
    temperature_c: int | None
    # "0000:3b:00.0" (domain:bus:device.function, lowercase hex); None where NVML has none
    pci_bus_id: str | None = None


@dataclass(frozen=True)
class GpuSample:
    """A cheap reading of one GPU for heartbeats."""

    index: int
    utilization_pct: int | None
    memory_used_mib: int | None
    temperature_c: int | None

    def as_heartbeat(self) -> dict[str, int | None]:
        """The heartbeat's wire shape (DESIGN.md): {util, mem_used, temp}."""
        return {"util": self.utilization_pct, "mem_used": self.memory_used_mib, "temp": self.temperature_c}


@dataclass(frozen=True)
class HardwareInfo:
    gpus: list[GpuInfo]
    driver_version: str | None
    cuda_version: str | None
    cpu_model: str
    cpu_cores: int
    ram_mib: int
    disk_free_gib: int
    data_dir: str
    # Why GPUs are missing: NVML unusable ("NVML Shared Library Not Found") or a card unreadable.
    gpu_error: str | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py returns bytes, newer str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _shown(value: object, limit: int = 48) -> str:
    """A hostile reading as printable ASCII, cut to ``limit`` characters, for a reason sentence."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    shown = ascii(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


_UUID = re.compile(GPU_UUID_PATTERN)
_DRIVER = re.compile(DRIVER_VERSION_PATTERN)
_CUDA = re.compile(CUDA_VERSION_PATTERN)
_PCI = re.compile(r"^([0-9A-Fa-f]{1,8}):([0-9A-Fa-f]{2}):([0-9A-Fa-f]{2})\.([0-7])$(?!\n)")


def canonical_gpu_uuid(raw: object) -> str | None:
    """``raw`` in NVML's canonical form ("GPU-" + lowercase 8-4-4-4-12 hex), or None when it is not a UUID.

    Only the hex digits' case is normalised; anything else (empty, non-ASCII, overlong,
    another shape) is refused rather than repaired, since a card that reports such a UUID
    cannot be told apart from another.
    """
    if not isinstance(raw, str | bytes):
        return None
    text = _text(raw)
    if len(text) > 64 or not text.isascii():
        return None
    prefix, _, rest = text.partition("-")
    candidate = f"{prefix}-{rest.lower()}"
    return candidate if _UUID.match(candidate) else None


def canonical_pci_bus_id(raw: object) -> str | None:
    """NVML's "00000000:3B:00.0" as "0000:3b:00.0" (the form CUDA and sysfs print); None if malformed."""
    if not isinstance(raw, str | bytes):
        return None
    match = _PCI.match(_text(raw)) if len(raw) <= 32 else None
    if match is None:
        return None
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{function}"


def _driver_version_text(raw: object) -> str:
    text = _text(raw) if isinstance(raw, str | bytes) else ""
    if not _DRIVER.match(text):
        raise ValueError(f"the NVIDIA driver reported a version of no known form ({_shown(raw)})")
    return text


class Nvml:
    """One NVML session for the process: initialised lazily, once, and thread-safe.

    ``module`` is the pynvml module (a fake one in unit tests).
    """

    def __init__(self, module: ModuleType | None = None) -> None:
        self._module = module
        self._lock = threading.Lock()
        self._initialised = False
        self._error: str | None = None
        self._handles: dict[int, Any] = {}

    def _ensure(self) -> ModuleType | None:
        """Initialise NVML on first use; None (with ``error`` set) when there is no usable driver."""
        with self._lock:
            if self._initialised:
                return self._module
            if self._error is not None:
                return None
            try:
                if self._module is None:
                    import pynvml

                    self._module = pynvml
                self._module.nvmlInit()
            except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / no module at all
                self._error = str(exc) or type(exc).__name__
                return None
            self._initialised = True
            return self._module

    def _handle(self, nvml: ModuleType, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            self._handles[index] = handle
        return handle

    def probe_gpus(self) -> tuple[list[GpuInfo], str | None, str | None, str | None]:
        """All GPUs, driver version, CUDA version and a problem to report (all empty without a driver)."""
        nvml = self._ensure()
        if nvml is None:
            return [], None, None, self._error
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            return [], None, None, f"NVML could not count the GPUs: {exc}"
        gpus = []
        problems = []
        for index in range(count):
            try:
                gpus.append(self._gpu_info(nvml, index))
            except nvml.NVMLError as exc:
                # One broken card (fallen off the bus, ...) must not hide the others.
                problems.append(f"GPU {index} could not be read: {exc}")
            except ValueError as exc:  # a UUID of no known form: this card is not offered
                problems.append(f"GPU {index} {exc}")
        seen: dict[str, int] = {}
        for gpu in list(gpus):
            if gpu.uuid in seen:  # two cards cannot share a UUID: neither is believed
                problems.append(f"GPUs {seen[gpu.uuid]} and {gpu.index} report the same UUID {gpu.uuid}: "
                                "both left out; check the driver")
                gpus = [g for g in gpus if g.uuid != gpu.uuid]
            else:
                seen[gpu.uuid] = gpu.index
        driver = cuda = None
        try:
            driver = _optional(nvml, lambda: _driver_version_text(nvml.nvmlSystemGetDriverVersion()))
        except ValueError as exc:
            problems.append(str(exc))
        try:
            cuda = _optional(nvml, lambda: _cuda_version_text(nvml.nvmlSystemGetCudaDriverVersion()))
        except ValueError as exc:
            problems.append(str(exc))
        return gpus, driver, cuda, "; ".join(problems) or None

    def _gpu_info(self, nvml: ModuleType, index: int) -> GpuInfo:
        handle = self._handle(nvml, index)
        raw_uuid = nvml.nvmlDeviceGetUUID(handle)
        uuid = canonical_gpu_uuid(raw_uuid)
        if uuid is None:
            raise ValueError(f"reported a UUID of no known form ({_shown(raw_uuid)}): left out; "
                             "update or reinstall the NVIDIA driver")
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuInfo(
            index=index,
            uuid=uuid,
            model=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total_mib=int(memory.total) // MIB,
            memory_used_mib=int(memory.used) // MIB,
            utilization_pct=_utilization(nvml, handle),
            temperature_c=_temperature(nvml, handle),
            pci_bus_id=_pci_bus_id(nvml, handle),
        )

    def sample(self, indices: list[int]) -> list[GpuSample]:
        """Utilisation, memory used and temperature of each given GPU (Nones when unreadable)."""
        nvml = self._ensure()
        samples = []
        for index in indices:
            if nvml is None:
                samples.append(GpuSample(index, None, None, None))
                continue
            try:
                handle = self._handle(nvml, index)
            except nvml.NVMLError:
                samples.append(GpuSample(index, None, None, None))
                continue
            samples.append(
                GpuSample(
                    index=index,
                    utilization_pct=_utilization(nvml, handle),
                    memory_used_mib=_memory_used_mib(nvml, handle),
                    temperature_c=_temperature(nvml, handle),
                )
            )
        return samples


def _optional(nvml: ModuleType, read: Any) -> Any:
    """A reading some cards do not support (NVML_ERROR_NOT_SUPPORTED, ...) becomes None."""
    try:
        return read()
    except nvml.NVMLError:
        return None


def _pci_bus_id(nvml: ModuleType, handle: Any) -> str | None:
    try:
        return canonical_pci_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)
    except (nvml.NVMLError, AttributeError):  # not supported, or bindings without it
        return None


def _utilization(nvml: ModuleType, handle: Any) -> int | None:
    return _optional(nvml, lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))


def _temperature(nvml: ModuleType, handle: Any) -> int | None:
    return _optional(nvml, lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))


def _memory_used_mib(nvml: ModuleType, handle: Any) -> int | None:
    return _optional(nvml, lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).used) // MIB)


def _cuda_version_text(raw: object) -> str:
    # NVML encodes CUDA 12.4 as 12040.
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1000 <= raw < 1_000_000:
        raise ValueError(f"the NVIDIA driver reported a CUDA version of no known form ({_shown(raw)})")
    text = f"{raw // 1000}.{(raw % 1000) // 10}"
    if not _CUDA.match(text):  # pragma: no cover - the range above keeps it in form
        raise ValueError(f"the NVIDIA driver reported a CUDA version of no known form ({_shown(raw)})")
    return text


_default_nvml = Nvml()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_cores() -> int:
    # The CPUs this process may use (taskset/cgroup cpusets), not every core of the host.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return psutil.cpu_count(logical=True) or 1


def disk_free_gib(path: str | Path) -> int:
    """Free GiB on the filesystem that holds ``path`` (or its nearest existing parent)."""
    target = Path(path).expanduser().absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    return shutil.disk_usage(target).free // GIB


def probe(data_dir: str | Path = ".", *, nvml: Nvml | None = None) -> HardwareInfo:
    """Probe GPUs, CPU, RAM and the free disk of ``data_dir``; never fails for a missing driver."""
    session = nvml or _default_nvml
    gpus, driver, cuda, gpu_error = session.probe_gpus()
    return HardwareInfo(
        gpus=gpus,
        driver_version=driver,
        cuda_version=cuda,
        cpu_model=_cpu_model(),
        cpu_cores=_cpu_cores(),
        ram_mib=psutil.virtual_memory().total // MIB,
        disk_free_gib=disk_free_gib(data_dir),
        data_dir=str(Path(data_dir).expanduser().absolute()),
        gpu_error=gpu_error,
    )


def gpu_sample(indices: list[int], *, nvml: Nvml | None = None) -> list[GpuSample]:
    """A cheap reading of the given GPUs for a heartbeat (NVML is initialised once per process)."""
    return (nvml or _default_nvml).sample(indices)


def identity(info: HardwareInfo, selected: list[int]) -> tuple[list[str], DriverIdentity | None]:
    """The UUIDs of the ``selected`` GPUs (in that order) and the driver, as a commitment reports them.

    No GPUs selected (a CPU node, ``--gpu none``): nothing, not even the driver.
    """
    if not selected:
        return [], None
    by_index = {gpu.index: gpu for gpu in info.gpus}
    uuids = [by_index[i].uuid for i in selected if i in by_index]
    driver = DriverIdentity(version=info.driver_version, cuda=info.cuda_version) if info.driver_version else None
    return uuids, driver


def select_gpus(info: HardwareInfo, selection: str) -> list[int]:
    """Turn ``--gpu all|none|0,1`` into NVML indices; a bad selection raises a one-sentence PrimeError."""
    text = selection.strip().lower()
    present = [gpu.index for gpu in info.gpus]
    if text == "all":
        return present
    if text in ("none", ""):
        return []
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise PrimeError(
                f"The GPU selection '{selection}' is not valid; use --gpu all, --gpu none or a comma-separated list of GPU indices such as --gpu 0,1."
            )
        index = int(part)
        if index not in present:
            available = ", ".join(map(str, present)) if present else "none"
            raise PrimeError(
                f"GPU {index} does not exist on this machine (GPUs present: {available}); run `prime miner probe` to see them and pick from those indices."
            )
        if index in chosen:
            raise PrimeError(f"GPU {index} is named twice in '{selection}'; list each GPU index once.")
        chosen.append(index)
    return sorted(chosen)


def to_specs(info: HardwareInfo, selected: list[int], data_dir: str | Path | None = None) -> Any:
    """The on-chain ``Specs`` for the selected GPUs (memory = the smallest card's; one model only).

    ``data_dir`` re-measures free disk there; without it the probe's figure is used.
    """
    from prime.chain.types import Specs

    by_index = {gpu.index: gpu for gpu in info.gpus}
    missing = [i for i in selected if i not in by_index]
    if missing:
        raise PrimeError(f"GPU {missing[0]} was selected but is not present; run `prime miner probe` and select from the GPUs it lists.")
    gpus = [by_index[i] for i in selected]
    models = sorted({gpu.model for gpu in gpus})
    if len(models) > 1:
        raise PrimeError(
            f"The selected GPUs are different models ({', '.join(models)}); a node offers one model, so select GPUs of one model with --gpu, e.g. --gpu {gpus[0].index}."
        )
    return Specs(
        gpu_count=len(gpus),
        gpu_model=models[0] if models else "",
        gpu_memory_mib=min((gpu.memory_total_mib for gpu in gpus), default=0),
        cpu_cores=info.cpu_cores,
        ram_mib=info.ram_mib,
        disk_gib=disk_free_gib(data_dir) if data_dir is not None else info.disk_free_gib,
    )
