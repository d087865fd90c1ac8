"""What this machine has: GPUs (through NVML), CPU, RAM and free disk.

GPUs come from NVML (``pynvml`` of nvidia-ml-py), which finds the driver's
library through the system loader — never a hard-coded path — and lists every
GPU, not just the first. A machine without the NVIDIA driver simply has zero
GPUs; that is not an error. NVML is initialised once per process and reused, so
the heartbeat's ``gpu_sample()`` stays cheap.

GPU indices are NVML's, which are also what the NVIDIA container runtime means
by ``device_ids``, so a task can be pinned to exact cards on hosts with mixed
models.
"""

from __future__ import annotations

import os
import platform
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from prime.errors import PrimeError

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
        driver = _optional(nvml, lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        cuda = _optional(nvml, lambda: _cuda_version_text(int(nvml.nvmlSystemGetCudaDriverVersion())))
        return gpus, driver, cuda, "; ".join(problems) or None

    def _gpu_info(self, nvml: ModuleType, index: int) -> GpuInfo:
        handle = self._handle(nvml, index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuInfo(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            model=_text(nvml.nvmlDeviceGetName(handle)),
            memory_total_mib=int(memory.total) // MIB,
            memory_used_mib=int(memory.used) // MIB,
            utilization_pct=_utilization(nvml, handle),
            temperature_c=_temperature(nvml, handle),
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


def _utilization(nvml: ModuleType, handle: Any) -> int | None:
    return _optional(nvml, lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))


def _temperature(nvml: ModuleType, handle: Any) -> int | None:
    return _optional(nvml, lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))


def _memory_used_mib(nvml: ModuleType, handle: Any) -> int | None:
    return _optional(nvml, lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).used) // MIB)


def _cuda_version_text(version: int) -> str:
    # NVML encodes CUDA 12.4 as 12040.
    return f"{version // 1000}.{(version % 1000) // 10}"


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
