"""Issue 14 acceptance: after removeMaster its miners refuse its pushes (from their next heartbeat on)
and are adopted by the remaining master, which runs the next task on them; while both are masters
the second one never claims the first one's nodes.

Real anvil, two real ``prime master start`` processes, two real miners (MinerNode, real Docker)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest_asyncio
from eth_account import Account

from prime.chain.client import RegistryClient
from prime.chain.types import Requirements
from tests.fixtures.docker import remove_prime_containers
from tests.fixtures.processes import RoleProcesses, free_port
from tests.roles.master.fake_miner import PASSWORD, World, eventually, make_world, master_command, signed_call, write_key
from tests.support.miner_env import desired_entry, running_node


@pytest_asyncio.fixture(loop_scope="session")
async def world(anvil, deployment, role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, role_processes, tmp_path_factory.mktemp("master-removed"),
                         requirements=Requirements(min_gpus=0))
    yield w
    await w.close()


async def _nodes(url: str, owner: Any) -> dict[str, dict[str, Any]]:
    status, body = await signed_call(owner, "GET", url, "/nodes")
    assert status == 200, body
    return {n["address"]: n for n in body["nodes"]}


async def _healthy_at(url: str, owner: Any, addresses: list[str]) -> bool:
    nodes = await _nodes(url, owner)
    return all(nodes.get(a, {}).get("state") == "Healthy" for a in addresses)


async def test_a_removed_masters_miners_refuse_it_and_are_adopted_by_the_other_master(
        world: World, anvil, deployment, role_processes: RoleProcesses, docker_client, busybox_image: str,
        tmp_path: Path) -> None:
    reader = await RegistryClient.connect(world.rpc_url, world.deployment)
    first = world.master_account
    accounts = [Account.create(), Account.create()]
    for account in accounts:
        anvil.set_balance(account.address, 10 * 10**18)
    addresses = [a.address for a in accounts]
    async with contextlib.AsyncExitStack() as stack:
        for address in addresses:  # the finished containers the miners keep: gone with the test
            stack.callback(remove_prime_containers, docker_client, address)
        miners = [await stack.enter_async_context(running_node(anvil, deployment, world.run_id, a, tmp_path / f"m{i}"))
                  for i, a in enumerate(accounts)]
        for account in accounts:
            await world.validator_client.report_validation(account.address, True, b"\x55" * 32)
        await eventually(lambda: _healthy_at(world.url, world.owner, addresses), timeout_s=60, what="both Healthy")

        # A second master joins the run: it knows the nodes are the first one's and leaves them alone.
        second = Account.create()
        anvil.set_balance(second.address, 10 * 10**18)
        await world.owner_client.add_master(world.run_id, second.address)
        port = free_port()
        other = role_processes.create(
            "master-2", master_command(port, world.run_id, write_key(tmp_path, second), world.rpc_url,
                                       deployment.path, tmp_path / "master-2"),
            port=port, env={"PRIME_KEY_PASSWORD": PASSWORD})
        await other.start_async()
        await eventually(lambda: _seen_as_others(other.base_url, world.owner, addresses), what="the second master's view")
        assert [m.state.master for m in miners] == [first.address, first.address]
        assert await _healthy_at(world.url, world.owner, addresses)

        # The run's owner removes the first master.
        await world.owner_client.remove_master(world.run_id, first.address)

        async def left_first() -> bool:
            return all(m.state.master != first.address for m in miners)

        await eventually(left_first, timeout_s=30, what="the miners noticing the removal")
        for miner in miners:
            body = json.dumps(desired_entry("after-removal", busybox_image, ["true"])).encode()
            status, answer = await signed_call(first, "POST", miner.url, "/tasks", body)
            assert status == 403, answer  # the removed master's push is refused
            assert "no master of run" in miner.console.file.getvalue()

        await eventually(lambda: _healthy_at(other.base_url, world.owner, addresses), timeout_s=60,
                         what="both nodes adopted by the remaining master")
        assert [m.state.master for m in miners] == [second.address, second.address]
        joins = await reader.get_logs(0, await reader.block_number(), ["NodeJoined"], run_id=world.run_id)
        assert sorted(e.args["node"] for e in joins) == sorted(addresses)  # no second joinRun
        assert "adopted" in other.logs()

        # The remaining master runs the next task on them.
        spec = {"image": busybox_image, "command": ["sh", "-c", "echo adopted"], "gpus": 0, "replicas": 2}
        status, task = await signed_call(world.owner, "POST", other.base_url, "/tasks", json.dumps(spec).encode())
        assert status == 201, task

        async def done() -> dict[str, Any] | None:
            status, shown = await signed_call(world.owner, "GET", other.base_url, f"/tasks/{task['id']}")
            assert status == 200, shown
            return shown if all(r["state"] in ("Completed", "Failed") for r in shown["replicas"]) else None

        shown = await eventually(done, timeout_s=60, what="the task on the adopted nodes")
        assert [r["state"] for r in shown["replicas"]] == ["Completed", "Completed"], shown
        assert {r["node"] for r in shown["replicas"]} <= set(addresses)
    await reader.close()


async def _seen_as_others(url: str, owner: Any, addresses: list[str]) -> bool:
    nodes = await _nodes(url, owner)
    return all(a in nodes and nodes[a]["state"] == "Left" for a in addresses)
