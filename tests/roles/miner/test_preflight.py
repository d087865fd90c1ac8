"""Preflight against the real engine, a port that is really taken and a directory that is really read-only."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from prime.errors import PrimeError
from prime.roles.miner.preflight import (
    check_data_dir,
    check_port,
    nvidia_runtime_available,
    run_preflight,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listening_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write: by mode for a normal user, by a read-only mount for root."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"root cannot make a read-only mount here ({done.stderr.strip()}); mode bits do not stop root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_all_checks_pass_on_a_good_setup(docker_client: docker.DockerClient, tmp_path: Path) -> None:
    assert run_preflight(gpus_requested=False, data_dir=tmp_path / "miner", port=_free_port()) == []
    assert (tmp_path / "miner").is_dir()  # created when missing
    assert list((tmp_path / "miner").iterdir()) == []  # the write probe leaves nothing behind


def test_unreachable_engine_names_the_fix(tmp_path: Path) -> None:
    failures = run_preflight(
        gpus_requested=True, data_dir=tmp_path, port=_free_port(), docker_base_url=f"unix://{tmp_path}/no-docker.sock"
    )
    assert len(failures) == 1  # no runtime check without an engine
    assert "Docker engine is not reachable" in failures[0] and "start it" in failures[0]


def test_gpus_need_the_nvidia_runtime(docker_client: docker.DockerClient, tmp_path: Path) -> None:
    failures = run_preflight(gpus_requested=True, data_dir=tmp_path, port=_free_port())
    if nvidia_runtime_available(docker_client.info()):
        assert failures == []
    else:
        assert len(failures) == 1
        assert "NVIDIA Container Toolkit" in failures[0] and "--gpu none" in failures[0]


@pytest.mark.parametrize(
    ("info", "available"),
    [
        ({"Runtimes": {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}}, True),
        ({"Runtimes": {"runc": {}}, "DiscoveredDevices": [{"Source": "cdi", "ID": "nvidia.com/gpu=0"}]}, True),
        ({"Runtimes": {"runc": {}}, "DiscoveredDevices": [{"Source": "cdi", "ID": "vendor.com/fpga=0"}]}, False),
        ({"Runtimes": {"runc": {}}}, False),
        ({}, False),
    ],
)
def test_nvidia_runtime_detection(info: dict, available: bool) -> None:
    # local_engine=False: the answer must come from `docker info` alone, whatever is on this PATH.
    assert nvidia_runtime_available(info, local_engine=False) is available


def test_port_in_use(docker_client: docker.DockerClient, tmp_path: Path, listening_port: int) -> None:
    failures = run_preflight(gpus_requested=False, data_dir=tmp_path, port=listening_port)
    assert failures == [f"Port {listening_port} on 127.0.0.1 is already in use; stop the program that uses it or choose another port with --port."]
    with pytest.raises(PrimeError, match="already in use"):
        run_preflight(gpus_requested=False, data_dir=tmp_path, port=listening_port, raise_first=True)


@pytest.mark.parametrize(("port", "host", "words"), [(0, "127.0.0.1", "not a valid TCP port"), (8080, "192.0.2.1", "not an address of this machine")])
def test_bad_port_or_host(port: int, host: str, words: str) -> None:
    assert words in (check_port(port, host) or "")


def test_read_only_data_dir(read_only_dir: Path) -> None:
    failure = check_data_dir(read_only_dir)
    assert failure is not None and "is not writable" in failure and "--data-dir" in failure
    # A subdirectory that would have to be created there fails the same way.
    assert "is not writable" in (check_data_dir(read_only_dir / "miner") or "")


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert "is not writable" in (check_data_dir(tmp_path / "file") or "")
    assert "is not writable" in (check_data_dir(tmp_path / "file" / "sub") or "")


def test_every_failure_is_reported_at_once(read_only_dir: Path, listening_port: int, tmp_path: Path) -> None:
    failures = run_preflight(
        gpus_requested=False, data_dir=read_only_dir, port=listening_port, docker_base_url=f"unix://{tmp_path}/none.sock"
    )
    assert [f.split(" ")[1] for f in failures] == ["Docker", "data", str(listening_port)]
    assert all(f.endswith(".") and ";" in f for f in failures)
