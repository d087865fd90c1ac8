"""A miner whose node has no master any more stops its own task containers (``release.py``).

Real anvil, a real ``prime master start`` process, a real miner (MinerNode, real Docker) running a
persistent task:

- the master is SIGKILLed, then the run ends on chain: nobody is left to stop the task, so the
  miner stops it once its release grace is over, stays up and keeps the task's files;
- the node is ejected on chain while its task runs: the miner ends with the ejection and leaves no
  container of the run behind.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import docker
import pytest
import pytest_asyncio
from eth_account import Account

from prime.chain.client import RegistryClient
from prime.chain.types import NodeStatus, Requirements
from prime.errors import PrimeError
from prime.roles.miner.containers import LABEL_TASK
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import World, eventually, make_world, signed_call
from tests.support.miner_env import running_node

TASK = "echo kept > /data/out.txt; trap 'exit 0' TERM; sleep 300 & wait"


@pytest_asyncio.fixture(loop_scope="session")
async def world(anvil, deployment, role_processes: RoleProcesses, tmp_path_factory):
    """A fresh run and master for each test (function scope): the first kills its master and ends its run."""
    w = await make_world(anvil, deployment, role_processes, tmp_path_factory.mktemp("release"),
                         requirements=Requirements(min_gpus=0))
    yield w
    await w.close()


def _containers(client: docker.DockerClient, task_id: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"{LABEL_TASK}={task_id}"}, ignore_removed=True)


async def _running_task(world: World, miner: Any, node: Any, busybox_image: str, docker_client: docker.DockerClient) -> str:
    await world.validator_client.report_validation(node.address, True, b"\x45" * 32)
    await eventually(lambda: _healthy(world, node.address), timeout_s=60, what="the miner Healthy")
    spec = {"image": busybox_image, "command": ["sh", "-c", TASK], "gpus": 0, "persistent": True}
    status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
    assert status == 201, task
    task_id = task["id"]

    async def running() -> bool:
        return any(c.status == "running" for c in _containers(docker_client, task_id)) and \
            miner.executor.task_data_dir(task_id).joinpath("out.txt").exists()

    await eventually(running, timeout_s=60, what="the task's container running on the miner")
    return str(task_id)


async def _healthy(world: World, address: str) -> bool:
    return await world.node_state(address) == "Healthy"


async def test_run_ended_with_its_master_gone_the_miner_stops_the_task_after_the_grace(
        world: World, anvil, deployment, docker_client, busybox_image: str, tmp_path: Path) -> None:
    node = Account.create()
    anvil.set_balance(node.address, 10 * 10**18)
    async with running_node(anvil, deployment, world.run_id, node, tmp_path / "miner", release_grace_s=2.0) as miner:
        task_id = await _running_task(world, miner, node, busybox_image, docker_client)
        world.master.kill()  # gone for good: nobody will send the stop
        await world.owner_client.end_run(world.run_id)
        reader = await RegistryClient.connect(world.rpc_url, world.deployment)
        try:
            assert await reader.node_status(node.address) == NodeStatus.RELEASED
        finally:
            await reader.close()

        async def stopped_by_the_miner() -> bool:
            return not _containers(docker_client, task_id) and "Stopped 1 task(s)" in miner.console.file.getvalue()

        await eventually(stopped_by_the_miner, timeout_s=60, what="the miner stopping the orphaned task")
        console = miner.console.file.getvalue()
        assert task_id in console and f"run {world.run_id} ended on chain" in console, console
        assert not miner._stopped.is_set()  # still up: it serves the task's files
        assert miner.executor.task_data_dir(task_id).joinpath("out.txt").read_text() == "kept\n"
        # nothing restarts it: the last desired list still named it, yet no container comes back
        await miner.converger.supervise()
        await asyncio.sleep(1.5)  # a few heartbeat and supervise rounds
        assert _containers(docker_client, task_id) == []
        assert console.count("Stopped 1 task(s)") == 1  # once, not on every loop round


async def test_an_ejected_miner_ends_and_leaves_no_container_of_the_run(
        world: World, anvil, deployment, docker_client, busybox_image: str, tmp_path: Path) -> None:
    node = Account.create()
    anvil.set_balance(node.address, 10 * 10**18)
    master = await RegistryClient.connect(world.rpc_url, world.deployment, world.master_account)
    try:
        async with running_node(anvil, deployment, world.run_id, node, tmp_path / "miner") as miner:
            task_id = await _running_task(world, miner, node, busybox_image, docker_client)
            await master.eject_node(world.run_id, node.address)
            with pytest.raises(PrimeError, match="ejected"):
                await asyncio.wait_for(miner.wait(), 60)
            assert any(c.status == "running" for c in _containers(docker_client, task_id))  # until the miner closes
        assert _containers(docker_client, task_id) == []
        assert "Stopped 1 task(s)" in miner.console.file.getvalue()
        assert miner.executor.task_data_dir(task_id).joinpath("out.txt").read_text() == "kept\n"
    finally:
        await master.close()
