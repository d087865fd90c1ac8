"""Per-replica /data on a node: two replicas of one task never share a directory (issue 13).

Real Docker: two replicas of one persistent task on one miner write the same path,
/data/result.txt; each keeps its own file, and the miner's manifest and blob routes
serve each replica its own. An older miner's shared directory stays replica 0's.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import ReplicaState
from prime.roles.miner import core
from prime.roles.miner.executor import DockerExecutor
from prime.roles.miner.tasks_api import TasksApi

SCRIPT = 'echo "replica $PRIME_REPLICA" > /data/result.txt'


@pytest.fixture
def executor(docker_client: docker.DockerClient, docker_node_address: str, tmp_path: Path) -> DockerExecutor:
    return DockerExecutor(docker_client, tmp_path / "miner", docker_node_address, network_mode="none", pull_backoff_s=0.05,
                          stop_timeout_s=0)


def _placement(image: str, task_id: str, replica: int) -> core.Placement:
    entry = {"id": task_id, "replica": replica, "attempt": 0, "gpu_indices": [],
             "spec": {"image": image, "command": ["sh", "-c", SCRIPT], "persistent": True, "replicas": 2}}
    return core.place(DesiredReplica.from_json(entry), ())


async def _finished(executor: DockerExecutor, task_id: str, replica: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await executor.status(task_id, replica)
        if status is not None and status.state in (ReplicaState.COMPLETED, ReplicaState.FAILED):
            assert status.state == ReplicaState.COMPLETED, status.reason
            return
        assert time.monotonic() < deadline, f"replica {replica} did not finish"
        await asyncio.sleep(0.05)


async def test_two_replicas_on_one_node_each_keep_their_own_file(executor: DockerExecutor, busybox_image: str) -> None:
    task_id = "t-" + uuid.uuid4().hex[:12]
    try:
        for replica in (0, 1):
            await executor.start(_placement(busybox_image, task_id, replica))
        for replica in (0, 1):
            await _finished(executor, task_id, replica)
        for replica in (0, 1):
            data = executor.task_data_dir(task_id, replica)
            assert data == executor.data_dir / "tasks" / task_id / f"r{replica}" / "data"
            assert (data / "result.txt").read_text() == f"replica {replica}\n"

        # The miner's routes serve each replica its own /data.
        api = TasksApi(executor, converger=None)  # type: ignore[arg-type]  # the storage routes use only the executor
        app = web.Application()
        app.router.add_get("/tasks/{id}/manifest", api.manifest)
        app.router.add_get("/tasks/{id}/blobs/{sha256}", api.blob)
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            for replica in (0, 1):
                payload = f"replica {replica}\n".encode()
                digest = hashlib.sha256(payload).hexdigest()
                async with session.get(server.make_url(f"/tasks/{task_id}/manifest"), params={"replica": replica}) as resp:
                    assert resp.status == 200
                    answer: Any = await resp.json()
                assert answer["replica"] == replica and answer["final"] is True
                assert answer["files"] == [{"path": "result.txt", "size": len(payload), "sha256": digest}]
                async with session.get(server.make_url(f"/tasks/{task_id}/blobs/{digest}"), params={"replica": replica}) as resp:
                    assert resp.status == 200 and await resp.read() == payload
                other = hashlib.sha256(f"replica {1 - replica}\n".encode()).hexdigest()
                async with session.get(server.make_url(f"/tasks/{task_id}/blobs/{other}"), params={"replica": replica}) as resp:
                    assert resp.status == 404  # the other replica's file is not this replica's to serve
    finally:
        await executor.stop(task_id)


def test_an_older_miners_shared_directory_stays_replica_zeros(tmp_path: Path) -> None:
    executor = DockerExecutor.__new__(DockerExecutor)  # only the path helpers: no engine needed
    executor.data_dir = tmp_path
    legacy = tmp_path / "tasks" / "job" / "data"
    assert executor.task_data_dir("job", 0) == tmp_path / "tasks" / "job" / "r0" / "data"  # nothing yet: the new layout
    legacy.mkdir(parents=True)
    assert executor.task_data_dir("job", 0) == legacy  # an older miner's data: replica 0 keeps it
    assert executor.task_data_dir("job", 1) == tmp_path / "tasks" / "job" / "r1" / "data"  # other replicas start apart
    (tmp_path / "tasks" / "job" / "r0" / "data").mkdir(parents=True)
    assert executor.task_data_dir("job", 0) == tmp_path / "tasks" / "job" / "r0" / "data"  # the new one wins once it exists
