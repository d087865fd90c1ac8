"""The built wheel works without the checkout: installed into a fresh venv in a directory outside it.

The wheel is built from a copy of the sources (so the checkout gets no build/ or egg-info), the
venv takes its dependencies from this interpreter's site-packages (--system-site-packages; only
the wheel itself is installed, --no-deps), and every command runs with a working directory and
HOME outside the checkout, so neither the ABI (packaged in the wheel) nor anvil can be found by
walking up to contracts/: anvil comes from PRIME_ANVIL_BIN, as for a user who installed it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from prime.chain.anvil import find_anvil
from tests.fixtures.processes import free_port

CHECKOUT = Path(__file__).resolve().parents[1]
# pip's messages when the build backend (setuptools from the package index) cannot be fetched.
OFFLINE = ("Could not find a version that satisfies", "No matching distribution", "Failed to establish a new connection",
           "NewConnectionError", "Temporary failure in name resolution", "Network is unreachable")


def _run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, source / name)
    shutil.copytree(CHECKOUT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    dist = work / "dist"
    try:
        import build  # noqa: F401 - the build frontend, when installed

        command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)]
    except ImportError:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(source)]
    built = _run(command, cwd=work, env=dict(os.environ))
    if built.returncode != 0 and any(marker in built.stdout + built.stderr for marker in OFFLINE):
        pytest.skip(f"the wheel's build backend (setuptools) cannot be fetched here: {(built.stderr or built.stdout).strip()[-200:]}")
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = dist.glob("prime-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", str(root)], cwd=root.parent, env=dict(os.environ))
    if made.returncode != 0:
        pytest.skip(f"python -m venv is not usable here: {(made.stderr or made.stdout).strip()[-200:]}")
    python = root / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)], cwd=root.parent, env=dict(os.environ))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return root


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PRIME_HOME=str(home / ".prime"), COLUMNS="200", **extra)
    return env


def test_the_wheel_packages_the_contract_artifact(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "prime/chain/artifacts/PrimeRegistry.json" in names
    assert not any(name.startswith(("tests/", "contracts/")) for name in names), names


def test_installed_wheel_runs_help_probe_and_a_devnet(venv: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    prime = str(venv / "bin" / "prime")
    env = _env(outside, PRIME_ANVIL_BIN=str(find_anvil()))

    where = _run([str(venv / "bin" / "python"), "-c", "import prime; print(prime.__file__)"], cwd=outside, env=env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), f"prime imported from {where.stdout.strip()}, not the venv"

    helped = _run([prime, "--help"], cwd=outside, env=env)
    assert helped.returncode == 0, helped.stderr
    assert "miner" in helped.stdout and "devnet" in helped.stdout

    probed = _run([prime, "miner", "probe", "--json", "--data-dir", str(outside / "miner")], cwd=outside, env=env)
    assert probed.returncode == 0, probed.stderr
    assert json.loads(probed.stdout)["cpu_cores"] >= 1

    state = outside / "devnet"
    ports = [arg for name in ("anvil", "discovery", "validator", "master", "miner") for arg in (f"--{name}-port", str(free_port()))]
    try:
        up = _run([prime, "devnet", "up", "--state-dir", str(state), "--json", *ports], cwd=outside, env=env, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        info = json.loads(up.stdout)
        assert info["run_id"] >= 1 and info["registry"].startswith("0x")
        chain = _run([prime, "chain", "info", "--json", "--deployment", info["deployment"], "--rpc-url", info["rpc_url"]], cwd=outside, env=env)
        assert chain.returncode == 0, chain.stderr
        assert json.loads(chain.stdout)["run_count"] == info["run_id"]
    finally:
        down = _run([prime, "devnet", "down", "--state-dir", str(state)], cwd=outside, env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "is down" in down.stdout


def test_without_anvil_the_installed_wheel_says_how_to_install_it(venv: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    env = _env(tmp_path, PATH=f"{bare}:/usr/bin:/bin")  # no anvil on PATH, no PRIME_ANVIL_BIN, no checkout
    result = _run([str(venv / "bin" / "prime"), "chain", "anvil", "--port", str(free_port())], cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "npm install -g @foundry-rs/anvil" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
