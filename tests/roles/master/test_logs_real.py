"""Issue 13 acceptance: a finished task's logs (restart never and on-failure) are readable through
the master after the miner is stopped and its containers removed. A real master process, a real
miner (MinerNode) with real Docker containers; the on-failure task fails once, is restarted by the
node in the same container, and completes: both runs' lines are kept, as attempt 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from eth_account import Account

from prime.chain.types import Requirements
from tests.fixtures.docker import remove_prime_containers
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import World, eventually, make_world, signed_call
from tests.support.miner_env import running_node

pytestmark = pytest.mark.docker

NEVER = ["sh", "-c", "for i in 1 2 3; do echo never $i; done; echo complaint >&2"]
# Fails on its first run, completes on the node's restart of the same container (/data survives it).
FLAKY = ["sh", "-c", "if [ -f /data/ran ]; then echo second run; exit 0; fi; touch /data/ran; echo first run; exit 3"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-logs-real"),
                         requirements=Requirements(min_gpus=0))
    yield w
    await w.close()


async def _logs(world: World, task_id: str, query: str = "") -> list[dict[str, Any]]:
    status, raw = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs{query}", raw=True)
    assert status == 200, raw
    return [json.loads(line) for line in raw.splitlines()]


async def _task(world: World, task_id: str) -> dict[str, Any]:
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}")
    assert status == 200, answer
    return answer


async def test_logs_of_finished_tasks_outlive_the_miner_and_its_containers(
        world: World, anvil, deployment, docker_client, busybox_image: str, tmp_path: Path) -> None:
    node = Account.create()
    anvil.set_balance(node.address, 10 * 10**18)
    specs = {
        "never": {"image": busybox_image, "command": NEVER, "gpus": 0},
        "flaky": {"image": busybox_image, "command": FLAKY, "gpus": 0, "persistent": True, "restart": "on-failure"},
    }
    expected = {"never": {("stdout", "never 1"), ("stdout", "never 2"), ("stdout", "never 3"), ("stderr", "complaint")},
                "flaky": {("stdout", "first run"), ("stdout", "second run")}}
    ids: dict[str, str] = {}
    async with running_node(anvil, deployment, world.run_id, node, tmp_path / "miner") as miner:
        try:
            await world.validator_client.report_validation(node.address, True, b"\x44" * 32)
            await eventually(lambda: _healthy(world, node.address), timeout_s=60, what="the real miner Healthy")
            for name, spec in specs.items():
                status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
                assert status == 201, task
                ids[name] = task["id"]

            for name, task_id in ids.items():
                async def finished(task_id: str = task_id) -> dict[str, Any] | None:
                    shown = await _task(world, task_id)
                    return shown if shown["state"] in ("Completed", "Failed") else None

                shown = await eventually(finished, timeout_s=90, what=f"task {name} finished")
                assert shown["state"] == "Completed", shown
            assert (await _task(world, ids["flaky"]))["replicas"][0]["restarts"] >= 1

            async def kept(name: str) -> bool:
                return {(x["stream"], x["line"]) for x in await _logs(world, ids[name])} == expected[name]

            for name in ids:
                await eventually(lambda name=name: kept(name), what=f"task {name}'s lines at the master")
        finally:
            for task_id in ids.values():
                await miner.executor.stop(task_id)
    remove_prime_containers(docker_client, node.address)
    assert not docker_client.containers.list(all=True, filters={"label": f"prime.node={node.address}"})

    # The node is gone with its containers: the master still has every line, once, tagged.
    for name, task_id in ids.items():
        lines = await _logs(world, task_id)
        assert sorted((x["stream"], x["line"]) for x in lines) == sorted(expected[name])
        assert {(x["replica"], x["attempt"], x["node"].lower()) for x in lines} == {(0, 0, node.address.lower())}
        assert sorted(x["seq"] for x in lines) == list(range(len(expected[name])))
    flaky = await _logs(world, ids["flaky"], "?attempt=0")
    assert [x["line"] for x in flaky] == ["first run", "second run"]  # in time order, across the restart
    assert await _logs(world, ids["flaky"], "?attempt=1") == []
    assert [x["line"] for x in await _logs(world, ids["flaky"], "?tail=1&replica=0")] == ["second run"]
    status, answer = await signed_call(world.owner, "GET", world.url, f"/tasks/{ids['never']}/logs?attempt=x")
    assert status == 400 and answer["detail"]["field"] == "attempt"


async def _healthy(world: World, address: str) -> bool:
    return await world.node_state(address) == "Healthy"
