"""Test support for the master's integration tests: a small in-process miner that speaks the
miner's wire (docs/protocol.md, "Master -> miner"), and the world around a real master process.

The fake miner is real where the master can tell: it checks signatures and, on chain, that the
caller is a master of its run; it joins the run with a real ``joinRun`` transaction paid by its
provider key and acknowledges the invite with the node key; it heartbeats with signed requests.
It runs no containers: tests set the replica states it reports, the files it lists in a manifest
and the log lines it serves. (The end-to-end tests use the real miner.)

Two options, off by default (group tasks, issue 15): ``task_ports`` (a port range, sent in every
heartbeat as a miner's ``--task-ports``), and ``run_desired``: the node behaves like a miner whose
containers start at once and never exit; every replica the master desires (pushed or in a
heartbeat answer) is reported Running with its attempt from the next heartbeat on, and one no
longer desired (stopped or left out of an answer) is no longer reported. ``desired_ever`` keeps
every (task, replica, attempt) any heartbeat answer desired, and ``heartbeat(tasks=...)`` sends one
heartbeat with exactly the reports given (a lying node), leaving ``reports`` as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.auth.client import SignedClient
from prime.auth.middleware import SIGNER, signed_request_middleware
from prime.auth.signing import Domain, sign_headers, sign_message
from prime.chain.client import RegistryClient, invite_digest, recover_digest_signer
from prime.chain.types import NodeStatus, Requirements, Specs
from prime.clients.discovery import DiscoveryClient
from prime.keys import create_keystore
from prime.protocol.invite import ack_text
from prime.web import bound_port, json_error
from tests.fixtures.chain import DEFAULT_SPECS
from tests.fixtures.processes import RoleProcess, RoleProcesses, free_port, prime_command

PASSWORD = "devnet"


async def eventually(check: Callable[[], Awaitable[Any]], *, timeout_s: float = 30.0, interval_s: float = 0.1,
                     what: str = "condition") -> Any:
    """Await ``check()`` until it returns something truthy; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")
        await asyncio.sleep(interval_s)


@dataclass
class Received:
    """What a fake miner was sent by the master."""

    invites: list[dict[str, Any]] = field(default_factory=list)       # valid invites (answered 200)
    refused_invites: list[str] = field(default_factory=list)          # why others were refused
    starts: list[dict[str, Any]] = field(default_factory=list)        # POST /tasks bodies
    stops: list[str] = field(default_factory=list)                    # DELETE /tasks/{id}
    manifests: int = 0
    blobs: list[str] = field(default_factory=list)
    log_requests: list[dict[str, str]] = field(default_factory=list)


class FakeMiner:
    def __init__(self, node: LocalAccount, provider: LocalAccount, run_id: int, rpc_url: str, deployment: Any) -> None:
        self.node = node
        self.provider = provider
        self.run_id = run_id
        self.rpc_url = rpc_url
        self.deployment = deployment
        self.received = Received()
        self.master_url: str | None = None
        self.reports: dict[tuple[str, int], dict[str, Any]] = {}    # what heartbeats say about replicas
        self.files: dict[tuple[str, int], dict[str, bytes]] = {}    # persistent data per replica
        self.final: dict[tuple[str, int], bool] = {}
        self.logs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.follow_open: dict[tuple[str, int], asyncio.Event] = {}  # set: stop following
        self.last_answer: dict[str, Any] | None = None
        self.heartbeat_errors: list[str] = []
        self.refuse_invites = False  # answer invites 503 (a miner that is down or not ready)
        self.task_ports: tuple[int, int] | None = None  # sent in heartbeats when set (a miner's --task-ports)
        self.run_desired = False  # report what the master desires Running at once (see the module's doc)
        self.desired_ever: set[tuple[str, int, int]] = set()  # (task, replica, attempt) of every answer's desired
        self._runner: web.AppRunner | None = None
        self._chain: RegistryClient | None = None
        self._beat: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> FakeMiner:
        self._chain = await RegistryClient.connect(self.rpc_url, self.deployment, self.provider)
        app = web.Application(middlewares=[signed_request_middleware(self.node, Domain.of(self.deployment))])
        app.router.add_post("/invite", self._invite)
        app.router.add_post("/tasks", self._start_task)
        app.router.add_delete("/tasks/{task_id}", self._stop_task)
        app.router.add_get("/tasks/{task_id}/manifest", self._manifest)
        app.router.add_get("/tasks/{task_id}/blobs/{sha256}", self._blob)
        app.router.add_get("/tasks/{task_id}/logs", self._logs)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = bound_port(self._runner)
        return self

    async def close(self) -> None:
        self.stop_heartbeats()
        for stop in self.follow_open.values():
            stop.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._chain is not None:
            await self._chain.close()

    async def register_and_announce(self, validator_client: RegistryClient, discovery_url: str,
                                    specs: Specs = DEFAULT_SPECS, *, approve: bool = True) -> None:
        """registerNode (provider pays), announce to discovery (node key), then the validator's verdict."""
        assert self._chain is not None
        await self._chain.register_node(self.run_id, self.node, specs)
        async with SignedClient(self.node, domain=Domain.of(self.deployment)) as client:
            await DiscoveryClient(client, discovery_url).announce("127.0.0.1", self.port, self.run_id)
        await validator_client.report_validation(self.node, approve, b"\x22" * 32)

    # --- heartbeats -------------------------------------------------------------------------------

    async def heartbeat(self, tasks: list[dict[str, Any]] | None = None) -> tuple[int, Any]:
        """One signed heartbeat to the master; (status, JSON answer). ``tasks``: report exactly these
        this once instead of ``reports`` (``run_desired`` does not act on its answer)."""
        assert self.master_url is not None, "no invite received yet"
        payload: dict[str, Any] = {"tasks": list(self.reports.values()) if tasks is None else tasks,
                                   "gpus": [{"index": 0, "util": 10.0}], "load": {"cpu_pct": 5.0}}
        if self.task_ports is not None:
            payload["task_ports"] = list(self.task_ports)
        status, answer = await signed_call(self.node, "POST", self.master_url, "/heartbeat", json.dumps(payload).encode())
        if status == 200:
            self.last_answer = answer
            if isinstance(answer, dict):
                self.desired_ever.update((d["id"], d["replica"], d["attempt"]) for d in answer.get("desired", []))
            if self.run_desired and tasks is None and isinstance(answer, dict):
                self._run(answer.get("desired", []))
        return status, answer

    def _run(self, desired: list[dict[str, Any]]) -> None:
        """``run_desired``: report exactly the desired replicas, Running with their attempts."""
        wanted = {(d["id"], d["replica"]): d["attempt"] for d in desired}
        for key in [k for k in self.reports if k not in wanted]:
            del self.reports[key]
        for (task_id, replica), attempt in wanted.items():
            if self.reports.get((task_id, replica), {}).get("attempt") != attempt:
                self.report(task_id, replica, "Running", attempt=attempt)

    def start_heartbeats(self, interval_s: float = 0.3) -> None:
        if self._beat is not None and not self._beat.done():
            return

        async def loop() -> None:
            while True:
                if self.master_url is None:  # not invited yet: beat once it is
                    await asyncio.sleep(min(interval_s, 0.05))
                    continue
                try:
                    status, answer = await self.heartbeat()
                    if status != 200:
                        self.heartbeat_errors.append(f"{status}: {answer}")
                except (aiohttp.ClientError, OSError) as exc:
                    self.heartbeat_errors.append(str(exc))  # the master is down: keep trying
                await asyncio.sleep(interval_s)

        self._beat = asyncio.get_running_loop().create_task(loop())

    def stop_heartbeats(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None

    def report(self, task_id: str, replica: int, state: str, exit_code: int | None = None,
               attempt: int | None = None) -> None:
        self.reports[(task_id, replica)] = {"id": task_id, "replica": replica, "state": state, "exit_code": exit_code}
        if attempt is not None:  # left out unless given (None: not known, the master does not check it)
            self.reports[(task_id, replica)]["attempt"] = attempt

    # --- the miner's wire -----------------------------------------------------------------------------

    async def _caller_is_master(self, request: web.Request) -> bool:
        assert self._chain is not None
        return await self._chain.is_master(self.run_id, request[SIGNER])

    async def _invite(self, request: web.Request) -> web.Response:
        assert self._chain is not None
        if self.refuse_invites:
            self.received.refused_invites.append("refused on purpose")
            return json_error(409, "not_ready", "this miner is not ready for invites")
        body = await request.json()
        signer = request[SIGNER]
        try:
            expiry = int(body["expiry"])
            signature = bytes.fromhex(body["signature"].removeprefix("0x"))
            digest = invite_digest(self._chain.chain_id, self._chain.address, int(body["run_id"]), self.address, expiry)
            invite_signer = recover_digest_signer(digest, signature)
        except (KeyError, ValueError, TypeError) as exc:
            self.received.refused_invites.append(f"malformed: {exc}")
            return json_error(400, "invalid_invite", str(exc))
        problems = []
        if invite_signer != signer:
            problems.append("invite not signed by the caller")
        if body["run_id"] != self.run_id:
            problems.append("wrong run")
        if expiry <= time.time():
            problems.append("expired")
        if not await self._chain.is_master(self.run_id, signer):
            problems.append("caller is not a master of the run on chain")
        if problems:
            self.received.refused_invites.append("; ".join(problems))
            return json_error(403, "forbidden", "; ".join(problems))
        info = await self._chain.get_node(self.address)
        tx_hash = None
        if not (info.status == NodeStatus.ACTIVE and info.run_id == self.run_id):
            result = await self._chain.join_run(self.run_id, self.address, expiry, signature)
            tx_hash = result.tx_hash
        self.master_url = body["master_url"]
        self.received.invites.append(body)
        ack = sign_message(self.node, ack_text(self._chain.chain_id, self._chain.address, self.run_id, self.address, expiry))
        return web.json_response({"node": self.address, "run_id": self.run_id, "master_url": self.master_url,
                                  "tx_hash": tx_hash, "ack": ack})

    async def _start_task(self, request: web.Request) -> web.Response:
        if not await self._caller_is_master(request):
            return json_error(403, "forbidden", "not a master")
        body = await request.json()
        self.received.starts.append(body)
        if self.run_desired:
            self.report(body["id"], body["replica"], "Running", attempt=body["attempt"])
        return web.json_response({"id": body["id"], "replica": body["replica"], "state": "Pulling"})

    async def _stop_task(self, request: web.Request) -> web.Response:
        if not await self._caller_is_master(request):
            return json_error(403, "forbidden", "not a master")
        self.received.stops.append(request.match_info["task_id"])
        if self.run_desired:
            for key in [k for k in self.reports if k[0] == request.match_info["task_id"]]:
                del self.reports[key]
        return web.json_response({"stopped": True})

    async def _manifest(self, request: web.Request) -> web.Response:
        if not await self._caller_is_master(request):
            return json_error(403, "forbidden", "not a master")
        key = (request.match_info["task_id"], int(request.query.get("replica", "0")))
        if key not in self.files:
            return json_error(404, "task_not_found", "no such task")
        self.received.manifests += 1
        files = [{"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                 for p, b in sorted(self.files[key].items())]
        return web.json_response({"task_id": key[0], "replica": key[1], "final": self.final.get(key, False),
                                  "files": files})

    async def _blob(self, request: web.Request) -> web.Response:
        if not await self._caller_is_master(request):
            return json_error(403, "forbidden", "not a master")
        key = (request.match_info["task_id"], int(request.query.get("replica", "0")))
        wanted = request.match_info["sha256"]
        for content in self.files.get(key, {}).values():
            if hashlib.sha256(content).hexdigest() == wanted:
                self.received.blobs.append(wanted)
                return web.Response(body=content, content_type="application/octet-stream")
        return json_error(404, "blob_not_found", "no such blob")

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        if not await self._caller_is_master(request):
            return json_error(403, "forbidden", "not a master")
        key = (request.match_info["task_id"], int(request.query.get("replica", "0")))
        self.received.log_requests.append(dict(request.query))
        if key not in self.logs:
            return json_error(404, "task_not_found", "no such task")
        lines = self.logs[key]
        tail = request.query.get("tail")
        if tail is not None:
            lines = lines[-int(tail):] if int(tail) else []
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for line in lines:
            await response.write(json.dumps(line).encode() + b"\n")
        if request.query.get("follow") == "1":
            stop = self.follow_open.setdefault(key, asyncio.Event())
            sent = len(self.logs[key])
            while not stop.is_set():  # pass on lines appended later, until told the container ended
                await asyncio.sleep(0.05)
                for line in self.logs[key][sent:]:
                    await response.write(json.dumps(line).encode() + b"\n")
                sent = len(self.logs[key])
        await response.write_eof()
        return response


async def identity_of(base_url: str) -> tuple[str, Domain]:
    """(address, domain) the service at ``base_url`` names in its /health (what a request to it is addressed to).

    Asked every time, never cached by URL: the OS hands a freed port to the next test's service, which
    has another key, and a request addressed to the old one is refused (401) as it should be."""
    async with aiohttp.ClientSession() as session, session.get(base_url + "/health") as answer:
        found = (await answer.json())["identity"]
    return found["address"], Domain(found["chain_id"], found["registry"])


async def headers_for(account: LocalAccount, base_url: str, method: str, path: str, body: bytes = b"") -> dict[str, str]:
    """The signature headers of a request by ``account`` to the service at ``base_url``."""
    audience, domain = await identity_of(base_url)
    return sign_headers(account, method, path, body, audience=audience, domain=domain)


async def signed_call(account: LocalAccount | None, method: str, base_url: str, path: str, body: bytes = b"",
                      *, raw: bool = False) -> tuple[int, Any]:
    """One request with exactly ``path`` on the wire (signed by ``account`` and addressed to the service at
    ``base_url``, as its /health names itself; unsigned when None)."""
    headers = await headers_for(account, base_url, method, path, body) if account is not None else {}
    if body:
        headers["Content-Type"] = "application/json"
    from yarl import URL

    url = URL(base_url + path, encoded=True)
    async with aiohttp.ClientSession() as session, session.request(method, url, data=body or None, headers=headers) as answer:
        data = await answer.read()
        if raw:
            return answer.status, data
        try:
            return answer.status, json.loads(data)
        except ValueError:
            return answer.status, data.decode(errors="replace")


# --- the world: discovery, a run, a master process ---------------------------------------------------


@dataclass
class World:
    discovery: RoleProcess
    master: RoleProcess
    run_id: int
    owner: LocalAccount
    master_account: LocalAccount
    validator: LocalAccount
    validator_client: RegistryClient
    owner_client: RegistryClient
    rpc_url: str
    deployment: Any
    data_dir: Path
    miners: list[FakeMiner] = field(default_factory=list)

    discovery_key: LocalAccount = field(default_factory=Account.create)

    @property
    def url(self) -> str:
        return self.master.base_url

    @property
    def discovery_uri(self) -> str:
        """The run's discovery URI on chain: the URL and the key its answers are signed with."""
        return f"{self.discovery.base_url}#{self.discovery_key.address}"

    async def new_miner(self, specs: Specs = DEFAULT_SPECS, *, anvil: Any) -> FakeMiner:
        """A registered, announced and approved node with its fake miner listening."""
        node, provider = Account.create(), Account.create()
        anvil.set_balance(provider.address, 10 * 10**18)
        miner = await FakeMiner(node, provider, self.run_id, self.rpc_url, self.deployment).start()
        self.miners.append(miner)
        await miner.register_and_announce(self.validator_client, self.discovery_uri, specs)
        return miner

    async def nodes(self, as_account: LocalAccount | None = None) -> dict[str, dict[str, Any]]:
        status, body = await signed_call(as_account or self.owner, "GET", self.url, "/nodes")
        assert status == 200, body
        return {n["address"]: n for n in body["nodes"]}

    async def node_state(self, address: str) -> str | None:
        node = (await self.nodes()).get(address)
        return node["state"] if node else None

    async def metric(self, name: str, labels: str = "") -> float:
        """A sample of the master's /metrics (0 when absent)."""
        async with aiohttp.ClientSession() as session, session.get(self.url + "/metrics") as answer:
            text = await answer.text()
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    async def close(self) -> None:
        for miner in self.miners:
            await miner.close()
        await self.validator_client.close()
        await self.owner_client.close()


def write_key(directory: Path, account: LocalAccount) -> Path:
    """An encrypted key file for ``account`` (cheap KDF: this is a test)."""
    path = directory / f"{account.address}.json"
    create_keystore(path, PASSWORD, account.key.hex(), kdf="pbkdf2", iterations=2)
    return path


def discovery_command(port: int, rpc_url: str, deployment_path: Path, data_dir: Path) -> list[str]:
    return prime_command("discovery", "start", "--host", "127.0.0.1", "--port", str(port), "--rpc-url", rpc_url,
                         "--deployment", str(deployment_path), "--data-dir", str(data_dir))


def master_command(port: int, run_id: int, key_file: Path, rpc_url: str, deployment_path: Path, data_dir: Path,
                   *extra: str) -> list[str]:
    return prime_command(
        "master", "start", "--run-id", str(run_id), "--key-file", str(key_file), "--host", "127.0.0.1",
        "--port", str(port), "--rpc-url", rpc_url, "--deployment", str(deployment_path), "--data-dir", str(data_dir),
        "--heartbeat-interval", "1", "--unhealthy-after", "2", "--dead-after", "4", "--heartbeat-grace", "0.5",
        "--poll-interval", "0.2", "--sync-interval", "0.5", "--peer-timeout", "3", *extra,
    )


async def make_world(anvil: Any, deployment: Any, processes: RoleProcesses, tmp: Path,
                     requirements: Requirements = Requirements(min_gpus=1), master_extra: tuple[str, ...] = ()) -> World:
    """Discovery and a master process for a new run owned by anvil account 2, with a fresh master key
    (funded: it pays for its ejections); ``master_extra``: more ``prime master start`` options."""
    disc_port = free_port()
    discovery_key = Account.create()
    discovery = processes.create("discovery", discovery_command(disc_port, anvil.rpc_url, deployment.path,
                                                                 tmp / "discovery"), port=disc_port,
                                 env={"PRIME_PRIVATE_KEY": discovery_key.key.hex()})
    await discovery.start_async()
    owner, validator = anvil.accounts[2], anvil.accounts[1]
    master_account = Account.create()
    anvil.set_balance(master_account.address, 10 * 10**18)
    owner_client = await RegistryClient.connect(anvil.rpc_url, deployment, owner)
    validator_client = await RegistryClient.connect(anvil.rpc_url, deployment, validator)
    run_id = await owner_client.create_run(requirements, f"{discovery.base_url}#{discovery_key.address}", [master_account.address])
    key_file = write_key(tmp, master_account)
    port = free_port()
    data_dir = tmp / "master"
    master = processes.create(
        "master", master_command(port, run_id, key_file, anvil.rpc_url, deployment.path, data_dir, *master_extra),
        port=port, env={"PRIME_KEY_PASSWORD": PASSWORD},
    )
    await master.start_async()
    return World(discovery, master, run_id, owner, master_account, validator, validator_client, owner_client,
                 anvil.rpc_url, deployment, data_dir, discovery_key=discovery_key)


@contextlib.asynccontextmanager
async def following(coro: Awaitable[Any]):  # type: ignore[no-untyped-def]
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
