"""A replica whose node dies, rescheduled on another (issue 13): a real master process, fake miners
for the heartbeats and syncs, and for the new attempt the miner's real seeding and Docker executor.

The files already synced stay readable through ``GET /tasks/{id}/files`` when the new attempt's
first manifest is empty (a sync never erases); the new attempt's container then starts with those
files in its /data, fetched from the master's seed routes (which answer only the node the replica
is assigned to), and what it writes next is synced over them."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import docker
import pytest_asyncio

from prime.auth.client import SignedClient
from prime.auth.signing import Domain
from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import ReplicaState
from prime.roles.miner import core
from prime.roles.miner.executor import DockerExecutor
from prime.roles.miner.seeding import Seeder
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import FakeMiner, World, eventually, make_world, signed_call


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-resume"))
    for _ in range(2):
        miner = await w.new_miner(anvil=anvil)
        await eventually(lambda m=miner: _has_master(m), what="the invite")
        miner.start_heartbeats(0.2)
    for miner in w.miners:
        await eventually(lambda m=miner: _healthy(w, m), what="Healthy")
    yield w
    await w.close()


async def _has_master(miner: FakeMiner) -> bool:
    return miner.master_url is not None


async def _healthy(world: World, miner: FakeMiner) -> bool:
    return await world.node_state(miner.address) == "Healthy"


async def _files(world: World, task_id: str) -> dict[str, dict[str, Any]]:
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files")
    assert status == 200, answer
    return {f["path"]: f for f in answer["files"]}


def _started(miner: FakeMiner, task_id: str) -> list[dict[str, Any]]:
    return [s for s in miner.received.starts if s["id"] == task_id]


RESUME = "cat /data/step/*.txt > /data/resumed.txt"


async def test_a_rescheduled_replica_erases_nothing_and_resumes_from_its_synced_data(
        world: World, docker_client: docker.DockerClient, docker_node_address: str, busybox_image: str, tmp_path) -> None:
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks",
                                     json.dumps({"image": "busybox", "gpus": 1, "persistent": True}).encode())
    assert status == 201, task
    task_id = task["id"]

    async def placed() -> FakeMiner | None:
        return next((m for m in world.miners if _started(m, task_id)), None)

    first = await eventually(placed, what="the first placement")
    second = next(m for m in world.miners if m is not first)
    data = {f"step/{i}.txt": f"step {i}\n".encode() for i in range(10)}
    first.files[(task_id, 0)] = dict(data)
    first.report(task_id, 0, "Running")

    async def all_synced() -> bool:
        return set(await _files(world, task_id)) == set(data)

    await eventually(all_synced, what="the first sync")

    first.stop_heartbeats()  # the node dies (its container, if any, left running)
    try:
        async def rescheduled() -> bool:
            return bool(_started(second, task_id))

        await eventually(rescheduled, timeout_s=30, what="the reschedule")
        start = _started(second, task_id)[-1]
        assert start["attempt"] >= 1
        second.files[(task_id, 0)] = {}  # the new attempt's /data is empty
        second.report(task_id, 0, "Running")
        seen = second.received.manifests
        await eventually(lambda: _manifests(second, seen + 2), what="two syncs of the new attempt")

        listed = await _files(world, task_id)
        assert set(listed) == set(data)
        for path, content in data.items():
            assert listed[path]["sha256"] == hashlib.sha256(content).hexdigest()
            status, body = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files/{path}?replica=0",
                                             raw=True)
            assert status == 200 and body == content

        # The seed routes answer only the node the replica is assigned to now (not the node it left).
        status, answer = await signed_call(first.node, "GET", world.url, f"/tasks/{task_id}/seed?replica=0")
        assert status == 403, answer
        status, answer = await signed_call(second.node, "GET", world.url, f"/tasks/{task_id}/seed?replica=0")
        assert status == 200 and {f["path"] for f in answer["files"]} == set(data)

        # The new attempt, as the second node's miner runs it: seeded from the master, then started.
        executor = DockerExecutor(docker_client, tmp_path / "miner", docker_node_address, network_mode="none",
                                  pull_backoff_s=0.05, stop_timeout_s=0)
        async with SignedClient(second.node, domain=Domain.of(world.deployment)) as client:
            executor.seeder = Seeder(client, lambda: (world.url, world.master_account.address))
            entry = {"id": task_id, "replica": 0, "attempt": start["attempt"], "gpu_indices": [],
                     "spec": {"image": busybox_image, "command": ["sh", "-c", RESUME], "persistent": True}}
            await executor.start(core.place(DesiredReplica.from_json(entry), ()))

            async def finished() -> bool:
                status = await executor.status(task_id, 0)
                return status is not None and status.state in (ReplicaState.COMPLETED, ReplicaState.FAILED)

            await eventually(finished, what="the new attempt's container")
        assert (await executor.status(task_id, 0)).state == ReplicaState.COMPLETED
        own = executor.task_data_dir(task_id, 0)
        assert (own / "resumed.txt").read_bytes() == b"".join(data[p] for p in sorted(data))
        await executor.stop(task_id)

        # What the new attempt wrote is synced over the old files; none of those is lost.
        second.files[(task_id, 0)] = {str(p.relative_to(own)): p.read_bytes() for p in own.rglob("*") if p.is_file()}

        async def resumed_synced() -> bool:
            return set(await _files(world, task_id)) == set(data) | {"resumed.txt"}

        await eventually(resumed_synced, what="the new attempt's files")
    finally:
        first.start_heartbeats(0.2)
        second.report(task_id, 0, "Completed", 0)
        await asyncio.sleep(0)


async def _manifests(miner: FakeMiner, count: int) -> bool:
    return miner.received.manifests >= count
