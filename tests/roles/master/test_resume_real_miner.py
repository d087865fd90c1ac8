"""The node running a persistent replica dies (issue 13 acceptance, short of two miner processes):
a real master process, the dying node a fake miner (its heartbeats simply stop, as after kill -9,
whatever its container does), the node the replica moves to a real miner (MinerNode, real Docker).

The replica is rescheduled; its new attempt starts with the files synced from the dead node in
its /data (the master's seed routes), completes, and its final sync keeps every file already
synced next to what it wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest_asyncio
from eth_account import Account

from prime.chain.types import Requirements
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import World, eventually, make_world, signed_call
from tests.support.miner_env import running_node

# The new attempt checks its checkpoint is there before it "continues" from it.
RESUME = "test -f /data/step/9.txt || exit 3; cat /data/step/*.txt > /data/resumed.txt"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-resume-real"),
                         requirements=Requirements(min_gpus=0))
    yield w
    await w.close()


async def _files(world: World, task_id: str) -> dict[str, dict[str, Any]]:
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files")
    assert status == 200, answer
    return {f["path"]: f for f in answer["files"]}


async def _task(world: World, task_id: str) -> dict[str, Any]:
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}")
    assert status == 200, answer
    return answer


async def test_a_replica_of_a_dead_node_resumes_from_its_synced_data_on_a_real_miner(
        world: World, anvil, deployment, docker_client, busybox_image: str, tmp_path: Path) -> None:
    dying = await world.new_miner(anvil=anvil)
    await eventually(lambda: _truthy(dying.master_url), what="the invite of the first node")
    dying.start_heartbeats(0.2)
    await eventually(lambda: _state(world, dying.address, "Healthy"), what="the first node Healthy")

    spec = {"image": busybox_image, "command": ["sh", "-c", RESUME], "gpus": 0, "persistent": True}
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
    assert status == 201, task
    task_id = task["id"]
    await eventually(lambda: _truthy([s for s in dying.received.starts if s["id"] == task_id]), what="the placement")
    data = {f"step/{i}.txt": f"step {i}\n".encode() for i in range(10)}
    dying.files[(task_id, 0)] = dict(data)
    dying.report(task_id, 0, "Running")

    async def synced() -> bool:
        return set(await _files(world, task_id)) == set(data)

    await eventually(synced, what="the first node's files synced")

    node = Account.create()
    anvil.set_balance(node.address, 10 * 10**18)
    async with running_node(anvil, deployment, world.run_id, node, tmp_path / "miner") as miner:
        try:
            await _resume(world, miner, dying, node.address, task_id, data)
        finally:
            await miner.executor.stop(task_id)


async def _resume(world: World, miner: Any, dying: Any, address: str, task_id: str, data: dict[str, bytes]) -> None:
    """The validator approves the real miner; the first node dies; the replica resumes on the real one."""
    await world.validator_client.report_validation(address, True, b"\x33" * 32)
    await eventually(lambda: _state(world, address, "Healthy"), timeout_s=60, what="the real miner Healthy")

    dying.stop_heartbeats()  # the node is gone; its "container" is left as it was

    async def completed() -> dict[str, Any] | None:
        shown = await _task(world, task_id)
        return shown if shown["state"] in ("Completed", "Failed") else None

    shown = await eventually(completed, timeout_s=60, what="the rescheduled replica to finish")
    replica = shown["replicas"][0]
    assert shown["state"] == "Completed", shown
    assert replica["node"].lower() == address.lower() and replica["attempt"] >= 1

    own = miner.executor.task_data_dir(task_id, 0)
    assert (own / "resumed.txt").read_bytes() == b"".join(data[p] for p in sorted(data))

    async def all_synced() -> dict[str, dict[str, Any]] | None:
        listed = await _files(world, task_id)
        return listed if set(listed) == set(data) | {"resumed.txt"} else None

    listed = await eventually(all_synced, timeout_s=30, what="the final sync of the new attempt")
    for path, content in {**data, "resumed.txt": (own / "resumed.txt").read_bytes()}.items():
        assert listed[path]["sha256"] == hashlib.sha256(content).hexdigest()


async def _truthy(value: Any) -> Any:
    return value


async def _state(world: World, address: str, state: str) -> bool:
    return await world.node_state(address) == state
