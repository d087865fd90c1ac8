"""Issue 14 acceptance: after endRun every node of the run withdraws its stake at once, without
leaving; the master and the miner log the end, the master stops the replica, and its final files
and logs stay readable through the master.

Real anvil, a real ``prime master start`` process, a real miner (MinerNode, real Docker) running a
persistent task; a second node approved but never joined (a fake miner refusing invites) and a
third only registered."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest_asyncio
from eth_account import Account

from prime.chain.client import RegistryClient
from prime.chain.types import NodeStatus, Requirements
from tests.fixtures.chain import DEFAULT_SPECS
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import World, eventually, make_world, signed_call
from tests.support.miner_env import running_node

TASK = "echo started; echo kept > /data/out.txt; trap 'echo stopping; exit 0' TERM; sleep 300 & wait"


@pytest_asyncio.fixture(loop_scope="session")
async def world(anvil, deployment, role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, role_processes, tmp_path_factory.mktemp("run-end"),
                         requirements=Requirements(min_gpus=0))
    yield w
    await w.close()


async def _get(world: World, path: str) -> Any:
    status, answer = await signed_call(world.owner, "GET", world.url, path)
    assert status == 200, answer
    return answer


async def test_end_run_releases_every_node_and_stops_replicas_keeping_files_and_logs(
        world: World, anvil, deployment, docker_client, busybox_image: str, tmp_path: Path) -> None:
    reader = await RegistryClient.connect(world.rpc_url, world.deployment)
    approved = await world.new_miner(anvil=anvil)  # approved, but refuses every invite: never joins
    approved.refuse_invites = True
    registered, registered_provider = Account.create(), Account.create()
    anvil.set_balance(registered_provider.address, 10**18)
    registered_client = reader.with_account(registered_provider)
    await registered_client.register_node(world.run_id, registered, DEFAULT_SPECS)  # never validated
    node = Account.create()
    anvil.set_balance(node.address, 10 * 10**18)
    try:
        async with running_node(anvil, deployment, world.run_id, node, tmp_path / "miner") as miner:
            await world.validator_client.report_validation(node.address, True, b"\x44" * 32)
            await eventually(lambda: _node_state(world, node.address, "Healthy"), timeout_s=60, what="the miner Healthy")
            spec = {"image": busybox_image, "command": ["sh", "-c", TASK], "gpus": 0, "persistent": True}
            status, task = await signed_call(world.owner, "POST", world.url, "/tasks", json.dumps(spec).encode())
            assert status == 201, task
            task_id = task["id"]

            async def synced() -> bool:
                files = await _get(world, f"/tasks/{task_id}/files")
                return any(f["path"] == "out.txt" for f in files["files"])

            await eventually(synced, timeout_s=60, what="out.txt synced while the task runs")
            assert (await _get(world, f"/tasks/{task_id}"))["replicas"][0]["state"] == "Running"

            await world.owner_client.end_run(world.run_id)

            async def stopped() -> dict[str, Any] | None:
                shown = await _get(world, f"/tasks/{task_id}")
                return shown if shown["replicas"][0]["state"] in ("Stopped", "Completed", "Failed", "Lost") else None

            shown = await eventually(stopped, timeout_s=60, what="the replica stopped by the master")
            assert shown["replicas"][0]["state"] == "Stopped", shown

            async def container_gone() -> bool:
                return not any(s.task_id == task_id and s.state.value in ("Running", "Pulling", "Starting")
                               for s in await miner.executor.snapshot())

            await eventually(container_gone, timeout_s=30, what="the container stopped on the miner")
            # the miner says so when its own chain poll sees the end, which may come after the master's stop
            async def miner_says_ended() -> bool:
                return f"Run {world.run_id} ended on chain" in miner.console.file.getvalue()

            await eventually(miner_says_ended, timeout_s=30, what="the miner saying the run ended")
            assert "ended on chain" in world.master.logs() and "every task is stopped" in world.master.logs()

            # Final files and logs stay readable through the master.
            async def final_synced() -> dict[str, Any] | None:
                files = await _get(world, f"/tasks/{task_id}/files")
                return files if any(f["path"] == "out.txt" for f in files["files"]) else None

            await eventually(final_synced, timeout_s=30, what="the final sync")
            status, content = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/files/out.txt", raw=True)
            assert status == 200 and content == b"kept\n"
            status, logs = await signed_call(world.owner, "GET", world.url, f"/tasks/{task_id}/logs", raw=True)
            assert status == 200 and b"started" in logs, logs

            # Every node of the run: released, and withdraws at once without leaveRun.
            for address in (node.address, approved.address, registered.address):
                assert await reader.node_status(address) == NodeStatus.RELEASED
            await miner.provider_registry.withdraw_stake(node)
            await approved._chain.withdraw_stake(approved.node)  # its provider's client
            await registered_client.withdraw_stake(registered)
            for address in (node.address, approved.address, registered.address):
                assert (await reader.get_node(address)).stake == 0
    finally:
        await reader.close()


async def _node_state(world: World, address: str, state: str) -> bool:
    return await world.node_state(address) == state
