"""Issue 14 acceptance: a node killed and never restarted is ejected on chain by a real master
process after the grace (--eject-after), and then a new node joins the run, whose maxNodes is 1.

Real anvil, a real ``prime master start`` and discovery; the nodes are fake miners that join with
real joinRun transactions and heartbeat with signed requests."""

from __future__ import annotations

import pytest_asyncio

from prime.chain.client import RegistryClient
from prime.chain.types import NodeStatus, Requirements
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import World, eventually, make_world

EJECT_AFTER_S = 2.0


@pytest_asyncio.fixture(loop_scope="session")
async def world(anvil, deployment, role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, role_processes, tmp_path_factory.mktemp("eject"),
                         requirements=Requirements(min_gpus=1, max_nodes=1),
                         master_extra=("--eject-after", str(EJECT_AFTER_S)))
    yield w
    await w.close()


async def test_a_dead_node_is_ejected_after_the_grace_and_its_seat_goes_to_a_new_node(world: World, anvil) -> None:
    reader = await RegistryClient.connect(world.rpc_url, world.deployment)
    try:
        first = await world.new_miner(anvil=anvil)
        await eventually(lambda: _status_is(reader, first.address, NodeStatus.ACTIVE), what="the first node's join")
        first.start_heartbeats(0.3)
        await eventually(lambda: _state_is(world, first.address, "Healthy"), what="Healthy")
        assert (await reader.get_run(world.run_id)).node_count == 1

        await first.close()  # killed, never restarted
        await eventually(lambda: _state_is(world, first.address, "Dead"), what="Dead")
        dead_since = (await world.nodes())[first.address]["state_since"]
        await eventually(lambda: _status_is(reader, first.address, NodeStatus.EJECTED), timeout_s=30,
                         what="the ejection on chain")
        assert (await reader.get_run(world.run_id)).node_count == 0
        ejected = await reader.get_logs(0, await reader.block_number(), ["NodeEjected"], run_id=world.run_id)
        assert [(e.args["node"], e.args["master"]) for e in ejected if e.args["runId"] == world.run_id] == [
            (first.address, world.master_account.address)]
        # Not before the grace: the ejection's block is --eject-after past Dead (block times are whole seconds).
        assert await reader.block_timestamp(ejected[-1].block) >= int(dead_since + EJECT_AFTER_S)
        await eventually(lambda: _state_is(world, first.address, "Left"), what="Left at the master")
        assert await world.metric("prime_master_ejections_total", 'reason="dead",result="ejected"') == 1
        assert "past the ejection grace" in world.master.logs()

        second = await world.new_miner(anvil=anvil)  # maxNodes = 1: only the freed seat lets it in
        # beating from its invite on: with a 2 s grace, a node that only starts once the test has
        # seen its join could be Dead and ejected first on a loaded machine
        second.start_heartbeats(0.3)
        await eventually(lambda: _status_is(reader, second.address, NodeStatus.ACTIVE), what="the new node's join")
        try:
            await eventually(lambda: _state_is(world, second.address, "Healthy"), what="the new node Healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc} (heartbeat errors: {second.heartbeat_errors[-3:]})") from None
        assert (await reader.get_run(world.run_id)).node_count == 1
    finally:
        await reader.close()


async def _status_is(reader: RegistryClient, node: str, status: NodeStatus) -> bool:
    return await reader.node_status(node) == status


async def _state_is(world: World, node: str, state: str) -> bool:
    return await world.node_state(node) == state
