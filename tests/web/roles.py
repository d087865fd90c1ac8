"""Each role's real aiohttp app, built by the role's own build function and served on 127.0.0.1.

Real: the apps, their routes, guards and signature checks, the SQLite stores, the
challenge prover (numpy), the master's service and log merger (reading from the real
miner app), the miner's invite handler (real signatures and ack). In place of what is not
cheap: permission checks on chain (a stub, as tests/roles/discovery/test_app.py does), the
chain calls of /invite, and the Docker side of the miner's executor (real TaskStatus and
LogLine records, no containers). The validator runs against the session's anvil.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_account import Account

from prime.auth.signing import sign_headers
from tests.support.signing import CHAIN_ID, DOMAIN, REGISTRY, signed_service

NODE = Account.create()
MASTER = Account.create()
OWNER = Account.create()
VALIDATOR = Account.create()
STRANGER = Account.create()
DISCOVERY = Account.create()
RUN = 7
# Whose key each served role answers with (the audience of the requests sent to it).
ROLE_KEYS = {"discovery": DISCOVERY, "miner": NODE, "master": MASTER, "validator": VALIDATOR}
__all__ = ["CHAIN_ID", "DOMAIN", "REGISTRY"]
JSON = "application/json"
NDJSON = "application/x-ndjson"


class StubPermissions:
    """Who is who on chain: NODE is a member of RUN, MASTER masters it, OWNER owns it, VALIDATOR validates."""

    async def is_validator(self, addr: str) -> bool:
        return addr == VALIDATOR.address

    async def is_master(self, run_id: int, addr: str) -> bool:
        return run_id == RUN and addr == MASTER.address

    async def is_run_owner(self, run_id: int, addr: str) -> bool:
        return run_id == RUN and addr == OWNER.address

    async def is_registered_node(self, run_id: int, addr: str) -> bool:
        return run_id == RUN and addr == NODE.address

    async def is_active_node(self, run_id: int, addr: str) -> bool:
        return run_id == RUN and addr == NODE.address

    async def node_run_id(self, addr: str) -> int | None:
        return RUN if addr == NODE.address else None


@dataclass
class Answer:
    status: int
    media: str
    body: Any  # parsed JSON, a list of NDJSON lines, or bytes
    raw: bytes


@dataclass
class Served:
    """A served app and its own /openapi.json; ``seen`` records which documented answers were checked."""

    role: str
    server: TestServer
    doc: dict[str, Any] = field(default_factory=dict)
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def address(self) -> str:
        """The key the served role signs as: requests to it are addressed to this."""
        return str(ROLE_KEYS[self.role].address)


async def serve_app(role: str, app: web.Application) -> Served:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    served = Served(role, server)
    answer = await request(served, None, "GET", "/openapi.json")
    assert answer.status == 200 and answer.media == JSON
    served.doc = answer.body
    return served


async def request(served: Served, account: Any, method: str, path_qs: str, body: Any = None) -> Answer:
    """One request, signed by ``account`` (None: unsigned), its answer parsed by its content type."""
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": JSON} if data else {}
    if account is not None:
        headers.update(sign_headers(account, method, path_qs, data, audience=served.address, domain=DOMAIN))
    async with aiohttp.ClientSession() as session:
        async with session.request(method, served.url + path_qs, data=data, headers=headers) as resp:
            raw = await resp.read()
            media = resp.content_type
    parsed: Any = raw
    if media == JSON:
        parsed = json.loads(raw)
    elif media == NDJSON:
        parsed = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return Answer(resp.status, media, parsed, raw)


# --- the miner's Docker side, without Docker ------------------------------------------------------


class ContainerlessExecutor:
    """The executor as TasksApi and the Converger use it, without containers; its records are
    the miner's own types (so their JSON is what a real executor's would be)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: dict[tuple[str, int], Any] = {}

    def add(self, task_id: str, replica: int = 0) -> None:
        try:
            from prime.roles.miner.core import ReplicaStatus as Status
        except ImportError:  # before the miner core
            from prime.roles.miner.executor import TaskStatus as Status  # type: ignore[no-redef]
        from prime.protocol.tasks import ReplicaState

        self.running[(task_id, replica)] = Status(
            task_id=task_id, replica=replica, state=ReplicaState.RUNNING, container_id="c" * 12, spec_hash="0" * 16, gpus="")

    async def start(self, placement: Any, on_progress: Any = None, *, replace: bool = False) -> None:
        self.add(placement.task_id, placement.replica)

    ensure_running = start

    async def status(self, task_id: str, replica: int = 0) -> Any:
        return self.running.get((task_id, replica))

    async def snapshot(self) -> list[Any]:
        return list(self.running.values())

    list_states = snapshot

    async def stop(self, task_id: str, replica: int | None = None) -> int:
        keys = [k for k in self.running if k[0] == task_id and replica in (None, k[1])]
        for key in keys:
            del self.running[key]
        return len(keys)

    def task_data_dir(self, task_id: str, replica: int = 0) -> Path:
        return self.root / task_id

    async def logs(self, task_id: str, *, replica: int = 0, follow: bool = False, tail: int | None = None,
                   attempt: int | None = None, skip: int = 0) -> AsyncIterator[Any]:
        from prime.roles.miner.executor import LogLine

        for i, stream in enumerate(("stdout", "stderr", "stdout")):
            if i >= skip:
                yield LogLine(stream, f"line {i} of {task_id}", f"2026-01-01T00:00:0{i}.000000000Z")


def write_data(root: Path, task_id: str, name: str, payload: bytes) -> str:
    path = root / task_id / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return hashlib.sha256(payload).hexdigest()


# --- building each role's app ------------------------------------------------------------------


def discovery_app(tmp: Path) -> tuple[web.Application, Any]:
    from prime.roles.discovery.app import build_app
    from prime.roles.discovery.store import DiscoveryStore

    store = DiscoveryStore.open(tmp / "discovery")
    return build_app(store, StubPermissions(), signed_service(DISCOVERY)), store.close


def miner_app(tmp: Path) -> tuple[web.Application, ContainerlessExecutor, Any]:
    from prime.chain.types import NodeStatus
    from prime.challenge.prover import MatmulProver
    from prime.challenge.service import ChallengeService
    from prime.roles.miner.app import build_miner_app
    from prime.roles.miner.heartbeat import Converger
    from prime.roles.miner.invite import InviteHandler
    from prime.roles.miner.state import MinerState, StateFile
    from prime.roles.miner.tasks_api import TasksApi

    class Chain:  # the registry as /invite asks it: MASTER masters RUN, the node is already active in it
        chain_id = CHAIN_ID
        address = REGISTRY

        async def is_master(self, run_id: int, addr: str) -> bool:
            return run_id == RUN and addr == MASTER.address

        async def get_node(self, node: Any) -> Any:
            return SimpleNamespace(node=NODE.address, status=NodeStatus.ACTIVE, run_id=RUN)

    (tmp / "miner").mkdir(parents=True, exist_ok=True)
    executor = ContainerlessExecutor(tmp / "miner" / "tasks")
    converger = Converger(executor, [0, 1])
    state, state_file = MinerState(node=NODE.address, run_id=RUN), StateFile(tmp / "miner")
    if "store" in inspect.signature(InviteHandler).parameters:  # the miner's one state store
        from prime.roles.miner.state import MinerStore

        saving: dict[str, Any] = {"store": MinerStore(state_file, state)}
    else:
        saving = {"state": state, "state_file": state_file}
    invite = InviteHandler(node_account=NODE, registry=Chain(), provider_registry=None, run_id=RUN, **saving)
    verdicts: list[Any] = []
    app = build_miner_app(signing=signed_service(NODE), permissions=StubPermissions(), run_id=RUN, challenge=ChallengeService(MatmulProver()),
                          invite=invite, tasks=TasksApi(executor, converger), on_verdict=verdicts.append)
    return app, executor, converger


def invite_body(expiry: int) -> dict[str, Any]:
    from prime.chain.client import invite_digest, sign_digest

    signature = sign_digest(MASTER, invite_digest(CHAIN_ID, REGISTRY, RUN, NODE.address, expiry))
    return {"run_id": RUN, "master_url": "http://127.0.0.1:9/", "expiry": expiry, "signature": "0x" + signature.hex()}


class FixedLocator:
    """Where the master finds a node: the served miner app."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def url_for(self, node: str) -> str:
        return self.url

    async def lookup(self, node: str) -> str:
        return self.url


class QuietEffects:
    """The master's effects on the world, in memory: NODE is an active member on chain; pushes go nowhere."""

    def __init__(self) -> None:
        self.pushed: list[Any] = []

    async def chain_member(self, node: str) -> Any:
        from prime.chain.types import Specs

        return Specs(2, "H100", 81920, 16, 65536, 100) if node == NODE.address else None

    async def push_start(self, node: str, desired: Any) -> None:
        self.pushed.append((node, desired))

    async def push_stop(self, node: str, task_id: str) -> None:
        self.pushed.append((node, task_id))

    async def send_invite(self, ins: Any) -> Any:
        from prime.roles.master.state import InviteFailed

        return InviteFailed(ins.node, time.time(), "not in this test", ins.expiry)

    async def sync_storage(self, ins: Any) -> Any:
        from prime.roles.master.state import SyncFailed

        return SyncFailed(ins.node, ins.task_id, ins.replica, ins.final, time.time(), "not in this test")


async def close_all(closers: list[Any]) -> None:
    """Close what a builder below handed back, in order (some closers are coroutines)."""
    for close in closers:
        result = close()
        if inspect.isawaitable(result):
            await result


def master_app(tmp: Path, miner_url: str) -> tuple[web.Application, Any, list[Any]]:
    from prime.auth.client import SignedClient
    from prime.roles.master.app import add_routes, new_app
    from prime.roles.master.cas import BlobStore
    from prime.roles.master.logkeeper import LogKeeper
    from prime.roles.master.logs import TaskLogs
    from prime.roles.master.logstore import LogStore
    from prime.roles.master.metrics import MasterMetrics
    from prime.roles.master.service import MasterService, MasterSettings
    from prime.roles.master.store import MasterStore
    from prime.store import Database
    from prime.web import METRICS

    data = tmp / "master"
    data.mkdir(parents=True, exist_ok=True)
    db = Database(data / "master.sqlite")
    store = MasterStore(db)
    state = store.load()
    app = new_app(signed_service(MASTER))
    metrics = MasterMetrics(app[METRICS], lambda: state)
    settings = MasterSettings(run_id=RUN, public_url="http://127.0.0.1:9", data_dir=data)
    service = MasterService(settings, state, store, metrics, QuietEffects())
    peers = SignedClient(MASTER, domain=DOMAIN, retries=0)
    log_store = LogStore(data / "logs.sqlite")
    logs = TaskLogs(log_store, service.task)
    logs.keeper = LogKeeper(peers, FixedLocator(miner_url), log_store, lambda: service.state.tasks.values(),  # type: ignore[arg-type]
                            service.task, on_stored=logs.changed)
    add_routes(app, service, StubPermissions(), logs=logs, blobs=BlobStore(data / "blobs"))  # type: ignore[arg-type]
    return app, service, [logs.keeper.close, peers.close, service.close, db.close, log_store.close]


async def validator_app(tmp: Path, anvil: Any, deployment: Any) -> tuple[web.Application, list[Any]]:
    from prime.chain.client import RegistryClient
    from prime.roles.validator.service import ValidatorService
    from prime.roles.validator.store import ValidatorStore
    from prime.store import Database

    registry = await RegistryClient.connect(anvil.rpc_url, deployment, anvil.accounts[1])
    db = Database(tmp / "validator.sqlite")
    service = ValidatorService(registry, anvil.accounts[1], ValidatorStore(db))
    return service.build_app(), [registry.close, db.close]
