"""What the miner's tests (and end-to-end tests that need a miner) share.

- ``discovery`` (session scope): a real discovery process on the session's anvil/deployment.
- ``create_run(chain_client, anvil, discovery_url, **requirements)``: a run owned by
  accounts[2] with accounts[3] as its master.
- ``write_keystore(path, account)``: a cheap (pbkdf2) keystore with password "devnet".
- ``miner_args(...)``: the argv of ``prime miner start`` for a node (short intervals; ``task_ports``:
  ``--task-ports``, e.g. from ``free_port_range()``).
- ``TestMaster``: a small signed-request aiohttp server that answers heartbeats with a
  desired list the test sets, and records what it got.
- ``sign_invite_body(...)``: the JSON body of POST /invite as a master sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.auth.middleware import SIGNER, signed_request_middleware
from prime.auth.signing import Domain
from prime.chain.client import RegistryClient, sign_digest
from prime.chain.types import Requirements
from prime.keys import create_keystore
from prime.web import bound_port, make_app, serve
from tests.fixtures.processes import RoleProcess, RoleProcesses, free_port, prime_command

PASSWORD = "devnet"
# A long task that exits at once on SIGTERM (a bare `sleep` as PID 1 ignores it: docker stop would wait 10 s).
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"]
BUYER_INDEX = 2
MASTER_INDEX = 3
VALIDATOR_INDEX = 1


@dataclass
class Discovery:
    process: RoleProcess
    address: str  # the key its answers are signed with

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def url(self) -> str:
        """The discovery URI a run stores on chain: the URL and the signer."""
        return f"{self.process.base_url}#{self.address}"


@pytest.fixture(scope="session")
def discovery(anvil: Any, deployment: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Discovery]:
    """One discovery process for the session (its nodes are told apart by run)."""
    port = free_port()
    data_dir = tmp_path_factory.mktemp("discovery")
    account = Account.create()
    key_file = write_keystore(data_dir.parent / f"{data_dir.name}-key.json", account)
    group = RoleProcesses(tmp_path_factory.mktemp("discovery-logs"))
    process = group.start(
        "discovery",
        prime_command(
            "discovery", "start", "--host", "127.0.0.1", "--port", str(port), "--rpc-url", anvil.rpc_url,
            "--deployment", str(deployment.path), "--data-dir", str(data_dir), "--key-file", str(key_file),
        ),
        port=port,
        env={"PRIME_HOME": str(data_dir / "home"), "PRIME_KEY_PASSWORD": PASSWORD},
    )
    try:
        yield Discovery(process, account.address)
    finally:
        group.stop_all()


async def create_run(chain_client: Any, anvil: Any, discovery_url: str, *, masters: list[str] | None = None, **requirements: Any) -> int:
    buyer = await chain_client(anvil.accounts[BUYER_INDEX])
    master = anvil.accounts[MASTER_INDEX].address
    return await buyer.create_run(Requirements(**requirements), discovery_url, masters if masters is not None else [master])


def write_keystore(path: Path, account: LocalAccount) -> Path:
    create_keystore(path, PASSWORD, private_key=account.key.hex(), kdf="pbkdf2", iterations=16)
    return path


def miner_env(home: Path) -> dict[str, str]:
    return {"PRIME_KEY_PASSWORD": PASSWORD, "PRIME_HOME": str(home)}


def miner_args(
    *,
    run_id: int,
    port: int,
    key_file: Path,
    data_dir: Path,
    anvil: Any,
    deployment: Any,
    provider_key_file: Path | None = None,
    extra: list[str] | None = None,
    task_ports: tuple[int, int] | None = None,
) -> list[str]:
    """Arguments of ``prime miner start`` (after "start") for a loopback test node; ``task_ports``
    (first, last): ``--task-ports`` (the node may host members of group tasks; see ``free_port_range``)."""
    args = [
        "--run-id", str(run_id), "--gpu", "none", "--host", "127.0.0.1", "--port", str(port),
        "--public-ip", "127.0.0.1", "--key-file", str(key_file), "--rpc-url", anvil.rpc_url,
        "--deployment", str(deployment.path), "--data-dir", str(data_dir), "--task-network", "none",
        "--chain-poll-interval", "0.5", "--announce-interval", "5",
    ]
    if provider_key_file is not None:
        args += ["--provider-key-file", str(provider_key_file)]
    if task_ports is not None:
        args += ["--task-ports", f"{task_ports[0]}-{task_ports[1]}"]
    return args + (extra or [])


def free_port_range(count: int = 10, *, tries: int = 200) -> tuple[int, int]:
    """(first, last): ``count`` consecutive TCP ports free on this machine just now (for ``--task-ports``;
    several miners of one test each take their own range). Never a fixed range: suites share the host."""
    import random
    import socket

    for _ in range(tries):
        first = random.randint(10000, 32000 - count)  # below Linux's ephemeral ports (32768-60999): no client socket takes one
        socks: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("0.0.0.0", port))
            return first, first + count - 1
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free TCP ports found")


def miner_command(**kwargs: Any) -> list[str]:
    return prime_command("miner", "start", *miner_args(**kwargs))


async def sign_invite_body(
    registry: RegistryClient, master: LocalAccount, run_id: int, node: str, master_url: str, *, expiry: int | None = None
) -> dict[str, Any]:
    """The body a master POSTs to /invite (expiry: 10 minutes from now by default)."""
    expiry = int(time.time()) + 600 if expiry is None else expiry
    signature = sign_digest(master, registry.invite_digest(run_id, node, expiry))
    return {"run_id": run_id, "master_url": master_url, "expiry": expiry, "signature": "0x" + signature.hex()}


@dataclass
class TestMaster:
    """A stand-in master: verifies request signatures, records heartbeats, answers ``desired``."""

    __test__ = False  # not a test class, despite the name

    account: Any = None  # the master key it answers as (the one that invited the node)
    domain: Domain | None = None
    interval_s: float = 0.3
    desired: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> TestMaster:
        """Listen on ``port`` (0: any free one; a restarted master passes its old port)."""
        assert self.account is not None and self.domain is not None, "TestMaster(account=..., domain=...)"
        app = make_app(name="test-master", middlewares=[signed_request_middleware(self.account, self.domain)])

        async def heartbeat(request: web.Request) -> web.Response:
            self.heartbeats.append((request[SIGNER], await request.json()))
            return web.json_response({"interval_s": self.interval_s, "desired": self.desired})

        app.router.add_post("/heartbeat", heartbeat)
        self.runner = await serve(app, host="127.0.0.1", port=port)
        self.port = bound_port(self.runner)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def reports(self, task_id: str) -> list[dict[str, Any]]:
        """Every report about ``task_id`` in the heartbeats so far, oldest first."""
        return [t for _, body in self.heartbeats for t in body.get("tasks", []) if t.get("id") == task_id]

    async def wait_for(self, predicate: Any, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"the test master did not see what it waited for; heartbeats: {self.heartbeats[-3:]}")
            await asyncio.sleep(0.1)


def desired_entry(task_id: str, image: str, command: list[str], *, replica: int = 0, attempt: int = 0, persistent: bool = False) -> dict[str, Any]:
    """One entry of a heartbeat answer's desired list (the master's wire shape)."""
    return {
        "id": task_id, "replica": replica, "attempt": attempt, "gpu_indices": [],
        "spec": {"image": image, "command": command, "env": {}, "gpus": 0, "replicas": 1, "persistent": persistent},
    }


async def wait_until(predicate: Any, timeout_s: float = 30.0, interval_s: float = 0.2, what: str = "condition") -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval_s)


def node_options(anvil: Any, deployment: Any, run_id: int, data_dir: Path, **overrides: Any) -> Any:
    """MinerOptions of an in-process test node (loopback, no GPUs, no task network, fast polling)."""
    from prime.roles.miner.node import MinerOptions

    values: dict[str, Any] = {
        "run_id": run_id, "rpc_url": anvil.rpc_url, "deployment": deployment.path, "data_dir": data_dir,
        "host": "127.0.0.1", "port": free_port(), "gpu": "none", "public_ip": "127.0.0.1",
        "task_network": "none", "chain_poll_interval_s": 0.5, "announce_interval_s": 5.0,
    }
    values.update(overrides)
    return MinerOptions(**values)


@contextlib.asynccontextmanager
async def running_node(
    anvil: Any, deployment: Any, run_id: int, node: LocalAccount, data_dir: Path, *, provider: LocalAccount | None = None,
    prover: Any = None, **overrides: Any,
) -> AsyncIterator[Any]:
    """A real miner (MinerNode) in this event loop: registered, serving, looping; closed afterwards.

    Its console output is kept in ``node.console.file`` (a StringIO).
    """
    from rich.console import Console

    from prime.roles.miner.node import MinerNode

    miner = MinerNode(
        node_options(anvil, deployment, run_id, data_dir, **overrides), node, provider,
        prover=prover, console=Console(file=io.StringIO(), width=200, highlight=False),
    )
    try:
        await miner.prepare()
        await miner.start()
        yield miner
    finally:
        await miner.close()


class MemoryExecutor:
    """An executor without Docker: containers are ``ReplicaStatus`` entries in a dict.

    It answers what the converger, the heartbeat and the tasks routes ask of an executor
    (snapshot, status, start, resume, restart, stop, logs, task_data_dir); a test moves a
    container on with ``finish`` and reads what was asked in ``calls``.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path("/nonexistent")
        self.containers: dict[tuple[str, int], Any] = {}
        self.calls: list[tuple[str, tuple[str, int]]] = []
        self._ids = 0

    def _new_id(self) -> str:
        self._ids += 1
        return f"mem-{self._ids:04d}"

    async def snapshot(self) -> list[Any]:
        return sorted(self.containers.values(), key=lambda s: s.key)

    async def status(self, task_id: str, replica: int = 0) -> Any:
        return self.containers.get((task_id, replica))

    async def start(self, placement: Any, on_progress: Any = None, *, replace: bool = False) -> Any:
        from prime.protocol.tasks import ReplicaState
        from prime.roles.miner.containers import gpus_label
        from prime.roles.miner.core import ReplicaStatus

        self.calls.append(("start", placement.key))
        status = ReplicaStatus(
            placement.task_id, placement.replica, ReplicaState.RUNNING, container_id=self._new_id(),
            spec_hash=placement.spec_hash(), gpus=gpus_label(placement.gpus), restart=placement.restart,
        )
        self.containers[placement.key] = status
        return status

    async def _start_existing(self, verb: str, key: tuple[str, int], container_id: str) -> Any:
        from dataclasses import replace

        from prime.protocol.tasks import ReplicaState

        self.calls.append((verb, key))
        status = self.containers.get(key)
        if status is None or status.container_id != container_id:
            return status
        status = self.containers[key] = replace(status, state=ReplicaState.RUNNING, exit_code=None, reason=None)
        return status

    async def resume(self, key: tuple[str, int], container_id: str) -> Any:
        return await self._start_existing("resume", key, container_id)

    async def restart(self, key: tuple[str, int], container_id: str) -> Any:
        return await self._start_existing("restart", key, container_id)

    async def stop(self, task_id: str, replica: int | None = None) -> bool:
        keys = [k for k in self.containers if k[0] == task_id and (replica is None or k[1] == replica)]
        for key in keys:
            self.calls.append(("stop", key))
            del self.containers[key]
        return bool(keys)

    def finish(self, task_id: str, exit_code: int, replica: int = 0) -> None:
        """The container exits (0: Completed, else Failed with Docker's reason)."""
        from dataclasses import replace

        from prime.protocol.tasks import ReplicaState

        key = (task_id, replica)
        state = ReplicaState.COMPLETED if exit_code == 0 else ReplicaState.FAILED
        reason = None if exit_code == 0 else f"exited with code {exit_code}"
        self.containers[key] = replace(self.containers[key], state=state, exit_code=exit_code, reason=reason)

    def started(self, task_id: str) -> int:
        return sum(1 for verb, key in self.calls if verb == "start" and key[0] == task_id)

    def task_data_dir(self, task_id: str, replica: int = 0) -> Path:
        return self.root / "tasks" / task_id / f"r{replica}" / "data"

    async def logs(self, task_id: str, *, replica: int = 0, follow: bool = False, tail: int | None = None,
                   attempt: int | None = None, skip: int = 0) -> AsyncIterator[Any]:
        if False:  # an async generator with no lines
            yield None


class MemoryMaster:
    """A master as the heartbeat loop's client sees it (``request``), in memory: records each
    heartbeat body and answers the desired list the test sets."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.desired: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.down = False

    async def request(self, method: str, url: str, json: Any = None, **_: Any) -> Any:
        assert (method, url.rsplit("/", 1)[-1]) == ("POST", "heartbeat"), (method, url)
        if self.down:
            raise ConnectionError("the master is down")
        self.heartbeats.append(json)
        return {"interval_s": self.interval_s, "desired": list(self.desired)}

    def reports(self, task_id: str) -> list[dict[str, Any]]:
        return [t for body in self.heartbeats for t in body.get("tasks", []) if t.get("id") == task_id]

    def now(self, task_id: str) -> dict[str, Any] | None:
        """``task_id``'s report in the latest heartbeat (None: not reported there)."""
        if not self.heartbeats:
            return None
        return next((t for t in self.heartbeats[-1].get("tasks", []) if t.get("id") == task_id), None)
