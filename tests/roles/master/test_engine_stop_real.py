"""The engine stops a running task (issue 13 acceptance, "dockerd stopped while a task runs"):
a real master process, a real miner (MinerNode, real Docker); the replica is Lost and
rescheduled, never Completed.

Stopping the shared dockerd would disturb every other test on this machine, so the test does to
the task's container what dockerd does to each container when it shuts down or restarts: the
engine sends it its stop signal (SIGTERM) without the miner asking, and the task's process exits
0 on it. ``docker kill --signal TERM`` is that very signal from the engine (the miner sees a
``kill`` it has no stop intent for); after a real restart the miner sees its event stream break
instead (the outage half of the rule, tested without Docker in tests/roles/miner/test_exits.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_asyncio
from eth_account import Account

from prime.chain.types import Requirements
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import World, eventually, make_world, signed_call
from tests.support.miner_env import running_node

# Exits 0 on SIGTERM; otherwise 60 steps of a second (a task that would report success).
SCRIPT = "trap 'echo term; exit 0' TERM; i=0; while [ $i -lt 60 ]; do i=$((i+1)); sleep 1 & wait $!; done"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-engine-stop"),
                         requirements=Requirements(min_gpus=0))
    yield w
    await w.close()


async def _task(world: World, task_id: str) -> dict[str, Any]:
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}")
    assert status == 200, answer
    return answer


async def test_a_task_the_engine_stops_is_lost_and_rescheduled_never_completed(
        world: World, anvil, deployment, docker_client, busybox_image: str, tmp_path: Path) -> None:
    node = Account.create()
    anvil.set_balance(node.address, 10 * 10**18)
    async with running_node(anvil, deployment, world.run_id, node, tmp_path / "miner") as miner:
        await world.validator_client.report_validation(node.address, True, b"\x44" * 32)

        async def healthy() -> bool:
            return await world.node_state(node.address) == "Healthy"

        await eventually(healthy, timeout_s=60, what="the miner Healthy")
        spec = {"image": busybox_image, "command": ["sh", "-c", SCRIPT], "gpus": 0}
        status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
        assert status == 201, task
        task_id = task["id"]
        seen: list[tuple[str, int]] = []

        async def replica(state: str, attempt: int) -> dict[str, Any] | None:
            shown = await _task(world, task_id)
            r = shown["replicas"][0]
            seen.append((r["state"], r["attempt"]))
            assert shown["state"] not in ("Completed", "Failed"), (shown, seen)  # never a false success
            return r if (r["state"], r["attempt"]) == (state, attempt) else None

        try:
            await eventually(lambda: replica("Running", 0), timeout_s=60, what="attempt 0 Running")
            (container,) = docker_client.containers.list(filters={"label": [f"prime.task_id={task_id}"]})
            container.kill(signal="SIGTERM")  # the engine's stop, not the miner's
            assert container.wait(timeout=30)["StatusCode"] == 0  # what Docker alone says: a success

            moved = await eventually(lambda: replica("Running", 1), timeout_s=60, what="attempt 1 Running")
            assert moved["node"].lower() == node.address.lower()
            assert "Lost on node" in (moved["error"] or "") and "signal 15" in (moved["error"] or ""), moved
            assert not any(state in ("Completed", "Failed") for state, _ in seen), seen
        finally:
            await signed_call(world.owner, "DELETE", world.url, f"/tasks/{task_id}")
            await miner.executor.stop(task_id)


async def test_an_image_that_can_never_be_pulled_fails_the_replica_at_the_master_with_the_miners_reason(
        world: World, anvil, deployment, tmp_path: Path) -> None:
    """A registry the miner refuses (an IP literal: never contacted) with restart on-failure: no retry
    can cure it, so the replica is Failed at the master with the miner's reason, not left Pulling."""
    node = Account.create()
    anvil.set_balance(node.address, 10 * 10**18)
    async with running_node(anvil, deployment, world.run_id, node, tmp_path / "miner"):
        await world.validator_client.report_validation(node.address, True, b"\x45" * 32)

        async def healthy() -> bool:
            return await world.node_state(node.address) == "Healthy"

        await eventually(healthy, timeout_s=60, what="the miner Healthy")
        spec = {"image": "127.0.0.1:9/never/there:1", "gpus": 0, "restart": "on-failure"}
        status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
        assert status == 201, task

        async def failed() -> dict[str, Any] | None:
            shown = await _task(world, task["id"])
            return shown if shown["replicas"][0]["node"] and shown["state"] == "Failed" else None

        shown = await eventually(failed, timeout_s=60, what="the replica Failed at the master")
        assert "does not pull" in (shown["replicas"][0]["error"] or ""), shown
