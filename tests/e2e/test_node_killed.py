"""kill -9 of the node running a replica, its container left running (issue 13 acceptance).

Real parts only: anvil, a discovery process, a `prime master start` process and two
`prime miner start` processes (own node and provider keys, own data directories, one Docker
engine). A persistent replica runs on one miner, which writes a checkpoint file every 0.3 s;
after some of them are synced the miner is killed with SIGKILL, its container keeps running.

- the replica is rescheduled to the other miner as attempt 1, which starts from the last synced
  /data (every file synced before the kill is in its directory with the same content, and the
  task lists them from inside its container), and completes;
- no synced file is lost: the master's copy after the new attempt's final sync holds every file
  synced before the kill (same sha256), next to what the new attempt wrote;
- the orphan container finishes on its own (exit 0) while its miner is down; the killed miner is
  started again, adopts it and lists it Completed, and heartbeats: that report never counts for the
  replica (same node, same attempt, still Running until the new attempt finishes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import pytest

from prime.chain.types import Requirements
from tests.e2e.support import MinerProcess as Miner
from tests.e2e.support import node_containers, remove_containers
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import World, eventually, make_world, signed_call

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(300)]

# Attempt 0 writes a checkpoint file every 0.3 s until /data/stop appears, then exits 0 on its own.
# A later attempt lists the checkpoint it found (its /data as seeded from the master's copy), then
# waits for /data/go and exits 0.
SCRIPT = (
    "trap 'exit 0' TERM; mkdir -p /data/step; "
    'if [ "$PRIME_ATTEMPT" != 0 ]; then ls /data/step > /data/resumed.txt; '
    "while [ ! -f /data/go ]; do sleep 0.2 & wait $!; done; echo resumed done; exit 0; fi; "
    'i=0; while [ ! -f /data/stop ]; do echo "step $i" > /data/step/$i.txt; i=$((i+1)); sleep 0.3 & wait $!; done; '
    "echo orphan done; exit 0"
)


async def _task(world: World, task_id: str) -> dict[str, Any]:
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}")
    assert status == 200, answer
    return answer


async def _files(world: World, task_id: str) -> dict[str, str]:
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files")
    assert status == 200, answer
    return {f["path"]: f["sha256"] for f in answer["files"]}


async def _node(world: World, address: str) -> dict[str, Any]:
    return (await world.nodes()).get(address) or {}


@contextlib.asynccontextmanager
async def _watched(world: World, task_id: str, seen: list[tuple[str, str | None, int, str]]) -> AsyncIterator[None]:
    """Record (replica state, node, attempt, task state) every 0.2 s while the block runs."""
    async def watch() -> None:
        while True:
            shown = await _task(world, task_id)
            r = shown["replicas"][0]
            seen.append((r["state"], r["node"], r["attempt"], shown["state"]))
            await asyncio.sleep(0.2)

    watcher = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_a_killed_nodes_replica_resumes_elsewhere_from_its_synced_data_and_the_orphan_never_counts(
        role_processes: RoleProcesses, anvil, deployment, docker_client: docker.DockerClient, busybox_image: str,
        tmp_path: Path) -> None:
    world = await make_world(anvil, deployment, role_processes, tmp_path / "world", requirements=Requirements(min_gpus=0))
    first = Miner("miner-a", world, anvil, deployment, role_processes, tmp_path / "a")
    second = Miner("miner-b", world, anvil, deployment, role_processes, tmp_path / "b")
    try:
        await asyncio.gather(first.process.start_async(timeout_s=90), second.process.start_async(timeout_s=90))
        for miner, mark in ((first, b"\x51"), (second, b"\x52")):
            await world.validator_client.report_validation(miner.address, True, mark * 32)
        for miner in (first, second):
            await eventually(lambda m=miner: _healthy(world, m.address), timeout_s=90, what=f"{miner.process.name} Healthy")
        await _scenario(world, first, second, docker_client, busybox_image)
    finally:
        for miner in (first, second):
            remove_containers(docker_client, node_containers(docker_client, miner.address))
        await world.close()


async def _healthy(world: World, address: str) -> bool:
    return (await _node(world, address)).get("state") == "Healthy"


async def _scenario(world: World, first: Miner, second: Miner, docker_client: docker.DockerClient, image: str) -> None:
    spec = {"image": image, "command": ["sh", "-c", SCRIPT], "gpus": 0, "persistent": True}
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
    assert status == 201, task
    task_id = task["id"]

    async def running() -> dict[str, Any] | None:
        r = (await _task(world, task_id))["replicas"][0]
        return r if r["state"] == "Running" and r["attempt"] == 0 else None

    placed = await eventually(running, timeout_s=60, what="attempt 0 Running")
    holder, spare = (first, second) if placed["node"].lower() == first.address.lower() else (second, first)

    async def some_synced() -> dict[str, str] | None:
        files = await _files(world, task_id)
        return files if sum(p.startswith("step/") for p in files) >= 5 else None

    synced = await eventually(some_synced, timeout_s=60, what="checkpoint files synced from the first node")

    # kill -9: the miner process dies at once; Docker keeps its container running.
    holder.process.kill()
    orphan = [c for c in node_containers(docker_client, holder.address) if c["Labels"].get("prime.task_id") == task_id]
    assert [c["State"] for c in orphan] == ["running"], orphan
    seen: list[tuple[str, str | None, int, str]] = []
    async with _watched(world, task_id, seen):
        async def resumed() -> dict[str, Any] | None:
            r = (await _task(world, task_id))["replicas"][0]
            return r if r["state"] == "Running" and r["attempt"] >= 1 else None

        moved = await eventually(resumed, timeout_s=60, what="the replica Running again after its node died")
        assert moved["node"].lower() == spare.address.lower() and moved["attempt"] == 1, moved
        assert (await _node(world, holder.address)).get("state") == "Dead"

        # Its /data holds every file synced before the kill, as synced; the task saw them all.
        new_dir = spare.replica_dir(task_id)
        await eventually(lambda: _exists(new_dir / "resumed.txt"), timeout_s=30, what="the new attempt's listing")
        for path, digest in synced.items():
            assert hashlib.sha256((new_dir / path).read_bytes()).hexdigest() == digest, path
        listed = set((new_dir / "resumed.txt").read_text().split())
        assert {p.removeprefix("step/") for p in synced if p.startswith("step/")} <= listed, listed

        # The orphan finishes on its own (exit 0) while its miner is down...
        (holder.replica_dir(task_id) / "stop").write_text("")
        (container,) = [docker_client.containers.get(c["Id"]) for c in orphan]
        assert container.wait(timeout=30)["StatusCode"] == 0
        # ...and the killed miner comes back, adopts it (Completed in its own list) and heartbeats.
        await holder.process.start_async(timeout_s=90)
        await eventually(lambda: _healthy(world, holder.address), timeout_s=60, what="the restarted node Healthy")
        status, own = await signed_call(world.master_account, "GET", holder.process.base_url, "/tasks")
        assert status == 200, own
        assert [(t["task_id"], t["state"]) for t in own["tasks"]] == [(task_id, "Completed")], own
        beat = (await _node(world, holder.address))["last_heartbeat"]

        async def beats_later() -> bool:
            return (await _node(world, holder.address))["last_heartbeat"] >= beat + 3  # three more heartbeats
        await eventually(beats_later, timeout_s=30, what="heartbeats of the restarted node")
        r = (await _task(world, task_id))["replicas"][0]
        assert (r["state"], r["node"].lower(), r["attempt"]) == ("Running", spare.address.lower(), 1), r

        # The new attempt completes on the node it moved to.
        (new_dir / "go").write_text("")

        async def completed() -> dict[str, Any] | None:
            shown = await _task(world, task_id)
            return shown if shown["state"] in ("Completed", "Failed") else None

        shown = await eventually(completed, timeout_s=60, what="the task to finish")
    r = shown["replicas"][0]
    assert (shown["state"], r["node"].lower(), r["attempt"], r["exit_code"]) == ("Completed", spare.address.lower(), 1, 0), shown
    assert r["error"] is None, r  # no note of the lost attempt once it completed
    # While it moved, the replica never went back to the dead node or to attempt 0, and no report
    # made it final before the new attempt completed on the node it moved to.
    attempts = [attempt for _, _, attempt, _ in seen]
    assert attempts == sorted(attempts) and set(attempts) <= {0, 1}, seen
    spare_node = spare.address.lower()
    assert all(node is None or node.lower() == spare_node for _, node, attempt, _ in seen if attempt == 1), seen
    finals = {(state, (node or "").lower(), attempt) for state, node, attempt, _ in seen
              if state in ("Completed", "Failed", "Stopped")}
    assert finals <= {("Completed", spare_node, 1)}, seen
    assert not any(task_state == "Failed" for *_, task_state in seen), seen

    # No synced file lost: the final copy holds every file synced before the kill, next to the new ones.
    async def final_synced() -> dict[str, str] | None:
        files = await _files(world, task_id)
        return files if "resumed.txt" in files and "go" in files else None

    final = await eventually(final_synced, timeout_s=30, what="the new attempt's final sync")
    for path, digest in synced.items():
        assert final.get(path) == digest, path


async def _exists(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0
