"""Hardware probe: NVML through a fake pynvml module (unit), and the real no-driver path."""

from __future__ import annotations

import ctypes.util
import os
import types
from pathlib import Path

import pytest

from prime.chain.types import Specs
from prime.errors import PrimeError
from prime.hardware import (
    GpuInfo,
    HardwareInfo,
    Nvml,
    gpu_sample,
    probe,
    select_gpus,
    to_specs,
)

MIB = 1024 * 1024


class FakeNvml:
    """Builds a module that quacks like pynvml for the given cards."""

    def __init__(self, cards: list[dict], *, init_error: str | None = None, broken: set[int] = frozenset()) -> None:
        self.cards = cards
        self.init_calls = 0
        module = types.ModuleType("fake_pynvml")

        class NVMLError(Exception):
            pass

        module.NVMLError = NVMLError
        module.NVML_TEMPERATURE_GPU = 0

        def nvmlInit() -> None:
            self.init_calls += 1
            if init_error:
                raise NVMLError(init_error)

        def handle(index: int) -> int:
            if index in broken:
                raise NVMLError("GPU is lost")
            return index

        def need(card: dict, key: str):
            value = card.get(key)
            if value is None:
                raise NVMLError("Not Supported")
            return value

        module.nvmlInit = nvmlInit
        module.nvmlDeviceGetCount = lambda: len(cards)
        module.nvmlDeviceGetHandleByIndex = handle
        module.nvmlDeviceGetName = lambda h: cards[h]["name"].encode()  # older bindings return bytes
        module.nvmlDeviceGetUUID = lambda h: cards[h]["uuid"]
        module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=cards[h]["total"] * MIB, used=cards[h]["used"] * MIB)
        module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=need(cards[h], "util"), memory=0)
        module.nvmlDeviceGetTemperature = lambda h, sensor: need(cards[h], "temp")
        module.nvmlSystemGetDriverVersion = lambda: "550.54.15"
        module.nvmlSystemGetCudaDriverVersion = lambda: 12040
        self.module = module


H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa", "total": 81559, "used": 1024, "util": 87, "temp": 61}
RTX = {"name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-bbbb", "total": 24564, "used": 300, "util": None, "temp": 45}


def test_probe_lists_every_gpu_of_a_mixed_machine(tmp_path: Path) -> None:
    fake = FakeNvml([H100, RTX])
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert info.gpus == [
        GpuInfo(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 81559, 1024, 87, 61),
        # The 4090 does not report utilisation here: None, not a crash and not a lost card.
        GpuInfo(1, "GPU-bbbb", "NVIDIA GeForce RTX 4090", 24564, 300, None, 45),
    ]
    assert info.driver_version == "550.54.15"
    assert info.cuda_version == "12.4"
    assert info.gpu_error is None
    assert info.cpu_cores >= 1 and info.ram_mib > 0
    assert info.data_dir == str(tmp_path)


def test_nvml_init_error_means_zero_gpus_not_a_failure(tmp_path: Path) -> None:
    fake = FakeNvml([H100], init_error="Driver Not Loaded")
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert info.gpus == []
    assert info.driver_version is None
    assert info.gpu_error == "Driver Not Loaded"


def test_one_unreadable_gpu_does_not_hide_the_others(tmp_path: Path) -> None:
    fake = FakeNvml([H100, RTX, H100], broken={1})
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert [gpu.index for gpu in info.gpus] == [0, 2]
    assert "GPU 1" in (info.gpu_error or "")


def test_gpu_sample_initialises_nvml_once_and_reads_each_selected_gpu(tmp_path: Path) -> None:
    fake = FakeNvml([H100, RTX])
    nvml = Nvml(fake.module)
    probe(tmp_path, nvml=nvml)
    first = gpu_sample([0, 1], nvml=nvml)
    gpu_sample([1], nvml=nvml)
    assert fake.init_calls == 1
    assert [s.as_heartbeat() for s in first] == [
        {"util": 87, "mem_used": 1024, "temp": 61},
        {"util": None, "mem_used": 300, "temp": 45},
    ]


def test_gpu_sample_without_driver_reports_nothing_known() -> None:
    nvml = Nvml(FakeNvml([], init_error="NVML Shared Library Not Found").module)
    assert [s.as_heartbeat() for s in gpu_sample([0], nvml=nvml)] == [{"util": None, "mem_used": None, "temp": None}]


def _info(gpus: list[GpuInfo]) -> HardwareInfo:
    return HardwareInfo(gpus, "550", "12.4", "cpu", 16, 64000, 500, "/data")


MIXED = _info([GpuInfo(0, "u0", "NVIDIA H100", 81559, 0, 0, 30), GpuInfo(1, "u1", "NVIDIA RTX 4090", 24564, 0, 0, 30)])


@pytest.mark.parametrize(
    ("selection", "expected"),
    [("all", [0, 1]), ("none", []), ("", []), ("1", [1]), ("1,0", [0, 1]), (" 0 , 1 ", [0, 1]), ("ALL", [0, 1])],
)
def test_select_gpus(selection: str, expected: list[int]) -> None:
    assert select_gpus(MIXED, selection) == expected


@pytest.mark.parametrize(("selection", "words"), [("0,5", "GPU 5 does not exist"), ("first", "not valid"), ("0,0", "named twice"), ("-1", "not valid")])
def test_bad_gpu_selection_is_one_sentence(selection: str, words: str) -> None:
    with pytest.raises(PrimeError) as excinfo:
        select_gpus(MIXED, selection)
    assert words in excinfo.value.message
    assert excinfo.value.message.count(". ") == 0 and excinfo.value.message.endswith(".")


def test_to_specs_uses_the_selected_gpus_only() -> None:
    assert to_specs(MIXED, [1]) == Specs(gpu_count=1, gpu_model="NVIDIA RTX 4090", gpu_memory_mib=24564, cpu_cores=16, ram_mib=64000, disk_gib=500)
    assert to_specs(MIXED, []) == Specs(gpu_count=0, gpu_model="", gpu_memory_mib=0, cpu_cores=16, ram_mib=64000, disk_gib=500)


def test_to_specs_memory_is_the_smallest_selected_card() -> None:
    info = _info([GpuInfo(0, "a", "NVIDIA A100", 81920, 0, 0, 0), GpuInfo(1, "b", "NVIDIA A100", 40960, 0, 0, 0)])
    specs = to_specs(info, [0, 1])
    assert (specs.gpu_count, specs.gpu_model, specs.gpu_memory_mib) == (2, "NVIDIA A100", 40960)


def test_to_specs_refuses_mixed_models() -> None:
    with pytest.raises(PrimeError, match="different models"):
        to_specs(MIXED, [0, 1])


def test_to_specs_measures_disk_of_the_given_dir(tmp_path: Path) -> None:
    specs = to_specs(MIXED, [0], data_dir=tmp_path / "not-yet-created")
    st = os.statvfs(tmp_path)
    # Not the probe's 500 GiB but this filesystem's (other writers may move it by a GiB meanwhile).
    assert abs(specs.disk_gib - st.f_bavail * st.f_frsize // 1024**3) <= 1


def test_real_probe_on_this_machine(tmp_path: Path) -> None:
    """The real NVML path: no driver here means zero GPUs and no error; with one, real cards."""
    info = probe(tmp_path)
    driver_present = ctypes.util.find_library("nvidia-ml") is not None or Path("/dev/nvidiactl").exists()
    if driver_present:
        assert info.gpus and all(gpu.memory_total_mib > 0 for gpu in info.gpus)
        assert [gpu.index for gpu in info.gpus] == list(range(len(info.gpus)))
    else:
        assert info.gpus == []
        assert info.gpu_error  # says why (library not found / driver not loaded)
        assert select_gpus(info, "all") == []
        assert gpu_sample([]) == []
    assert info.cpu_cores >= 1 and info.ram_mib > 0 and info.disk_free_gib >= 0
