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
    canonical_pci_bus_id,
    gpu_sample,
    identity,
    probe,
    select_gpus,
    to_specs,
)
from prime.protocol.challenge import DriverIdentity

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
        module.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=need(cards[h], "bus").encode())
        module.nvmlSystemGetDriverVersion = lambda: self.driver
        module.nvmlSystemGetCudaDriverVersion = lambda: self.cuda
        self.driver: object = "550.54.15"
        self.cuda: object = 12040
        self.module = module


UUID_A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
UUID_B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
UUID_C = "GPU-cccccccc-1111-2222-3333-444444444444"
H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": UUID_A, "total": 81559, "used": 1024, "util": 87, "temp": 61,
        "bus": "00000000:3B:00.0"}
RTX = {"name": "NVIDIA GeForce RTX 4090", "uuid": UUID_B, "total": 24564, "used": 300, "util": None, "temp": 45}


def test_probe_lists_every_gpu_of_a_mixed_machine(tmp_path: Path) -> None:
    fake = FakeNvml([H100, RTX])
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert info.gpus == [
        GpuInfo(0, UUID_A, "NVIDIA H100 80GB HBM3", 81559, 1024, 87, 61, pci_bus_id="0000:3b:00.0"),
        # The 4090 does not report utilisation (nor its PCI bus) here: None, not a crash and not a lost card.
        GpuInfo(1, UUID_B, "NVIDIA GeForce RTX 4090", 24564, 300, None, 45),
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
    fake = FakeNvml([H100, RTX, {**H100, "uuid": UUID_C}], broken={1})
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


# ------------------------------------------------------------------ hostile NVML readings
@pytest.mark.parametrize(
    ("uuid", "shown"),
    [
        ("", "''"),
        ("GPU-aaaa", "'GPU-aaaa'"),  # too short
        ("GPU-aaaaaaaa-1111-2222-3333-44444444444\u00e9", "\\xe9"),  # non-ASCII, shown escaped
        ("GPU-aaaaaaaa-1111-2222-3333-444444444444\n", "\\n"),  # a trailing newline is no UUID
        ("GPU-" + "a" * 5000, "(5004 characters)"),  # very long: refused, shown truncated
        ("NPU-aaaaaaaa-1111-2222-3333-444444444444", "NPU-"),
        ("GPU-aaaaaaaa-1111-2222-3333-44444444444g", "444g"),
        (b"GPU-\xff\xfe", "\\ufffd"),  # undecodable bytes from older bindings
        (12345, "12345"),  # not text at all
    ],
    ids=["empty", "short", "non-ascii", "newline", "5000-long", "prefix", "not-hex", "bytes", "int"],
)
def test_a_gpu_with_a_uuid_of_no_known_form_is_left_out_with_the_reason(tmp_path: Path, uuid: object, shown: str) -> None:
    fake = FakeNvml([{**RTX, "uuid": uuid}, H100])
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert [gpu.index for gpu in info.gpus] == [1]  # the other card is still offered
    assert info.gpu_error is not None and info.gpu_error.startswith("GPU 0 reported a UUID of no known form")
    assert shown in info.gpu_error and "driver" in info.gpu_error
    assert info.gpu_error.isascii() and len(info.gpu_error) < 300  # printable and bounded, whatever the card said


def test_uuid_hex_case_is_canonicalised_and_mig_uuids_are_accepted(tmp_path: Path) -> None:
    mig = "MIG-0123abcd-1111-2222-3333-444444444444"
    fake = FakeNvml([{**H100, "uuid": UUID_A.upper().replace("GPU-", "GPU-")}, {**RTX, "uuid": mig.encode()}])
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert [gpu.uuid for gpu in info.gpus] == [UUID_A, mig]
    assert info.gpu_error is None


def test_two_cards_with_one_uuid_are_both_left_out(tmp_path: Path) -> None:
    fake = FakeNvml([H100, RTX, {**H100, "bus": "00000000:5E:00.0"}])
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert [gpu.index for gpu in info.gpus] == [1]
    assert "GPUs 0 and 2 report the same UUID" in (info.gpu_error or "")


@pytest.mark.parametrize("version", ["", "550.54.15\n", "5" * 33, "550 54", "\u0665\u0665\u0660", b"\xff", None, 550])
def test_a_driver_version_of_no_known_form_is_unknown_with_the_reason(tmp_path: Path, version: object) -> None:
    fake = FakeNvml([H100])
    fake.driver = version
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert info.driver_version is None
    assert [gpu.index for gpu in info.gpus] == [0]
    assert "version of no known form" in (info.gpu_error or "") and (info.gpu_error or "").isascii()
    assert identity(info, [0]) == ([UUID_A], None)  # no driver identity is reported rather than a made-up one


@pytest.mark.parametrize("cuda", [-1, 0, 999, 10**9, True, "12040", 12.5])
def test_a_cuda_version_of_no_known_form_is_unknown(tmp_path: Path, cuda: object) -> None:
    fake = FakeNvml([H100])
    fake.cuda = cuda
    info = probe(tmp_path, nvml=Nvml(fake.module))
    assert info.cuda_version is None and info.driver_version == "550.54.15"
    assert "CUDA version of no known form" in (info.gpu_error or "")


@pytest.mark.parametrize(("bus", "canonical"), [
    ("00000000:3B:00.0", "0000:3b:00.0"), ("0000:af:1f.7", "0000:af:1f.7"), (b"00000001:01:00.1", "0001:01:00.1"),
    ("3B:00.0", None), ("0000:3b:00.8", None), ("0000:3b:00.0\n", None), ("0" * 40 + ":3b:00.0", None), (None, None),
])
def test_pci_bus_ids_are_canonical_or_none(bus: object, canonical: str | None) -> None:
    assert canonical_pci_bus_id(bus) == canonical


def test_identity_names_the_selected_gpus_in_order_and_the_driver(tmp_path: Path) -> None:
    fake = FakeNvml([H100, RTX, {**H100, "uuid": UUID_C}])
    info = probe(tmp_path, nvml=Nvml(fake.module))
    uuids, driver = identity(info, [0, 2])
    assert uuids == [UUID_A, UUID_C]
    assert driver == DriverIdentity(version="550.54.15", cuda="12.4")
    assert identity(info, []) == ([], None)  # --gpu none and CPU nodes report nothing


def test_probe_json_of_a_gpu_host_shows_uuids_bus_ids_and_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prime miner probe --json` through the CLI with the process's NVML session on a fake driver."""
    import json

    from typer.testing import CliRunner

    import prime.hardware as hw
    from prime.cli import app

    monkeypatch.setattr(hw, "_default_nvml", Nvml(FakeNvml([H100, RTX]).module))
    result = CliRunner().invoke(app, ["miner", "probe", "--json", "--data-dir", str(tmp_path)],
                                env={"PRIME_HOME": str(tmp_path / "home")})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [(g["index"], g["uuid"], g["pci_bus_id"]) for g in data["gpus"]] == [(0, UUID_A, "0000:3b:00.0"), (1, UUID_B, None)]
    assert (data["driver_version"], data["cuda_version"], data["gpu_error"]) == ("550.54.15", "12.4", None)
