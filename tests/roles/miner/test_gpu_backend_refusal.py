"""GPUs offered and no GPU challenge backend: the miner refuses to start, in one sentence with the fix,
before any transaction (the node's prepare() with a faked probe, and a real `prime miner start` on a
fake NVML driver). `--gpu none` and CPU-only hosts start as before, proving with numpy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from prime import hardware
from prime.challenge.devices import NoGpuBackend
from prime.challenge.prover import MatmulProver, NumpyBackend
from prime.errors import PrimeError
from prime.hardware import GpuInfo, HardwareInfo
from prime.roles.miner import node as node_module
from prime.roles.miner.node import MinerNode, MinerOptions
from prime.roles.miner.preflight import GPU_BACKEND_FIX, challenge_prover
from tests.fixtures.processes import _child_env, free_port, prime_command
from tests.support.miner_env import miner_env, write_keystore

UUIDS = [f"GPU-{i:08x}-1111-2222-3333-444444444444" for i in range(2)]
GPU_HOST = HardwareInfo(
    [GpuInfo(i, UUIDS[i], "NVIDIA H100 80GB HBM3", 81559, 0, 0, 30, f"0000:{0x10 * (i + 1):02x}:00.0") for i in range(2)],
    "550.54.15", "12.4", "cpu", 16, 64000, 500, "/data")
CPU_HOST = HardwareInfo([], None, None, "cpu", 16, 64000, 500, "/data", gpu_error="NVML Shared Library Not Found")
FIX = "install the GPU backend: pipx install 'prime[gpu]' (or pip install 'prime[gpu]')"


def none_found(selected: list[int], gpus: list[Any]) -> Any:
    raise NoGpuBackend("torch is not installed; cupy is not installed")


# ------------------------------------------------------------------ the check itself
def test_the_refusal_is_one_sentence_with_the_fix() -> None:
    assert GPU_BACKEND_FIX == FIX
    prover, failure = challenge_prover([0, 1], GPU_HOST, "all", find_backend=none_found)
    assert prover is None
    assert failure == ("GPUs 0, 1 are offered (--gpu all) but no GPU challenge backend can use them "
                       f"(torch is not installed; cupy is not installed); {FIX}, or start the miner with --gpu none.")
    _, one = challenge_prover([1], GPU_HOST, "1", find_backend=none_found)
    assert one is not None and one.startswith("GPU 1 is offered (--gpu 1) but no GPU challenge backend can use it (")
    assert one.count(". ") == 0 and one.endswith(".")


def test_no_gpus_offered_proves_with_numpy_and_never_looks_for_a_gpu_backend() -> None:
    def must_not_be_called(*_: Any) -> Any:
        raise AssertionError("no GPU backend is looked for without GPUs")

    for info in (CPU_HOST, GPU_HOST):  # a CPU host, or --gpu none on a GPU host
        prover, failure = challenge_prover([], info, "none", find_backend=must_not_be_called)
        assert failure is None and isinstance(prover, MatmulProver) and isinstance(prover.backend, NumpyBackend)


def test_a_found_backend_proves_with_exactly_the_selection() -> None:
    seen: list[Any] = []
    backend = types.SimpleNamespace(name="torch")

    def found(selected: list[int], gpus: list[Any]) -> Any:
        seen.append((selected, [g.uuid for g in gpus]))
        return backend

    prover, failure = challenge_prover([1], GPU_HOST, "1", find_backend=found)
    assert failure is None and isinstance(prover, MatmulProver) and prover.backend is backend
    assert seen == [([1], UUIDS)]


def test_a_selection_cuda_cannot_use_is_refused_with_its_own_sentence() -> None:
    def unmatched(selected: list[int], gpus: list[Any]) -> Any:
        raise PrimeError("GPU 1 (x) is not one of the 1 CUDA device torch sees; offer only GPUs CUDA can use with --gpu.")

    assert challenge_prover([1], GPU_HOST, "1", find_backend=unmatched)[1] == (
        "GPU 1 (x) is not one of the 1 CUDA device torch sees; offer only GPUs CUDA can use with --gpu.")


# ------------------------------------------------------------------ the node's prepare(), before any transaction
class ChainReached(Exception):
    """prepare() got past every local check and went for the chain."""


def _node(tmp_path: Path, gpu: str, info: HardwareInfo, monkeypatch: pytest.MonkeyPatch) -> MinerNode:
    monkeypatch.setattr(hardware, "probe", lambda data_dir: info)
    monkeypatch.setattr(node_module, "_preflight", lambda *args: [])  # Docker, runtime, port: tested elsewhere
    monkeypatch.setitem(sys.modules, "torch", None)  # no GPU backend importable, whatever this machine has
    monkeypatch.setitem(sys.modules, "cupy", None)

    async def connect(self: MinerNode) -> None:
        raise ChainReached()

    monkeypatch.setattr(MinerNode, "_connect_chain", connect)
    options = MinerOptions(run_id=1, rpc_url="http://127.0.0.1:9", deployment=tmp_path / "none.json",
                           data_dir=tmp_path / "miner", gpu=gpu)
    return MinerNode(options, Account.create(), executor=object())


@pytest.mark.parametrize("gpu", ["all", "0,1", "1"])
async def test_gpus_offered_without_a_backend_stop_before_the_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    gpu: str) -> None:
    node = _node(tmp_path, gpu, GPU_HOST, monkeypatch)
    try:
        with pytest.raises(PrimeError) as err:
            await node.prepare()
    finally:
        await node.close()
    assert not isinstance(err.value, ChainReached)
    assert f"offered (--gpu {gpu}) but no GPU challenge backend" in err.value.message
    assert "(torch is not installed; cupy is not installed)" in err.value.message and FIX in err.value.message
    assert node.registry is None and node.registration_tx is None


@pytest.mark.parametrize(("gpu", "info"), [("none", GPU_HOST), ("all", CPU_HOST)])
async def test_gpu_none_and_cpu_hosts_start_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      gpu: str, info: HardwareInfo) -> None:
    node = _node(tmp_path, gpu, info, monkeypatch)
    try:
        with pytest.raises(ChainReached):
            await node.prepare()
    finally:
        await node.close()
    assert node.gpus == [] and isinstance(node.prover, MatmulProver) and isinstance(node.prover.backend, NumpyBackend)


# ------------------------------------------------------------------ a real `prime miner start` on a fake driver
FAKE_PYNVML = textwrap.dedent('''
    """pynvml for a host with two H100s (no real driver needed)."""
    import types

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0
    _UUIDS = ["GPU-00000000-1111-2222-3333-444444444444", "GPU-00000001-1111-2222-3333-444444444444"]

    def nvmlInit():
        pass

    def nvmlDeviceGetCount():
        return 2

    def nvmlDeviceGetHandleByIndex(index):
        return index

    def nvmlDeviceGetUUID(handle):
        return _UUIDS[handle]

    def nvmlDeviceGetName(handle):
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(handle):
        return types.SimpleNamespace(total=81559 << 20, used=0)

    def nvmlDeviceGetUtilizationRates(handle):
        return types.SimpleNamespace(gpu=0, memory=0)

    def nvmlDeviceGetTemperature(handle, sensor):
        return 30

    def nvmlDeviceGetPciInfo(handle):
        return types.SimpleNamespace(busId=b"00000000:%02X:00.0" % (0x10 * (handle + 1)))

    def nvmlSystemGetDriverVersion():
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion():
        return 12040
''')


def _start(tmp_path: Path, gpu: str) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake-gpu-host"
    for name in ("torch", "cupy"):  # neither backend importable, even where this machine has one
        (fake / name).mkdir(parents=True, exist_ok=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('no {name} on this host')\n")
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    key_file = tmp_path / "node.json"
    if not key_file.exists():
        write_keystore(key_file, Account.create())
    command = prime_command(
        "miner", "start", "--run-id", "1", "--gpu", gpu, "--host", "127.0.0.1", "--port", str(free_port()),
        "--key-file", str(key_file), "--rpc-url", "http://127.0.0.1:9",  # nothing listens: never reached
        "--deployment", str(tmp_path / "no-deployment.json"), "--data-dir", str(tmp_path / "miner"),
    )
    env = _child_env({**miner_env(tmp_path / "home"), "PYTHONPATH": f"{fake}:{Path.cwd()}"})
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=120)


def _error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert errors, done.stderr
    return errors[-1]  # the one raised; further failures (Docker, ...) are printed before it


def test_prime_miner_start_with_gpus_and_no_backend_is_refused_in_one_sentence(tmp_path: Path) -> None:
    line = _error(_start(tmp_path, "all"))
    assert line == ("Error: GPUs 0, 1 are offered (--gpu all) but no GPU challenge backend can use them "
                    f"(torch is not installed; cupy is not installed); {FIX}, or start the miner with --gpu none.")


def test_prime_miner_start_with_gpu_none_gets_past_it(tmp_path: Path) -> None:
    line = _error(_start(tmp_path, "none"))  # fails later, at the deployment file nothing wrote
    assert "GPU challenge backend" not in line and "--gpu" not in line


def test_the_gpu_extra_installs_a_bounded_torch_and_the_readme_says_how() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[3]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [dep for dep in extras["gpu"] if dep.startswith("torch")] == ["torch>=2.4"]
    readme = (root / "README.md").read_text()
    assert "pipx install 'prime[gpu]'" in readme and "--index-url https://download.pytorch.org/whl/cu" in readme
    assert FIX in " ".join(readme.split())  # the refusal sentence, as the README quotes it
