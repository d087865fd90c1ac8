"""What the end-to-end tests share: running the ``prime`` CLI as a real subprocess, polling.

Every CLI call is a fresh ``python -m prime.cli …`` process with a clean environment (no
PRIME_* from the developer's shell) plus what the test passes (key passwords, PRIME_HOME).
A failed call raises ``CliFailed`` with the command, exit code and both output streams, so a
broken phase says exactly which command failed and what it printed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

# A long task that exits at once on SIGTERM (a bare `sleep` as PID 1 ignores it: docker stop would wait 10 s).
SLEEPER_SCRIPT = "trap 'exit 0' TERM; echo sleeper started; sleep 300 & wait"


class CliFailed(AssertionError):
    """A ``prime`` command exited non-zero (or did not print what the test needed)."""


@dataclass(frozen=True)
class CliResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise CliFailed(f"`prime {' '.join(self.argv)}` printed no JSON:\n{self.describe()}") from None

    def describe(self) -> str:
        return f"exit code {self.returncode}\n--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without PRIME_* (a developer's settings must not change a test), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_") or k == "PRIME_DEBUG"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Prime:
    """Runs ``prime`` subcommands as subprocesses with one fixed environment."""

    def __init__(self, env: Mapping[str, str], *, cwd: str | Path | None = None, timeout_s: float = 60.0) -> None:
        self.env = clean_env(env)
        self.cwd = str(cwd) if cwd is not None else None
        self.timeout_s = timeout_s
        self.history: list[CliResult] = []

    async def run(self, *args: Any, check: bool = True, env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> CliResult:
        argv = [str(a) for a in args]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "prime.cli", *argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**self.env, **(env or {})}, cwd=self.cwd,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout_s or self.timeout_s)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            result = CliResult(argv, -9, out.decode(errors="replace"), err.decode(errors="replace"))
            raise CliFailed(f"`prime {' '.join(argv)}` did not finish in {timeout_s or self.timeout_s} s:\n{result.describe()}") from None
        result = CliResult(argv, proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
        self.history.append(result)
        if check and result.returncode != 0:
            raise CliFailed(f"`prime {' '.join(argv)}` failed:\n{result.describe()}")
        return result

    async def json(self, *args: Any, **kwargs: Any) -> Any:
        return (await self.run(*args, **kwargs)).json()


async def wait_until(predicate: Any, *, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Poll a sync or async predicate until it returns something truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        except (AssertionError, OSError, ValueError) as exc:  # a peer not up yet, a half-written answer
            last_error = exc
        if time.monotonic() > deadline:
            extra = f" (last error: {last_error})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}{extra}")
        await asyncio.sleep(interval_s)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def task_containers(client: docker.DockerClient, task_id: str, *, all_states: bool = True) -> list[dict[str, Any]]:
    """Containers labelled with this task id, as `docker ps [-a] --filter label=prime.task_id=…` lists them
    (dicts with Id, Labels, State; no per-container inspect, so one removed meanwhile cannot raise)."""
    return client.api.containers(all=all_states, filters={"label": f"prime.task_id={task_id}"})


def node_containers(client: docker.DockerClient, node: str) -> list[dict[str, Any]]:
    """Containers labelled with this node (``docker ps -a``), in either spelling of the address."""
    found: dict[str, dict[str, Any]] = {}
    for spelling in {node, node.lower()}:
        for container in client.api.containers(all=True, filters={"label": f"prime.node={spelling}"}):
            found[container["Id"]] = container
    return list(found.values())


def remove_containers(client: docker.DockerClient, containers: list[dict[str, Any]]) -> None:
    for container in containers:
        try:
            client.api.remove_container(container["Id"], force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:  # its miner is removing it right now
            if exc.status_code != 409:
                raise


def only(items: Sequence[Any], what: str) -> Any:
    assert len(items) == 1, f"expected exactly one {what}, got {len(items)}: {items}"
    return items[0]


class MinerProcess:
    """One real `prime miner start` process with its own node and provider keys and data directory
    (``task_ports``: its --task-ports, to host group members), in a run of a ``World``."""

    def __init__(self, name: str, world: Any, anvil: Any, deployment: Any, processes: Any, root: Path,
                 task_ports: tuple[int, int] | None = None) -> None:
        from eth_account import Account

        from tests.fixtures.processes import free_port
        from tests.support.miner_env import miner_command, miner_env, write_keystore

        self.node, self.provider = Account.create(), Account.create()
        anvil.set_balance(self.provider.address, 10 * 10**18)
        root.mkdir(parents=True)
        self.data_dir = root / "data"
        port = free_port()
        command = miner_command(
            run_id=world.run_id, port=port, key_file=write_keystore(root / "node.json", self.node),
            data_dir=self.data_dir, anvil=anvil, deployment=deployment,
            provider_key_file=write_keystore(root / "provider.json", self.provider), task_ports=task_ports,
        )
        self.process = processes.create(name, command, port=port, env=miner_env(root / "home"))

    @property
    def address(self) -> str:
        return str(self.node.address)

    def replica_dir(self, task_id: str, replica: int = 0) -> Path:
        return self.data_dir / "tasks" / task_id / f"r{replica}" / "data"
