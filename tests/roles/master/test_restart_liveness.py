"""Liveness after a master restart, with a real master process (issue 13): three nodes heartbeat
through a master that is down for three times its dead-after window; after it restarts no node is
marked Unhealthy or Dead, no replica is moved or restarted (same node, same attempt), and the task
completes with every log line and file its replicas produced, those of the downtime included."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest_asyncio

from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import FakeMiner, World, eventually, make_world, signed_call

# master_command: heartbeat 1 s, dead after 4 missed + 0.5 s grace.
DEAD_AFTER_S = 4 * 1.0 + 0.5


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-restart"))
    miners = [await w.new_miner(anvil=anvil) for _ in range(3)]
    for m in miners:
        await eventually(lambda m=m: _has_master(m), what="the invite")
        m.start_heartbeats(0.3)  # a lost master is retried every 0.3 s: within one interval
    for m in miners:
        await eventually(lambda m=m: _state_is(w, m, "Healthy"), what="Healthy")
    yield w
    await w.close()


async def _has_master(miner: FakeMiner) -> bool:
    return miner.master_url is not None


async def _state_is(world: World, miner: FakeMiner, state: str) -> bool:
    return await world.node_state(miner.address) == state


async def owner_call(world: World, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    return await signed_call(world.owner, method, world.url, path, data)


async def _task(world: World, task_id: str) -> dict[str, Any]:
    status, task = await owner_call(world, "GET", f"/tasks/{task_id}")
    assert status == 200, task
    return task


async def _placements(world: World, task_id: str) -> list[tuple[int, str | None, int, str]]:
    replicas = (await _task(world, task_id))["replicas"]
    return [(r["index"], r["node"], r["attempt"], r["state"]) for r in replicas]


async def _bad_transitions(world: World) -> float:
    total = 0.0
    for old in ("Joined", "Healthy", "Unhealthy"):
        for new in ("Unhealthy", "Dead"):
            if old != new:
                total += await world.metric("prime_master_node_transitions_total", f'from="{old}",to="{new}"')
    return total


async def test_a_master_down_for_three_dead_windows_declares_nobody_dead_and_moves_nothing(world: World) -> None:
    miners = world.miners
    status, task = await owner_call(world, "POST", "/tasks", {"image": "busybox", "gpus": 2, "replicas": 3,
                                                              "persistent": True})
    assert status == 201, task
    task_id = task["id"]

    async def placed() -> list | None:
        rows = await _placements(world, task_id)
        return rows if all(node for _, node, _, _ in rows) else None

    rows = await eventually(placed, what="placement")
    by_node = {node: index for index, node, _, _ in rows}
    assert set(by_node) == {m.address for m in miners}  # one replica per node
    for m in miners:
        index = by_node[m.address]
        m.report(task_id, index, "Running")
        m.logs[(task_id, index)] = [{"stream": "stdout", "line": f"r{index} before", "ts": 1.0 + index}]
        m.files[(task_id, index)] = {"before.txt": f"r{index} before".encode()}

    async def all_running() -> bool:
        return all(state == "Running" for *_, state in await _placements(world, task_id))

    await eventually(all_running, what="every replica Running")
    before = await _placements(world, task_id)

    # The master is down for three dead-after windows; the replicas keep working meanwhile.
    world.master.kill()
    down_for = 3 * DEAD_AFTER_S
    await asyncio.sleep(down_for / 2)
    for m in miners:
        index = by_node[m.address]
        m.logs[(task_id, index)].append({"stream": "stdout", "line": f"r{index} while down", "ts": 10.0 + index})
        m.files[(task_id, index)]["down.txt"] = f"r{index} while down".encode()
    await asyncio.sleep(down_for / 2)
    await world.master.start_async()
    restarted = time.monotonic()

    # Two full dead-after windows after the restart: nobody went Unhealthy or Dead, nothing moved.
    while time.monotonic() - restarted < 2 * DEAD_AFTER_S:
        states = {m.address: await world.node_state(m.address) for m in miners}
        assert all(s == "Healthy" for s in states.values()), states
        assert await _bad_transitions(world) == 0
        assert await _placements(world, task_id) == before
        await asyncio.sleep(0.3)
    assert await world.metric("prime_master_replica_transitions_total", 'from="Running",to="Pending"') == 0
    assert all(start["attempt"] == 0 for m in miners for start in m.received.starts if start["id"] == task_id)

    # The replicas finish: the task completes with every line and file, the downtime's included.
    for m in miners:
        index = by_node[m.address]
        m.logs[(task_id, index)].append({"stream": "stdout", "line": f"r{index} after", "ts": 20.0 + index})
        m.files[(task_id, index)]["after.txt"] = f"r{index} after".encode()
        m.final[(task_id, index)] = True
        m.report(task_id, index, "Completed", 0)

    async def completed() -> bool:
        return (await _task(world, task_id))["state"] == "Completed"

    await eventually(completed, what="the task Completed")
    status, raw = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs", raw=True)
    assert status == 200
    lines = sorted(json.loads(line)["line"] for line in raw.splitlines())
    assert lines == sorted(f"r{i} {when}" for i in range(3) for when in ("before", "while down", "after"))

    async def all_files(index: int) -> bool:
        status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files")
        assert status == 200, answer
        return {f["path"] for f in answer["files"] if f["replica"] == index} == {"before.txt", "down.txt", "after.txt"}

    for index in range(3):
        await eventually(lambda index=index: all_files(index), what=f"replica {index}'s files")
        for name, when in (("before.txt", "before"), ("down.txt", "while down"), ("after.txt", "after")):
            status, body = await signed_call(world.owner, "GET", world.url,
                                             f"/tasks/{task_id}/files/{name}?replica={index}", raw=True)
            assert status == 200 and body == f"r{index} {when}".encode()
    assert await _bad_transitions(world) == 0
