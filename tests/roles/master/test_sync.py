"""Storage sync of a real master process from a (fake) miner's manifest and blob routes: files come
down with matching sha256, unchanged data is never fetched twice (asserted on /metrics and on what
the miner served), a final sync runs once the replica finished and survives a kill -9, and file
paths that climb out of the task are 400."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

import pytest_asyncio

from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import FakeMiner, World, eventually, make_world, signed_call


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-sync"))
    miner = await w.new_miner(anvil=anvil)
    await eventually(lambda: _has_master(miner), what="the invite")
    miner.start_heartbeats(0.2)
    await eventually(lambda: _healthy(w, miner), what="Healthy")
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


async def _download(world: World, task_id: str, path: str, replica: int = 0) -> tuple[int, bytes]:
    return await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files/{path}?replica={replica}", raw=True)


async def _manifests_after(miner: FakeMiner, count: int) -> bool:
    return miner.received.manifests >= count


async def test_persistent_files_are_synced_once_and_downloadable(world: World) -> None:
    miner = world.miners[0]
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks",
                                     json.dumps({"image": "busybox", "gpus": 1, "persistent": True}).encode())
    assert status == 201, task
    task_id = task["id"]
    big = os.urandom(300_000)
    data = {"a.txt": b"hello", "dir/b.bin": big, "empty": b""}
    miner.files[(task_id, 0)] = dict(data)
    miner.report(task_id, 0, "Running")

    async def all_listed() -> bool:
        return set(await _files(world, task_id)) == set(data)

    await eventually(all_listed, what="the first sync")
    listed = await _files(world, task_id)
    for path, content in data.items():
        assert listed[path]["sha256"] == hashlib.sha256(content).hexdigest() and listed[path]["size"] == len(content)
        status, body = await _download(world, task_id, path)
        assert status == 200 and body == content and hashlib.sha256(body).hexdigest() == listed[path]["sha256"]
    blobs = await world.metric("prime_master_sync_blobs_fetched_total")
    fetched_bytes = await world.metric("prime_master_sync_bytes_fetched_total")
    assert blobs == 2 and fetched_bytes == 5 + len(big)  # the empty file needs no fetch
    assert sorted(miner.received.blobs) == sorted(hashlib.sha256(c).hexdigest() for c in (b"hello", big))

    # Unchanged data: later syncs read the manifest and fetch nothing.
    seen = miner.received.manifests
    await eventually(lambda: _manifests_after(miner, seen + 2), what="two more syncs")
    assert await world.metric("prime_master_sync_blobs_fetched_total") == blobs
    assert len(miner.received.blobs) == 2

    # A copy of known content costs nothing; one changed file is one blob.
    miner.files[(task_id, 0)]["copy.txt"] = b"hello"
    miner.files[(task_id, 0)]["dir/b.bin"] = big[::-1]

    async def changed_synced() -> bool:
        files = await _files(world, task_id)
        return "copy.txt" in files and files["dir/b.bin"]["sha256"] == hashlib.sha256(big[::-1]).hexdigest()

    await eventually(changed_synced, what="the changed files")
    assert await world.metric("prime_master_sync_blobs_fetched_total") == blobs + 1
    status, body = await _download(world, task_id, "dir/b.bin")
    assert body == big[::-1]

    # Path traversal and other bad paths: 400; unknown files: 404.
    for bad in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "%2Fetc%2Fpasswd", "a/..%2F..%2Fx", "a%00b"):
        status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files/{bad}")
        assert status == 400 and answer["error"] == "invalid_request", (bad, status, answer)
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files/nope.txt")
    assert status == 404 and answer["error"] == "file_not_found"
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files/a.txt?replica=x")
    assert status == 400

    # The replica finishes: one final sync picks up what it wrote last; then syncing stops.
    miner.files[(task_id, 0)]["result.txt"] = b"done"
    miner.final[(task_id, 0)] = True
    miner.report(task_id, 0, "Completed", 0)

    async def final_synced() -> bool:
        return "result.txt" in await _files(world, task_id)

    await eventually(final_synced, what="the final sync")
    await asyncio.sleep(0.3)
    settled = miner.received.manifests
    await asyncio.sleep(1.5)  # three sync intervals
    assert miner.received.manifests == settled  # a finished replica is not synced again

    # kill -9 and restart: the files are still there and nothing is fetched again.
    fetched = len(miner.received.blobs)
    world.master.kill()
    await world.master.start_async()
    status, body = await _download(world, task_id, "result.txt")
    assert status == 200 and body == b"done"
    assert set(await _files(world, task_id)) == {"a.txt", "dir/b.bin", "empty", "copy.txt", "result.txt"}
    await asyncio.sleep(1.5)
    assert miner.received.manifests == settled and len(miner.received.blobs) == fetched
    assert await world.metric("prime_master_sync_blobs_fetched_total") == 0  # counters are per process


async def test_files_of_a_task_without_persistent_storage(world: World) -> None:
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps({"image": "busybox"}).encode())
    assert status == 201
    assert await _files(world, task["id"]) == {}
    status, _ = await _download(world, task["id"], "x")
    assert status == 404
