"""Which CUDA devices prove: the miner's ``--gpu`` selection (NVML indices) as CUDA ordinals.

NVML numbers GPUs in PCI bus order; CUDA numbers them fastest first unless
CUDA_DEVICE_ORDER=PCI_BUS_ID, and only those CUDA_VISIBLE_DEVICES names (by index or
UUID, in its own order). So an NVML index is never used as a CUDA ordinal directly.
The rule (``cuda_ordinals``), for each selected GPU in the offered order:

1. the CUDA device whose UUID is the GPU's NVML UUID (torch and cupy both report it);
2. else the CUDA device on the GPU's PCI bus id (domain:bus:device);
3. else, only when CUDA reports neither for any device, CUDA_DEVICE_ORDER=PCI_BUS_ID,
   CUDA_VISIBLE_DEVICES is unset and CUDA sees exactly the GPUs NVML lists: the same
   position (NVML order is PCI bus order, and so is CUDA's then).

Anything else (a selected GPU CUDA does not see, two GPUs on one CUDA device, one GPU
matching several, as MIG instances do) refuses to start in one sentence. The miner sets
CUDA_DEVICE_ORDER=PCI_BUS_ID (unless it is set already) before torch or cupy starts
CUDA, so rule 3 holds where it is reached.

``gpu_backend`` builds the torch (else cupy) backend on exactly those devices, its work
split over them only; ``NoGpuBackend`` says why neither can be used.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from prime.challenge.prover import CupyBackend, TorchBackend
from prime.errors import PrimeError

GPU_BACKENDS = ("torch", "cupy")
_HEX = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class CudaDevice:
    """One CUDA device as torch or cupy enumerates it; None where the backend does not say."""

    ordinal: int
    uuid: str | None = None  # lowercase 8-4-4-4-12 hex, no "GPU-" prefix
    pci_bus_id: str | None = None  # "0000:3b:00" (domain:bus:device, lowercase hex)


class NoGpuBackend(PrimeError):
    """Neither torch nor cupy can prove with the offered GPUs; the message says why, per backend."""


def uuid_key(value: object) -> str | None:
    """A UUID as the bare lowercase 8-4-4-4-12 form: from "GPU-…"/"MIG-…", bare text or 16 bytes; None if not one."""
    if isinstance(value, bytes | bytearray):
        if len(value) != 16:
            return None
        digits = bytes(value).hex()
    elif value is not None:  # str, or torch's _CUuuid (whose str is the bare form)
        text = str(value).strip().lower()
        if len(text) > 64:
            return None
        for prefix in ("gpu-", "mig-"):
            if text.startswith(prefix):
                text = text[len(prefix):]
        digits = text.replace("-", "")
    else:
        return None
    if not _HEX.match(digits):
        return None
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def pci_key(domain: object, bus: object, device: object) -> str | None:
    """domain:bus:device as "0000:3b:00"; None unless all three are non-negative ints."""
    parts = (domain, bus, device)
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 1 << 32 for p in parts):
        return None
    return f"{domain:04x}:{bus:02x}:{device:02x}"


def _nvml_pci_key(bus_id: str | None) -> str | None:
    # hardware.canonical_pci_bus_id's "0000:3b:00.0" without the function
    return bus_id.rsplit(".", 1)[0] if bus_id else None


def cuda_ordinals(selected: Sequence[int], gpus: Sequence[Any], cuda: Sequence[CudaDevice], *,
                  backend: str = "CUDA", environ: Mapping[str, str] | None = None) -> list[int]:
    """The CUDA ordinal of each NVML GPU in ``selected`` (same order), by the rule in the module docstring.

    ``gpus`` are the probe's GPUs (``index``, ``uuid``, ``pci_bus_id``); ``cuda`` what the
    backend enumerates. Raises a one-sentence PrimeError when a GPU cannot be matched.
    """
    env = os.environ if environ is None else environ
    by_index = {gpu.index: gpu for gpu in gpus}
    nvml_order = sorted(by_index)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    by_position = (env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID" and visible is None
                   and len(cuda) == len(nvml_order) and not any(d.uuid or d.pci_bus_id for d in cuda))
    seen = f"the {len(cuda)} CUDA device{'s' if len(cuda) != 1 else ''} {backend} sees"
    if visible is not None:
        seen += f" (CUDA_VISIBLE_DEVICES={ascii(visible[:64])})"
    ordinals: list[int] = []
    for index in selected:
        gpu = by_index.get(index)
        if gpu is None:
            raise PrimeError(f"GPU {index} was selected but NVML does not list it; run `prime miner probe` "
                             "and select from the GPUs it lists with --gpu.")
        key = uuid_key(gpu.uuid)
        match = [d.ordinal for d in cuda if key is not None and d.uuid == key]
        pci = _nvml_pci_key(getattr(gpu, "pci_bus_id", None))
        if not match and pci is not None:
            match = [d.ordinal for d in cuda if d.pci_bus_id == pci]
        if not match and by_position:
            match = [cuda[nvml_order.index(index)].ordinal]
        if not match:
            raise PrimeError(f"GPU {index} ({gpu.uuid}) is not one of {seen}; offer only GPUs CUDA can use "
                             "with --gpu, or unset CUDA_VISIBLE_DEVICES.")
        if len(match) > 1:
            raise PrimeError(f"GPU {index} ({gpu.uuid}) matches {len(match)} of {seen} (MIG instances?); "
                             "disable MIG on it or offer other GPUs with --gpu.")
        if match[0] in ordinals:
            raise PrimeError(f"GPU {index} and another offered GPU are the same CUDA device {match[0]}; "
                             "offer each card once with --gpu.")
        ordinals.append(match[0])
    return ordinals


def torch_cuda_devices(torch: Any) -> list[CudaDevice]:
    """The CUDA devices torch sees, with the UUID and PCI bus id of each where torch reports them."""
    devices = []
    for ordinal in range(int(torch.cuda.device_count())):
        uuid = pci = None
        try:
            props = torch.cuda.get_device_properties(ordinal)
            raw = getattr(props, "uuid", None)
            uuid = uuid_key(raw)
            raw_bytes = getattr(raw, "bytes", None)  # torch's _CUuuid also holds the 16 raw bytes
            if uuid is None and isinstance(raw_bytes, bytes | bytearray | list | tuple):
                uuid = uuid_key(bytes(raw_bytes))
            pci = pci_key(getattr(props, "pci_domain_id", None), getattr(props, "pci_bus_id", None),
                          getattr(props, "pci_device_id", None))
        except Exception:  # noqa: BLE001 - an older torch without them: matched by position or refused
            pass
        devices.append(CudaDevice(ordinal, uuid, pci))
    return devices


def cupy_cuda_devices(cupy: Any) -> list[CudaDevice]:
    """The CUDA devices cupy sees (cudaGetDeviceProperties: uuid bytes, pciDomainID/BusID/DeviceID)."""
    runtime = cupy.cuda.runtime
    devices = []
    for ordinal in range(int(runtime.getDeviceCount())):
        uuid = pci = None
        try:
            props = runtime.getDeviceProperties(ordinal)
            uuid = uuid_key(props.get("uuid"))
            pci = pci_key(props.get("pciDomainID"), props.get("pciBusID"), props.get("pciDeviceID"))
        except Exception:  # noqa: BLE001
            pass
        devices.append(CudaDevice(ordinal, uuid, pci))
    return devices


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ascii(text[:120])[1:-1]


def gpu_backend(selected: Sequence[int], gpus: Sequence[Any], *, prefer: str | None = None,
                environ: MutableMapping[str, str] | None = None) -> TorchBackend | CupyBackend:
    """The torch (else cupy) backend computing on exactly the NVML GPUs ``selected``, in that order.

    Raises NoGpuBackend when neither is usable (not installed, no CUDA, a broken install) and a
    one-sentence PrimeError when the selection cannot be matched to CUDA devices.
    """
    env = os.environ if environ is None else environ
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # before torch/cupy first start CUDA
    reasons: list[str] = []
    backend: TorchBackend | CupyBackend
    for name in ([prefer] if prefer else GPU_BACKENDS):
        try:
            module = importlib.import_module(name)
        except ImportError:
            reasons.append(f"{name} is not installed")
            continue
        except Exception as exc:  # noqa: BLE001 - a broken install is "not usable", said once
            reasons.append(f"{name} does not import ({_short(exc)})")
            continue
        try:
            if name == "torch":
                if not module.cuda.is_available() or int(module.cuda.device_count()) == 0:
                    built = getattr(getattr(module, "version", None), "cuda", None)
                    why = f"built for CUDA {built}, which this driver does not run" if built else "a CPU-only build"
                    if "CUDA_VISIBLE_DEVICES" in env:  # or nothing is visible to it
                        why += f"; or CUDA_VISIBLE_DEVICES={ascii(env['CUDA_VISIBLE_DEVICES'][:64])} hides every GPU"
                    reasons.append(f"torch {getattr(module, '__version__', '?')} sees no CUDA device ({why})")
                    continue
                ordinals = cuda_ordinals(selected, gpus, torch_cuda_devices(module), backend="torch", environ=env)
                backend = TorchBackend([module.device("cuda", o) for o in ordinals])
            elif name == "cupy":
                ordinals = cuda_ordinals(selected, gpus, cupy_cuda_devices(module), backend="cupy", environ=env)
                backend = CupyBackend(ordinals)
            else:
                raise ValueError(f"unknown GPU backend {name!r}; use torch or cupy")
        except PrimeError:
            raise
        except Exception as exc:  # noqa: BLE001 - no driver for it, CUDA init failure, ...
            reasons.append(f"{name} cannot start CUDA ({_short(exc)})")
            continue
        return backend
    raise NoGpuBackend("; ".join(reasons) or "no GPU backend was tried")
