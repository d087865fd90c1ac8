"""The buyer API of a real master process (real anvil, real signatures, a fake miner on the wire):
tasks are created, pushed to the miner, listed in its heartbeat answer, followed to Running and
stopped; bad specs are 400 naming the field; only the run owner may use the API; logs are merged
from every replica's miner."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from eth_account import Account

from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import FakeMiner, World, eventually, headers_for, make_world, signed_call


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-app"))
    miner = await w.new_miner(anvil=anvil)  # 2 GPUs
    await eventually(lambda: _joined(w, miner), what="the node joined")
    miner.start_heartbeats(0.2)
    await eventually(lambda: _healthy(w, miner), what="the node is Healthy")
    yield w
    await w.close()


async def _joined(world: World, miner: FakeMiner) -> bool:
    return miner.master_url is not None and await world.node_state(miner.address) in ("Joined", "Healthy")


async def _healthy(world: World, miner: FakeMiner) -> bool:
    return await world.node_state(miner.address) == "Healthy"


def _miner(world: World) -> FakeMiner:
    return world.miners[0]


async def owner_call(world: World, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    return await signed_call(world.owner, method, world.url, path, data)


async def _task(world: World, task_id: str) -> dict[str, Any]:
    status, task = await owner_call(world, "GET", f"/tasks/{task_id}")
    assert status == 200, task
    return task


async def test_create_list_get_and_stop_a_task(world: World) -> None:
    miner = _miner(world)
    status, task = await owner_call(world, "POST", "/tasks", {
        "image": "busybox:latest", "cmd": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "gpus": 1,
    })
    assert status == 201, task
    task_id = task["id"]
    assert task["spec"]["command"] == ["sh", "-c", "echo hi"] and task["spec"]["env"] == {"A": "1"}

    # Placed on the only node: pushed at once, and listed in the heartbeat answer.
    async def pushed() -> dict[str, Any] | None:
        return next((s for s in miner.received.starts if s["id"] == task_id), None)

    push = await eventually(pushed, what="the start push")
    assert push["replica"] == 0 and push["attempt"] == 0 and len(push["gpu_indices"]) == 1
    assert push["spec"]["image"] == "busybox:latest"
    await eventually(lambda: _desired_has(miner, task_id), what="the task in the heartbeat answer")
    assert (await _task(world, task_id))["replicas"][0]["state"] == "Assigned"

    miner.report(task_id, 0, "Running")
    await eventually(lambda: _task_state(world, task_id, "Running"), what="Running")

    status, tasks = await owner_call(world, "GET", "/tasks")
    assert status == 200 and task_id in [t["id"] for t in tasks["tasks"]]

    status, stopped = await owner_call(world, "DELETE", f"/tasks/{task_id}")
    assert status == 200 and stopped["stop_requested"] is True
    await eventually(lambda: _stop_pushed(miner, task_id), what="the stop push")
    await eventually(lambda: _not_desired(miner, task_id), what="no longer desired")
    miner.reports.pop((task_id, 0))  # the miner stopped it
    await eventually(lambda: _task_state(world, task_id, "Stopped"), what="Stopped")
    assert await world.metric("prime_master_replica_transitions_total", 'from="Running",to="Stopped"') >= 1


async def _desired_has(miner: FakeMiner, task_id: str) -> bool:
    return bool(miner.last_answer) and any(d["id"] == task_id for d in miner.last_answer["desired"])


async def _not_desired(miner: FakeMiner, task_id: str) -> bool:
    return bool(miner.last_answer) and all(d["id"] != task_id for d in miner.last_answer["desired"])


async def _stop_pushed(miner: FakeMiner, task_id: str) -> bool:
    return task_id in miner.received.stops


async def _task_state(world: World, task_id: str, state: str) -> bool:
    return (await _task(world, task_id))["state"] == state


@pytest.mark.parametrize("body, field", [
    ({"image": ""}, "image"),
    ({"image": "Not A Valid Image"}, "image"),
    ({"image": "busybox", "env": {"1BAD": "x"}}, "env.1BAD"),
    ({"image": "busybox", "env": {"OK": 5}}, "env"),  # msgspec names the map, not the key
    ({"image": "busybox", "gpus": -1}, "gpus"),
    ({"image": "busybox", "gpus": 3}, "gpus"),          # the largest node has 2
    ({"image": "busybox", "gpus": "many"}, "gpus"),
    ({"image": "busybox", "replicas": 0}, "replicas"),
    ({"image": "busybox", "colour": "red"}, "colour"),
    ({"command": ["true"]}, "image"),
    # group tasks (issue 15): sizes out of range, wrong types, nesting, and what a group may not combine
    ({"image": "busybox", "group": {"nodes": 0}}, "group.nodes"),
    ({"image": "busybox", "group": {"nodes": 257}}, "group.nodes"),
    ({"image": "busybox", "group": {"nodes": "2"}}, "group.nodes"),
    ({"image": "busybox", "group": {"nodes": True}}, "group.nodes"),
    ({"image": "busybox", "group": {"nodes": 3, "max_nodes": 2}}, "group.max_nodes"),
    ({"image": "busybox", "group": {"nodes": 2, "start_timeout_s": 0}}, "group.start_timeout_s"),
    ({"image": "busybox", "group": {"nodes": 2, "start_timeout_s": 1e300}}, "group.start_timeout_s"),
    ({"image": "busybox", "group": {"nodes": 2, "max_restarts": -1}}, "group.max_restarts"),
    ({"image": "busybox", "group": {"nodes": 2, "leader": {"nodes": {"nodes": 2}}}}, "group.leader"),
    ({"image": "busybox", "group": [2, 3]}, "group"),
    ({"image": "busybox", "group": {}}, "group.nodes"),
    ({"image": "busybox", "gpus": "all", "group": {"nodes": 2}}, "gpus"),
    ({"image": "busybox", "replicas": 2, "group": {"nodes": 2}}, "replicas"),
    ({"image": "busybox", "restart": "on-failure", "group": {"nodes": 2}}, "restart"),
    ({"image": "busybox", "gpus": 3, "group": {"nodes": 2}}, "gpus"),  # no member fits: the largest node has 2
])
async def test_bad_task_specs_are_400_naming_the_field(world: World, body: dict, field: str) -> None:
    before = (await owner_call(world, "GET", "/tasks"))[1]["tasks"]
    status, answer = await owner_call(world, "POST", "/tasks", body)
    assert status == 400, answer
    assert answer["error"] == "invalid_request" and answer["detail"]["field"] == field
    assert (await owner_call(world, "GET", "/tasks"))[1]["tasks"] == before


async def test_malformed_requests(world: World) -> None:
    before = (await owner_call(world, "GET", "/tasks"))[1]["tasks"]
    deep = b'{"image": "busybox", "command": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # ~200 KB of nesting
    for raw in (b"", b"{", b"[1, 2]", b'"image"', deep, b'{"image": "busybox", "replicas": ' + b"9" * 5000 + b"}"):
        status, answer = await signed_call(world.owner, "POST", world.url, "/tasks", raw)
        assert status == 400 and answer["error"] in ("invalid_json", "invalid_request"), (raw[:40], answer)
    assert (await owner_call(world, "GET", "/tasks"))[1]["tasks"] == before  # alive, nothing created
    status, answer = await owner_call(world, "GET", "/tasks/no%20such")
    assert status == 400 and answer["error"] == "invalid_task_id"
    status, answer = await owner_call(world, "GET", "/tasks/abcdef123456")
    assert status == 404 and answer["error"] == "task_not_found"
    status, answer = await owner_call(world, "DELETE", "/tasks/abcdef123456")
    assert status == 404
    status, answer = await owner_call(world, "GET", "/tasks/abcdef123456/logs")
    assert status == 404


async def test_only_the_run_owner_may_use_the_buyer_api(world: World) -> None:
    stranger = Account.create()
    spec = json.dumps({"image": "busybox"}).encode()
    for who in (stranger, world.master_account):
        for method, path, body in (("POST", "/tasks", spec), ("GET", "/tasks", b""), ("GET", "/tasks/abc", b"")):
            status, answer = await signed_call(who, method, world.url, path, body)
            assert status == 403 and answer["error"] == "forbidden", (who.address, method, path)
    status, answer = await signed_call(None, "GET", world.url, "/tasks")
    assert status == 401
    # A signature over another body is refused before anything is parsed.
    headers = await headers_for(world.owner, world.url, "POST", "/tasks", b'{"image": "busybox"}')
    async with aiohttp.ClientSession() as session:
        async with session.post(world.url + "/tasks", data=b'{"image": "evil"}', headers=headers) as answer:
            assert answer.status == 401
    tasks = (await owner_call(world, "GET", "/tasks"))[1]["tasks"]
    assert all(t["spec"]["image"] != "evil" for t in tasks)


async def test_nodes_listing_for_owner_and_master_only(world: World) -> None:
    miner = _miner(world)
    for who in (world.owner, world.master_account):
        status, answer = await signed_call(who, "GET", world.url, "/nodes")
        assert status == 200
        nodes = {n["address"]: n for n in answer["nodes"]}
        assert nodes[miner.address]["state"] == "Healthy" and nodes[miner.address]["url"] == miner.url
    status, answer = await signed_call(Account.create(), "GET", world.url, "/nodes")
    assert status == 403


async def test_logs_are_merged_from_every_replica(world: World) -> None:
    miner = _miner(world)
    status, task = await owner_call(world, "POST", "/tasks", {"image": "busybox", "gpus": 1, "replicas": 2})
    assert status == 201
    task_id = task["id"]
    for replica in (0, 1):
        miner.report(task_id, replica, "Running")
    miner.logs[(task_id, 0)] = [{"stream": "stdout", "line": "r0 first", "ts": 1.0},
                                {"stream": "stderr", "line": "r0 second", "ts": 3.0}]
    miner.logs[(task_id, 1)] = [{"stream": "stdout", "line": "r1 first", "ts": 2.0}]
    await eventually(lambda: _task_state(world, task_id, "Running"), what="Running")

    status, raw = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs", raw=True)
    assert status == 200
    lines = [json.loads(line) for line in raw.splitlines()]
    assert [(entry["replica"], entry["line"]) for entry in lines] == [(0, "r0 first"), (1, "r1 first"), (0, "r0 second")]
    assert all(entry["node"] == miner.address for entry in lines) and lines[2]["stream"] == "stderr"

    status, raw = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs?tail=1", raw=True)
    assert [json.loads(line)["line"] for line in raw.splitlines()] == ["r0 second"]
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs?tail=-1")
    assert status == 400 and answer["detail"]["field"] == "tail"
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs?follow=maybe")
    assert status == 400 and answer["detail"]["field"] == "follow"

    # follow=1: lines as they come, until every replica finished.
    received: list[dict[str, Any]] = []

    async def follow() -> None:
        path = f"/tasks/{task_id}/logs?follow=1"
        headers = await headers_for(world.owner, world.url, "GET", path)
        async with aiohttp.ClientSession() as session, session.get(world.url + path, headers=headers) as answer:
            assert answer.status == 200
            async for line in answer.content:
                received.append(json.loads(line))

    reader = asyncio.create_task(follow())
    await eventually(lambda: _count(received, 3), what="the backlog")
    miner.logs[(task_id, 1)].append({"stream": "stdout", "line": "r1 later", "ts": 4.0})
    await eventually(lambda: _has(received, "r1 later"), what="a new line")
    assert not reader.done()
    for replica in (0, 1):
        miner.follow_open.setdefault((task_id, replica), asyncio.Event()).set()  # the containers exit
        miner.report(task_id, replica, "Completed", 0)
    await asyncio.wait_for(reader, timeout=30)
    assert await _task_state(world, task_id, "Completed")
    assert sorted(entry["line"] for entry in received) == ["r0 first", "r0 second", "r1 first", "r1 later"]


async def _count(items: list, n: int) -> bool:
    return len(items) >= n


async def _has(items: list[dict[str, Any]], line: str) -> bool:
    return any(i["line"] == line for i in items)


async def test_a_dead_nodes_replica_moves_to_another_node(world: World, anvil) -> None:
    """Runs last in this module: it silences the module's first node."""
    first = _miner(world)
    second = await world.new_miner(anvil=anvil)
    await eventually(lambda: _joined(world, second), what="the second node joined")
    second.start_heartbeats(0.2)
    await eventually(lambda: _healthy(world, second), what="the second node Healthy")

    status, task = await owner_call(world, "POST", "/tasks", {"image": "busybox", "gpus": 2})
    assert status == 201
    task_id = task["id"]

    async def placed() -> dict[str, Any] | None:
        replica = (await _task(world, task_id))["replicas"][0]
        return replica if replica["node"] else None

    replica = await eventually(placed, what="placement")
    holder, spare = (first, second) if replica["node"] == first.address else (second, first)
    holder.report(task_id, 0, "Running")
    await eventually(lambda: _task_state(world, task_id, "Running"), what="Running")

    holder.stop_heartbeats()
    await eventually(lambda: _state_is(world, holder, "Dead"), what="the holder Dead")

    async def moved() -> dict[str, Any] | None:
        replica = (await _task(world, task_id))["replicas"][0]
        return replica if replica["node"] == spare.address else None

    replica = await eventually(moved, what="the replica on the other node")
    assert replica["attempt"] == 1 and replica["state"] in ("Assigned", "Running")
    push = await eventually(lambda: _pushed_attempt(spare, task_id, 1), what="the push to the other node")
    assert push["gpu_indices"] == [0, 1]
    await eventually(lambda: _desired_has(spare, task_id), what="desired on the other node")


async def _state_is(world: World, miner: FakeMiner, state: str) -> bool:
    return await world.node_state(miner.address) == state


async def _pushed_attempt(miner: FakeMiner, task_id: str, attempt: int) -> dict[str, Any] | None:
    return next((s for s in miner.received.starts if s["id"] == task_id and s["attempt"] == attempt), None)


async def test_a_task_request_replayed_after_a_master_crash_is_refused(world: World) -> None:
    """A captured POST /tasks, sent again after the master was killed and restarted: 401, no second task."""
    body = json.dumps({"image": "busybox:latest", "cmd": ["true"]}).encode()
    captured = await headers_for(world.owner, world.url, "POST", "/tasks", body)
    captured["Content-Type"] = "application/json"
    async with aiohttp.ClientSession() as session:
        async with session.post(world.url + "/tasks", data=body, headers=captured) as answer:
            assert answer.status == 201
    before = (await owner_call(world, "GET", "/tasks"))[1]["tasks"]

    world.master.kill()  # SIGKILL: the nonce must already be on disk
    await world.master.start_async()

    async with aiohttp.ClientSession() as session:
        async with session.post(world.url + "/tasks", data=body, headers=captured) as answer:
            assert answer.status == 401 and "already used" in (await answer.json())["detail"]
    assert (await owner_call(world, "GET", "/tasks"))[1]["tasks"] == before
