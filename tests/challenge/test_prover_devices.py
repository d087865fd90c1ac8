"""The GPU prover uses exactly the --gpu selection: NVML indices → CUDA ordinals (pure), and a torch
backend built for a selection places its shares on exactly those devices (a fake torch module: no GPU here)."""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from typing import Any

import numpy as np
import pytest

from prime.challenge import devices as dev
from prime.challenge.devices import CudaDevice, NoGpuBackend, cuda_ordinals, gpu_backend, uuid_key
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import CupyBackend, TorchBackend
from prime.errors import PrimeError
from prime.hardware import GpuInfo


def uuid(i: int) -> str:
    return f"{i:08x}-1111-2222-3333-444444444444"


def nvml(i: int, bus: int | None = None) -> GpuInfo:
    """NVML GPU ``i``: UUID GPU-0000000i-…, on PCI bus 0x10·(i+1) unless ``bus`` says otherwise."""
    return GpuInfo(i, f"GPU-{uuid(i)}", "NVIDIA H100", 81559, 0, 0, 30,
                   pci_bus_id=f"0000:{(bus if bus is not None else 0x10 * (i + 1)):02x}:00.0")


FOUR = [nvml(i) for i in range(4)]
ORDERED = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


# ------------------------------------------------------------------ the rule, as a pure function
def test_uuids_match_whatever_order_cuda_numbers_the_devices_in() -> None:
    # CUDA's default FASTEST_FIRST order (or CUDA_VISIBLE_DEVICES=3,1,...) numbers the cards differently.
    cuda = [CudaDevice(0, uuid(3)), CudaDevice(1, uuid(1)), CudaDevice(2, uuid(0)), CudaDevice(3, uuid(2))]
    assert cuda_ordinals([1, 3], FOUR, cuda, environ={}) == [1, 0]
    assert cuda_ordinals([0, 1, 2, 3], FOUR, cuda, environ={}) == [2, 1, 3, 0]


def test_pci_bus_ids_match_when_cuda_reports_no_uuid() -> None:
    cuda = [CudaDevice(0, None, "0000:40:00"), CudaDevice(1, None, "0000:20:00")]  # only GPUs 3 and 1 visible
    assert cuda_ordinals([1, 3], FOUR, cuda, environ={"CUDA_VISIBLE_DEVICES": "3,1"}) == [1, 0]


def test_position_only_with_pci_bus_order_every_gpu_visible_and_no_identity_at_all() -> None:
    blind = [CudaDevice(i) for i in range(4)]
    assert cuda_ordinals([1, 3], FOUR, blind, environ=ORDERED) == [1, 3]
    for environ in ({}, {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}, {**ORDERED, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}):
        with pytest.raises(PrimeError, match="is not one of the 4 CUDA devices"):
            cuda_ordinals([1], FOUR, blind, environ=environ)
    with pytest.raises(PrimeError, match="is not one of the 3 CUDA devices"):  # counts differ: no guessing
        cuda_ordinals([1], FOUR, blind[:3], environ=ORDERED)


def test_a_known_identity_that_matches_nothing_is_refused_not_guessed() -> None:
    cuda = [CudaDevice(0, uuid(9)), CudaDevice(1, uuid(1)), CudaDevice(2, uuid(2)), CudaDevice(3, uuid(3))]
    with pytest.raises(PrimeError) as err:
        cuda_ordinals([0, 1], FOUR, cuda, environ={**ORDERED, "CUDA_VISIBLE_DEVICES": "GPU-x\u00e9"})
    message = err.value.message
    assert message.startswith(f"GPU 0 (GPU-{uuid(0)}) is not one of the 4 CUDA devices CUDA sees")
    assert "CUDA_VISIBLE_DEVICES='GPU-x\\xe9'" in message and message.isascii() and message.endswith("CUDA_VISIBLE_DEVICES.")


def test_mig_instances_and_shared_devices_are_refused() -> None:
    migs = [CudaDevice(0, None, "0000:10:00"), CudaDevice(1, None, "0000:10:00")]
    with pytest.raises(PrimeError, match="matches 2 of the 2 CUDA devices .*MIG"):
        cuda_ordinals([0], FOUR, migs, environ={})
    twins = [nvml(0), nvml(1, bus=0x10)]  # two NVML GPUs on one bus (a lying probe)
    with pytest.raises(PrimeError, match="same CUDA device 0"):
        cuda_ordinals([0, 1], twins, [CudaDevice(0, None, "0000:10:00")], environ={})
    with pytest.raises(PrimeError, match="GPU 7 was selected but NVML does not list it"):
        cuda_ordinals([7], FOUR, [], environ={})


@pytest.mark.parametrize(("value", "key"), [
    (f"GPU-{uuid(5)}", uuid(5)), (uuid(5).upper(), uuid(5)), (f"MIG-{uuid(5)}", uuid(5)),
    (bytes.fromhex(uuid(5).replace("-", "")), uuid(5)), (b"short", None), ("", None), (None, None),
    ("GPU-" + "a" * 500, None), (uuid(5)[:-1] + "z", None), (7, None),
])
def test_uuid_key(value: object, key: str | None) -> None:
    assert uuid_key(value) == key


# ------------------------------------------------------------------ a fake torch with four CUDA devices
class FakeTensor:
    def __init__(self, array: np.ndarray, device: Any, log: list[Any]) -> None:
        self.array, self.device, self.log = array, device, log

    def __matmul__(self, other: FakeTensor) -> FakeTensor:
        assert other.device == self.device, "both operands on one device"
        self.log.append(("matmul", self.device.index, self.array.shape[0]))
        return FakeTensor(self.array @ other.array, self.device, self.log)

    def float(self) -> FakeTensor:
        return self

    def cpu(self) -> FakeTensor:
        return FakeTensor(self.array, types.SimpleNamespace(type="cpu", index=None), self.log)

    def numpy(self) -> np.ndarray:
        return self.array


def fake_torch(order: list[int], *, available: bool = True, cuda_build: str | None = "12.4") -> types.ModuleType:
    """torch whose CUDA ordinal o is NVML GPU order[o] (UUID and PCI bus id reported, as torch >= 2.5 does)."""
    torch = types.ModuleType("torch")
    torch.__version__ = "2.5.1"
    torch.version = types.SimpleNamespace(cuda=cuda_build)
    torch.float32, torch.float16, torch.bfloat16 = "float32", "float16", "bfloat16"
    current = threading.local()

    @contextlib.contextmanager
    def device_ctx(device: Any) -> Any:
        current.device = device
        yield

    def props(ordinal: int) -> Any:
        gpu = order[ordinal]
        return types.SimpleNamespace(uuid=uuid(gpu), pci_domain_id=0, pci_bus_id=0x10 * (gpu + 1), pci_device_id=0)

    torch.device = lambda kind, index=None: types.SimpleNamespace(type=kind, index=index)
    torch.cuda = types.SimpleNamespace(
        is_available=lambda: available, device_count=lambda: len(order) if available else 0,
        get_device_properties=props, device=device_ctx, empty_cache=lambda: None,
        mem_get_info=lambda device: (80 << 30, 80 << 30), current=current)
    matmul = types.SimpleNamespace()
    torch.backends = types.SimpleNamespace(cuda=types.SimpleNamespace(matmul=matmul), cudnn=types.SimpleNamespace())
    return torch


@pytest.fixture
def environ() -> dict[str, str]:
    return {}


def test_a_torch_backend_for_gpus_1_and_3_computes_on_exactly_those(monkeypatch: pytest.MonkeyPatch,
                                                                      environ: dict[str, str]) -> None:
    order = [2, 3, 0, 1]  # CUDA ordinal → NVML index: CUDA numbers the cards its own way
    torch = fake_torch(order)
    monkeypatch.setitem(sys.modules, "torch", torch)
    backend = gpu_backend([1, 3], FOUR, environ=environ)
    assert isinstance(backend, TorchBackend)
    assert [(d.type, d.index) for d in backend.devices] == [("cuda", 3), ("cuda", 1)]  # NVML 1 is cuda:3, 3 is cuda:1
    assert environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # set before CUDA starts

    log: list[Any] = []

    def matrix(row_keys: np.ndarray, col_keys: np.ndarray, dtype: Any, device: Any, *_: Any) -> FakeTensor:
        assert torch.cuda.current.device is device  # generated inside that device's context
        log.append(("matrix", device.index, row_keys.size))
        return FakeTensor(np.ones((row_keys.size, col_keys.size), np.float32), device, log)

    monkeypatch.setattr(backend, "matrix", matrix)
    params = ChallengeParams(id="c1", seed=1, n=10, parts=2)  # one part per selected GPU
    c = backend.product(params)
    assert c.shape == (20, 10) and np.all(c == params.inner)
    used = {entry[1] for entry in log}
    assert used == {3, 1}  # no share on cuda:0 or cuda:2
    assert sorted((device, rows) for kind, device, rows in log if kind == "matmul") == [(1, 10), (3, 10)]  # a part each
    assert backend.required_bytes(params) > 0 and backend.memory_problem(params) is None


def test_the_first_selected_gpu_alone(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch([0, 1, 2, 3]))
    assert [d.index for d in gpu_backend([2], FOUR, environ=environ).devices] == [2]


def test_an_existing_cuda_device_order_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch([0, 1, 2, 3]))
    environ = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    gpu_backend([0], FOUR, environ=environ)
    assert environ == {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}


def test_neither_backend_installed(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(NoGpuBackend) as err:
        gpu_backend([0], FOUR, environ=environ)
    assert err.value.message == "torch is not installed; cupy is not installed"


def test_a_cpu_only_torch_and_a_broken_cupy(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch([0], available=False, cuda_build=None))
    broken = types.ModuleType("cupy")
    broken.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=lambda: (_ for _ in ()).throw(RuntimeError("cudaErrorInsufficientDriver"))))
    monkeypatch.setitem(sys.modules, "cupy", broken)
    with pytest.raises(NoGpuBackend) as err:
        gpu_backend([0], FOUR, environ=environ)
    assert err.value.message == ("torch 2.5.1 sees no CUDA device (a CPU-only build); "
                                 "cupy cannot start CUDA (cudaErrorInsufficientDriver)")
    monkeypatch.setitem(sys.modules, "torch", fake_torch([0], available=False, cuda_build="12.4"))
    with pytest.raises(NoGpuBackend, match=r"built for CUDA 12\.4, which this driver does not run\)$"):
        gpu_backend([0], FOUR, environ=environ, prefer="torch")
    with pytest.raises(NoGpuBackend, match=r"; or CUDA_VISIBLE_DEVICES='' hides every GPU\)$"):
        gpu_backend([0], FOUR, environ={**environ, "CUDA_VISIBLE_DEVICES": ""}, prefer="torch")


def test_cupy_gets_the_mapped_ordinals(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    order = [3, 2, 1, 0]
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 4,
        getDeviceProperties=lambda o: {"uuid": bytes.fromhex(uuid(order[o]).replace("-", "")),
                                       "pciDomainID": 0, "pciBusID": 0x10 * (order[o] + 1), "pciDeviceID": 0}))
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    backend = gpu_backend([1, 3], FOUR, environ=environ)
    assert isinstance(backend, CupyBackend) and backend.devices == [2, 0]


def test_a_selection_cuda_cannot_see_is_one_sentence_not_a_fallback(monkeypatch: pytest.MonkeyPatch,
                                                                     environ: dict[str, str]) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch([0, 1]))  # CUDA_VISIBLE_DEVICES hid GPUs 2 and 3
    with pytest.raises(PrimeError) as err:
        gpu_backend([1, 3], FOUR, environ=environ)
    assert not isinstance(err.value, NoGpuBackend)
    assert err.value.message.startswith(f"GPU 3 (GPU-{uuid(3)}) is not one of the 2 CUDA devices torch sees")


def test_torch_devices_without_identity_fields() -> None:
    """An older torch whose properties have no uuid/pci fields: devices listed, identities unknown."""
    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
        device_count=lambda: 2, get_device_properties=lambda o: types.SimpleNamespace(name="x")))
    assert dev.torch_cuda_devices(torch) == [CudaDevice(0), CudaDevice(1)]


def test_torch_uuid_objects_read_by_their_text_or_their_bytes() -> None:
    class CUuuid:  # torch's _CUuuid: str() the bare form, .bytes the 16 raw bytes
        def __init__(self, text: str, raw: Any) -> None:
            self.text, self.bytes = text, raw

        def __str__(self) -> str:
            return self.text

    raw = bytes.fromhex(uuid(9).replace("-", ""))
    for value in (CUuuid(uuid(9), b""), CUuuid("?", raw), CUuuid("?", list(raw))):
        torch = types.SimpleNamespace(cuda=types.SimpleNamespace(
            device_count=lambda: 1, get_device_properties=lambda o, v=value: types.SimpleNamespace(uuid=v)))
        assert dev.torch_cuda_devices(torch) == [CudaDevice(0, uuid(9))]


def test_real_torch_if_installed_enumerates_without_failing() -> None:
    torch = pytest.importorskip("torch")
    found = dev.torch_cuda_devices(torch)
    assert [d.ordinal for d in found] == list(range(torch.cuda.device_count()))
    if torch.cuda.is_available():
        assert all(d.uuid for d in found)  # a real CUDA torch reports each device's UUID
