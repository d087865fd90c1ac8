"""The whole master service in one process: a real MasterService (real core, real SQLite store)
behind the real aiohttp app and signature middleware, with in-memory effects instead of miners,
discovery and a chain. No Docker, no anvil: it runs with DOCKER_HOST=unix:///nonexistent.

Heartbeats, the buyer API, invites, pushes, stops and storage sync go through it end to end."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from eth_account import Account

from prime.auth.permissions import ChainPermissions
from prime.chain.types import NodeStatus, Specs
from prime.errors import PeerError
from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import Task, TaskSpec
from prime.roles.master.app import add_routes, new_app
from prime.roles.master.cas import BlobStore
from prime.roles.master.logs import TaskLogs
from prime.roles.master.logstore import LogStore
from prime.roles.master.metrics import MasterMetrics
from prime.roles.master.service import MasterEffects, MasterService, MasterSettings
from prime.roles.master.state import (
    ChainSynced,
    InviteFailed,
    InviteSent,
    MasterStarted,
    NodeApprovedOnChain,
    NodeJoinedOnChain,
    RunEnded,
    SendInvite,
    StateConfig,
    SyncFailed,
    SyncStorage,
    SyncSucceeded,
)
from prime.roles.master.store import MasterStore
from prime.store import Database
from prime.web import METRICS
from tests.support.signing import signed, signed_service

RUN = 7
SPECS = Specs(2, "H100", 80_000, 16, 64_000, 500)
OWNER = Account.create()
MASTER = Account.create()


@dataclass
class FakeEffects:
    """In-memory effects: what the service asked for, and scripted answers."""

    clock: Any
    members: dict[str, Specs] = field(default_factory=dict)   # what the "chain" says is active
    invites: list[SendInvite] = field(default_factory=list)
    invite_fails: set[str] = field(default_factory=set)
    starts: list[tuple[str, DesiredReplica]] = field(default_factory=list)
    stops: list[tuple[str, str]] = field(default_factory=list)
    syncs: list[SyncStorage] = field(default_factory=list)
    sync_fails: int = 0                                        # fail this many syncs first
    push_fails: bool = False

    async def send_invite(self, ins: SendInvite) -> InviteSent | InviteFailed:
        self.invites.append(ins)
        if ins.node in self.invite_fails:
            return InviteFailed(ins.node, self.clock(), "connection refused", ins.expiry)
        return InviteSent(ins.node, ins.expiry, self.clock(), f"http://{ins.node[-6:]}.miner:8071")

    async def push_start(self, node: str, desired: DesiredReplica) -> None:
        self.starts.append((node, desired))
        if self.push_fails:
            raise PeerError("could not connect")

    async def push_stop(self, node: str, task_id: str) -> None:
        self.stops.append((node, task_id))

    async def sync_storage(self, ins: SyncStorage) -> SyncSucceeded | SyncFailed:
        self.syncs.append(ins)
        if self.sync_fails:
            self.sync_fails -= 1
            return SyncFailed(ins.node, ins.task_id, ins.replica, ins.final, self.clock(), "timeout")
        return SyncSucceeded(ins.node, ins.task_id, ins.replica, ins.final, self.clock(), files=2, miner_final=True)

    async def chain_member(self, node: str) -> Specs | None:
        return self.members.get(node)


class FakeRegistry:
    """The registry view ChainPermissions asks (owner of the run, its masters, node status)."""

    async def is_master(self, run_id: int, address: str) -> bool:
        return run_id == RUN and address.lower() == MASTER.address.lower()

    async def get_run(self, run_id: int) -> Any:
        return SimpleNamespace(owner=OWNER.address, id=run_id)

    async def get_node(self, node: str) -> Any:
        return SimpleNamespace(run_id=RUN, status=NodeStatus.ACTIVE)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


MASTER_KEY = Account.create()  # the master under test (its own key: the audience of every call)


@dataclass
class Master:
    service: MasterService
    effects: FakeEffects
    client: TestClient
    clock: Clock
    store: MasterStore

    async def call(self, account: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raw = json.dumps(body).encode() if body is not None else b""
        headers = signed(account, method, path, raw, to=MASTER_KEY.address)
        if raw:
            headers["Content-Type"] = "application/json"
        resp = await self.client.request(method, path, data=raw or None, headers=headers)
        text = await resp.text()
        return resp.status, json.loads(text) if text else None

    async def heartbeat(self, node: Any, tasks: list[dict[str, Any]] | None = None) -> tuple[int, Any]:
        return await self.call(node, "POST", "/heartbeat", {"tasks": tasks or [], "gpus": [], "load": {}})

    async def settle(self) -> None:
        """Let the background work (invites, pushes, syncs) run and apply its events."""
        for _ in range(50):
            if not self.service.background_count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("background work did not finish")

    def member(self, node: Any) -> None:
        self.effects.members[node.address] = SPECS
        self.service.apply(NodeApprovedOnChain(node.address, SPECS, self.clock()))
        self.service.apply(NodeJoinedOnChain(node.address, self.clock()))


@pytest_asyncio.fixture
async def master(tmp_path: Path):
    clock = Clock()
    config = StateConfig(heartbeat_interval_s=10, unhealthy_after_missed=2, dead_after_missed=5, grace_s=1,
                         invite_ttl_s=100)
    settings = MasterSettings(run_id=RUN, public_url="http://master:8070", data_dir=tmp_path, state=config)
    store = MasterStore(Database(tmp_path / "master.sqlite"))
    state = store.load(config)
    app = new_app(signed_service(MASTER_KEY))
    effects = FakeEffects(clock)
    _: MasterEffects = effects  # the fake is a MasterEffects (checked by type checkers)
    service = MasterService(settings, state, store, MasterMetrics(app[METRICS], lambda: state), effects, clock=clock)
    service.apply(MasterStarted(clock()))
    service.apply(ChainSynced(clock()))
    logs = TaskLogs(LogStore(tmp_path / "logs.sqlite"), service.task)  # no keeper: no miner is read here
    add_routes(app, service, ChainPermissions(FakeRegistry()), logs=logs, blobs=BlobStore(tmp_path / "blobs"))
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield Master(service, effects, client, clock, store)
    finally:
        await client.close()
        await service.close()
        store.db.close()


async def test_an_approved_node_is_invited_once_and_a_failed_invite_backs_off(master: Master) -> None:
    node, other = Account.create(), Account.create()
    master.effects.invite_fails.add(other.address)
    master.service.apply(NodeApprovedOnChain(node.address, SPECS, master.clock()))
    master.service.apply(NodeApprovedOnChain(other.address, SPECS, master.clock()))
    await master.settle()
    assert [i.node for i in master.effects.invites] == [node.address, other.address]
    rec, failed = master.service.state.nodes[node.address], master.service.state.nodes[other.address]
    assert rec.state.value == "Invited" and rec.url == f"http://{node.address[-6:]}.miner:8071"
    assert failed.state.value == "Approved" and failed.invite_failures == 1
    await master.service.tick()
    await master.settle()
    assert len(master.effects.invites) == 2  # nothing new before the backoff / expiry


async def test_run_ended_stops_invites_and_new_tasks(master: Master) -> None:
    node = Account.create()
    master.service.apply(NodeApprovedOnChain(node.address, SPECS, master.clock()))
    await master.settle()
    master.service.end_run()
    master.clock.now += 500  # the invite expired long ago
    await master.service.tick()
    await master.settle()
    assert len(master.effects.invites) == 1
    status, body = await master.call(OWNER, "POST", "/tasks", {"image": "busybox"})
    assert status == 409 and body["error"] == "run_ended"
    status, body = await master.call(OWNER, "GET", "/tasks")
    assert status == 200 and body["tasks"] == []


async def test_heartbeats_tasks_pushes_and_a_single_stop(master: Master) -> None:
    node = Account.create()
    master.member(node)
    status, answer = await master.heartbeat(node)
    assert status == 200 and answer == {"interval_s": 10.0, "desired": []}
    assert master.service.state.nodes[node.address].state.value == "Healthy"

    status, task = await master.call(OWNER, "POST", "/tasks", {"image": "busybox", "gpus": 1, "replicas": 2})
    assert status == 201, task
    await master.settle()
    assert sorted((n, d.id, d.replica) for n, d in master.effects.starts) == [
        (node.address, task["id"], 0), (node.address, task["id"], 1)]
    status, answer = await master.heartbeat(node)
    assert [(d["id"], d["replica"]) for d in answer["desired"]] == [(task["id"], 0), (task["id"], 1)]

    reports = [{"id": task["id"], "replica": i, "state": "Running"} for i in (0, 1)]
    assert (await master.heartbeat(node, reports))[0] == 200
    status, seen = await master.call(OWNER, "GET", f"/tasks/{task['id']}")
    assert status == 200 and [r["state"] for r in seen["replicas"]] == ["Running", "Running"]

    for _ in range(3):  # asked three times: one DELETE to the node
        status, _ = await master.call(OWNER, "DELETE", f"/tasks/{task['id']}")
        assert status == 200
    await master.settle()
    assert master.effects.stops == [(node.address, task["id"])]
    assert (await master.heartbeat(node))[1]["desired"] == []


async def test_a_failed_push_is_left_to_the_next_heartbeat(master: Master) -> None:
    node = Account.create()
    master.member(node)
    await master.heartbeat(node)
    master.effects.push_fails = True
    status, task = await master.call(OWNER, "POST", "/tasks", {"image": "busybox", "gpus": 1})
    await master.settle()
    assert status == 201 and len(master.effects.starts) == 1
    assert [d["id"] for d in (await master.heartbeat(node))[1]["desired"]] == [task["id"]]


async def test_admission_refuses_what_no_node_can_hold(master: Master) -> None:
    node = Account.create()
    master.member(node)
    status, body = await master.call(OWNER, "POST", "/tasks", {"image": "busybox", "gpus": 3})
    assert status == 400 and body["detail"]["field"] == "gpus"
    status, body = await master.call(OWNER, "POST", "/tasks", {"image": "busybox", "gpus": "many"})
    assert status == 400
    assert master.service.state.tasks == {}


async def test_strangers_and_other_signers_are_refused(master: Master) -> None:
    stranger = Account.create()
    status, body = await master.heartbeat(stranger)
    assert status == 403 and body["error"] == "not_a_member"
    assert stranger.address not in master.service.state.nodes
    status, _ = await master.call(stranger, "POST", "/tasks", {"image": "busybox"})
    assert status == 403
    resp = await master.client.post("/heartbeat", json={"tasks": []})  # unsigned
    assert resp.status == 401


async def test_a_node_that_joined_unseen_is_adopted_on_its_first_heartbeat(master: Master) -> None:
    node = Account.create()
    master.effects.members[node.address] = SPECS  # active on chain, unknown to the master
    status, _ = await master.heartbeat(node)
    assert status == 200
    rec = master.service.state.nodes[node.address]
    assert rec.state.value == "Healthy" and rec.hardware == SPECS and master.effects.invites == []


async def test_storage_sync_rounds_retries_and_the_final_sync(master: Master) -> None:
    node = Account.create()
    master.member(node)
    await master.heartbeat(node)
    status, task = await master.call(OWNER, "POST", "/tasks", {"image": "busybox", "gpus": 1, "persistent": True})
    assert status == 201
    tid = task["id"]
    await master.heartbeat(node, [{"id": tid, "replica": 0, "state": "Running"}])

    master.effects.sync_fails = 1
    await master.service.sync_round()
    await master.settle()
    assert [(s.task_id, s.final) for s in master.effects.syncs] == [(tid, False)]
    assert master.service.state.sync_marks[(tid, 0)].failures == 1
    await master.service.sync_round()  # backing off: nothing
    await master.settle()
    assert len(master.effects.syncs) == 1
    master.clock.now += 3
    await master.service.sync_round()
    await master.settle()
    assert len(master.effects.syncs) == 2 and master.service.state.sync_marks[(tid, 0)].failures == 0

    await master.heartbeat(node, [{"id": tid, "replica": 0, "state": "Completed", "exit_code": 0}])
    await master.settle()
    assert master.effects.syncs[-1] == SyncStorage(node.address, tid, 0, final=True)
    assert master.service.state.sync_marks[(tid, 0)].final_done
    master.clock.now += 60
    await master.service.sync_round()
    await master.settle()
    assert len(master.effects.syncs) == 3  # never again
    # the marks are in master.sqlite with the rest of the state
    assert master.store.load().sync_marks[(tid, 0)].final_done


async def test_an_effect_that_raises_still_reports_its_sync(master: Master, caplog: pytest.LogCaptureFixture) -> None:
    node = Account.create()
    master.member(node)
    await master.heartbeat(node)
    _, task = await master.call(OWNER, "POST", "/tasks", {"image": "busybox", "gpus": 1, "persistent": True})
    await master.heartbeat(node, [{"id": task["id"], "replica": 0, "state": "Running"}])

    async def broken(ins: SyncStorage) -> SyncSucceeded:
        raise RuntimeError("a bug in the effect")

    master.effects.sync_storage = broken  # type: ignore[method-assign]
    await master.service.sync_round()
    await master.settle()
    assert master.service.state.syncing == set()  # not stuck in flight forever
    assert master.service.state.sync_marks[(task["id"], 0)].failures == 1


async def test_state_survives_a_restart_of_the_service(master: Master, tmp_path: Path) -> None:
    node = Account.create()
    master.member(node)
    await master.heartbeat(node)
    _, task = await master.call(OWNER, "POST", "/tasks", {"image": "busybox", "gpus": 1})
    master.service.flush()
    again = MasterStore(Database(tmp_path / "master.sqlite")).load()
    assert task["id"] in again.tasks and again.nodes[node.address].state.value == "Healthy"
    again_service = MasterService(master.service.settings, again, master.store, master.service.metrics,
                                  FakeEffects(master.clock), clock=master.clock)
    again_service.apply(MasterStarted(master.clock()))
    again_service.apply(RunEnded(master.clock()))  # fed from the chain at every start
    refused = again_service.create_task(Task.new(TaskSpec("busybox"), master.clock()))
    assert again_service.run_ended and refused is not None and refused.status == 409
