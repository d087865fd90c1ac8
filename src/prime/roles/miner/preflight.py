"""Checks before the miner starts, each failure one sentence that names the fix.

Operators of systems like this one lost hours to a Docker engine that was not
running, GPUs requested without the NVIDIA container runtime, an unwritable data
directory and a port already taken; the miner says so up front instead. GPUs offered
without a GPU challenge backend (torch or cupy with CUDA) would fail the validator's
GPU-sized challenge on numpy after the stake is paid; ``challenge_prover`` refuses that
first, and builds the prover on exactly the offered GPUs otherwise.

``--task-ports FIRST-LAST`` (the ports this node's group members may listen on, with host
networking) is parsed by ``parse_task_ports`` and checked free by ``check_task_ports``; that
check runs once the miner knows its instance (after the chain is read, before any stake), so
the ports its own adopted, still running members hold (their labels say which) are not taken
for another program's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors

from prime.errors import ConfigError, PrimeError
from prime.protocol.groups import MEMBER_PORTS

GPU_BACKEND_FIX = "install the GPU backend: pipx install 'prime[gpu]' (or pip install 'prime[gpu]')"


def docker_client_or_failure(base_url: str | None = None, timeout_s: int = 10) -> tuple[docker.DockerClient | None, str | None]:
    """A client of a reachable engine, or None and the sentence that says how to fix it."""
    where = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    client = None
    try:
        client = docker.DockerClient(base_url=base_url, timeout=timeout_s) if base_url else docker.from_env(timeout=timeout_s)
        client.ping()
        return client, None
    except Exception as exc:  # DockerException, ConnectionError, PermissionError...
        if client is not None:  # made, but the engine did not answer: nothing of it is kept
            client.close()
        text = str(exc)
        if "Permission denied" in text or isinstance(exc, PermissionError):
            return None, (
                f"The Docker engine at {where} refused this user (permission denied); add the user to the "
                "'docker' group (sudo usermod -aG docker $USER, then log in again) or run the miner as root."
            )
        return None, (
            f"The Docker engine is not reachable at {where}; start it (e.g. sudo systemctl start docker) "
            "or point DOCKER_HOST at a running engine."
        )


def nvidia_runtime_available(info: dict[str, Any], *, local_engine: bool = True) -> bool:
    """Can this engine give containers NVIDIA GPUs? (pure; ``info`` is ``docker info``'s data)

    Any of: an "nvidia" runtime registered with Docker; NVIDIA devices discovered
    through CDI; or, for a local engine, the NVIDIA container toolkit's hook on
    PATH, which is what Docker's built-in ``--gpus`` support calls.
    """
    runtimes = info.get("Runtimes") or {}
    if any("nvidia" in name.lower() for name in runtimes):
        return True
    for device in info.get("DiscoveredDevices") or []:
        if str(device.get("ID", "")).startswith("nvidia.com/gpu"):
            return True
    return bool(local_engine and shutil.which("nvidia-container-runtime-hook"))


def check_nvidia_runtime(client: docker.DockerClient) -> str | None:
    try:
        info = client.info()
    except Exception as exc:
        return f"Docker did not answer `docker info` ({exc}); check that the engine is healthy, then try again."
    base_url = str(getattr(client.api, "base_url", ""))
    local = "localhost" in base_url or "unix" in base_url or base_url.startswith("http+docker://")
    if nvidia_runtime_available(info, local_engine=local):
        return None
    return (
        "GPUs were requested but Docker has no NVIDIA container runtime; install the NVIDIA Container Toolkit "
        "and run `sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`, "
        "or start the miner with --gpu none."
    )


def check_data_dir(data_dir: str | Path) -> str | None:
    """The data directory exists (created if missing) and a file can be written in it."""
    path = Path(data_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
        with tempfile.NamedTemporaryFile(dir=path, prefix=".prime-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return (
            f"The data directory {path} is not writable ({reason}); choose another one with --data-dir "
            "(or PRIME_DATA_DIR) or fix its permissions."
        )
    return None


def check_port(port: int, host: str = "127.0.0.1") -> str | None:
    """The port can be bound on ``host`` (as aiohttp will: with SO_REUSEADDR)."""
    if not 0 < int(port) < 65536:
        return f"Port {port} is not a valid TCP port; choose one between 1 and 65535 with --port."
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"The listen address {host} could not be resolved ({exc.strerror}); give an IP address of this machine with --host."
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"Port {port} on {host} is already in use; stop the program that uses it or choose another port with --port."
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"The listen address {host} is not an address of this machine; choose one with --host (e.g. 0.0.0.0 for all)."
            if exc.errno == errno.EACCES:
                return f"Port {port} needs privileges this user lacks; choose a port above 1023 with --port."
            return f"Port {port} on {host} cannot be used ({exc.strerror}); choose another port with --port."
    return None


MIN_TASK_PORTS = MEMBER_PORTS  # one member's ports at least
MAX_TASK_PORTS = 1024
_RANGE_RE = re.compile(r"\s*(\d{1,6})\s*-\s*(\d{1,6})\s*\Z", re.ASCII)


def parse_task_ports(text: str | None) -> tuple[int, int] | None:
    """``--task-ports FIRST-LAST`` as (first, last); None for none. ``ConfigError`` (one sentence) otherwise."""
    if text is None or not text.strip():
        return None
    match = _RANGE_RE.match(text)
    if match is None:
        raise ConfigError(f"--task-ports {text!r} is not a port range; write FIRST-LAST, such as 29500-29599.")
    first, last = int(match[1]), int(match[2])
    if not 1 <= first <= last <= 65535:
        raise ConfigError(f"--task-ports {text!r} is not a range of TCP ports; give 1 <= FIRST <= LAST <= 65535.")
    count = last - first + 1
    if count < MIN_TASK_PORTS:
        raise ConfigError(f"--task-ports {text!r} holds {count} port(s); a group member needs {MIN_TASK_PORTS}, so give at least that many.")
    if count > MAX_TASK_PORTS:
        raise ConfigError(f"--task-ports {text!r} holds {count} ports; give at most {MAX_TASK_PORTS}.")
    return first, last


def _bind_addresses(host: str) -> list[tuple[int, Any]]:
    """Where a task port must be free: every IPv4 address, and the miner's host when it is a specific one."""
    found: list[tuple[int, Any]] = [(socket.AF_INET, "0.0.0.0")]
    if host not in ("", "0.0.0.0"):
        with contextlib.suppress(OSError):  # an unresolvable --host is check_port's sentence
            family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            found.append((family, address[0]))
    return found


def check_task_ports(task_ports: tuple[int, int], host: str = "127.0.0.1", port: int | None = None,
                     held: Collection[int] = ()) -> str | None:
    """Every port of the range can be bound now (TCP, closed at once), but those in ``held`` (this
    miner's own running members'); the miner's own ``port`` lies outside it. With SO_REUSEADDR, as
    a member's server binds: a listener or another bound socket is refused, a connection of a
    finished member still in TIME_WAIT is not (it would hold a restarted miner back a minute)."""
    first, last = task_ports
    span = f"--task-ports {first}-{last}"
    if port is not None and first <= port <= last:
        return f"The miner's own --port {port} lies inside {span}; choose a port or a range that do not overlap."
    addresses = _bind_addresses(host)
    for candidate in range(first, last + 1):
        if candidate in held:
            continue
        for family, address in addresses:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((address, candidate))
                except OSError as exc:
                    if exc.errno == errno.EACCES:
                        return f"Port {candidate} of {span} needs privileges this user lacks; choose a range above 1023."
                    if exc.errno == errno.EADDRNOTAVAIL:
                        continue  # the host address is not this machine's: check_port says so
                    return f"Port {candidate} of {span} is in use; free it or choose another range."
    return None


async def task_ports_preflight(executor: Any, task_ports: tuple[int, int] | None, host: str, port: int) -> str | None:
    """``check_task_ports`` for a starting miner (None: no range, nothing to check); the executor
    (``held_ports``, if it has one) names the ports its own running members hold."""
    if task_ports is None:
        return None
    held_ports = getattr(executor, "held_ports", None)
    held: set[int] = set(await held_ports()) if held_ports is not None else set()
    return await asyncio.to_thread(check_task_ports, task_ports, host, port, held)


def challenge_prover(gpus: Sequence[int], info: Any, selection: str = "all",
                     find_backend: Callable[..., Any] | None = None) -> tuple[Any | None, str | None]:
    """The prover that answers the validators' challenges, or None and the sentence that says how to fix it.

    No GPUs offered (``--gpu none``, or none found): numpy on the CPU, as always. GPUs
    offered: torch (else cupy) on exactly those GPUs (``find_backend``, by default
    prime.challenge.devices.gpu_backend, takes the NVML indices and the probe's GPUs);
    none usable is refused, as is a selection CUDA cannot be matched to.
    """
    from prime.challenge.devices import NoGpuBackend, gpu_backend
    from prime.challenge.prover import MatmulProver, NumpyBackend

    if not gpus:
        return MatmulProver(NumpyBackend()), None
    try:
        backend = (find_backend or gpu_backend)(list(gpus), list(info.gpus))
    except NoGpuBackend as exc:
        listed = ", ".join(map(str, gpus))
        offered = f"GPU{'s' if len(gpus) > 1 else ''} {listed} {'are' if len(gpus) > 1 else 'is'} offered (--gpu {selection})"
        return None, (f"{offered} but no GPU challenge backend can use {'them' if len(gpus) > 1 else 'it'} "
                      f"({exc.message.rstrip('.')}); {GPU_BACKEND_FIX}, or start the miner with --gpu none.")
    except PrimeError as exc:
        return None, exc.message
    warm_up = getattr(backend, "warm_up", None)
    if callable(warm_up):  # compile the fused generator before any validator times a challenge
        warm_up()
    return MatmulProver(backend), None


def run_preflight(
    *,
    gpus_requested: bool,
    data_dir: str | Path,
    port: int,
    host: str = "127.0.0.1",
    docker_base_url: str | None = None,
    raise_first: bool = False,
) -> list[str]:
    """Run every check; the failures, one sentence each (empty when all is well).

    With ``raise_first`` the first failure is raised as a ``PrimeError`` instead.
    """
    failures: list[str] = []
    client, failure = docker_client_or_failure(docker_base_url)
    if failure:
        failures.append(failure)
    elif gpus_requested and client is not None:
        runtime_failure = check_nvidia_runtime(client)
        if runtime_failure:
            failures.append(runtime_failure)
    if client is not None:
        client.close()
    for check in (check_data_dir(data_dir), check_port(port, host)):
        if check:
            failures.append(check)
    if raise_first and failures:
        raise PrimeError(failures[0])
    return failures
