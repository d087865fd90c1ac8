"""The chain tells the truth (issue 14): endRun releases every node of the run on read, without a
loop; an ejected node frees its seat and may register again once its stake is back; real anvil."""

from __future__ import annotations

import pytest

from prime.chain.client import RevertError
from prime.chain.types import NodeStatus, Requirements
from tests.chain.test_nodes import invite, joined_node, new_node
from tests.fixtures.chain import DEFAULT_SPECS, MIN_STAKE_WEI


async def test_end_run_releases_every_node_of_the_run_at_once(parties, fresh_account, deployment):
    run_id = await parties.new_run()
    _, active_provider, active, active_client = await joined_node(parties, fresh_account, run_id=run_id)
    _, _, approved, approved_client = await new_node(parties, fresh_account, run_id=run_id)
    _, _, registered, registered_client = await new_node(parties, fresh_account, run_id=run_id, approve=None)
    other_run, _, elsewhere, _ = await joined_node(parties, fresh_account)

    result = await parties.buyer.end_run(run_id)

    assert [e.name for e in result.events] == ["RunEnded"]  # no event (no write) per node
    for node in (active, approved, registered):
        assert await parties.reader.node_status(node) == NodeStatus.RELEASED
        info = await parties.reader.get_node(node)
        assert (info.status, info.run_id, info.stake) == (NodeStatus.RELEASED, run_id, MIN_STAKE_WEI)
        assert info.status.stake_withdrawable
    assert await parties.reader.node_status(elsewhere) == NodeStatus.ACTIVE  # another run is untouched
    assert (await parties.reader.get_run(other_run)).node_count == 1

    # Every node withdraws at once, without leaveRun.
    before = await parties.reader.balance(active_provider)
    withdrawn = await active_client.withdraw_stake(active)
    assert withdrawn.event("StakeWithdrawn").args["amount"] == MIN_STAKE_WEI
    assert await parties.reader.balance(active_provider) > before
    await approved_client.withdraw_stake(approved)
    await registered_client.withdraw_stake(registered)
    for node in (active, approved, registered):
        assert (await parties.reader.get_node(node)).stake == 0


async def test_released_node_cannot_leave_be_ejected_or_validated(parties, fresh_account):
    run_id = await parties.new_run()
    _, _, active, active_client = await joined_node(parties, fresh_account, run_id=run_id)
    _, _, registered, _ = await new_node(parties, fresh_account, run_id=run_id, approve=None)
    await parties.buyer.end_run(run_id)

    with pytest.raises(RevertError) as leave:
        await active_client.leave_run(active)
    assert leave.value.message == (
        f"Node {active.address} cannot leave in status released; only registered, approved or active nodes can "
        "(its run has ended, so the stake is withdrawable already)."
    )
    with pytest.raises(RevertError) as eject:
        await parties.master.eject_node(run_id, active)
    assert eject.value.message == f"Node {active.address} is not active in the run (status released)."
    with pytest.raises(RevertError) as validate:
        await parties.validator.report_validation(registered, True, b"\x01" * 32)
    assert validate.value.error_name == "NotAwaitingValidation" and "(status released)" in validate.value.message
    with pytest.raises(RevertError) as revalidate:
        await parties.validator.report_revalidation_failure(active, b"\x02" * 32)
    assert revalidate.value.error_name == "NotRevalidatable" and "status released" in revalidate.value.message


async def test_released_node_registers_for_another_run_after_withdrawing(parties, fresh_account):
    run_id = await parties.new_run()
    _, _, node, provider_client = await joined_node(parties, fresh_account, run_id=run_id)
    await parties.buyer.end_run(run_id)
    next_run = await parties.new_run()
    with pytest.raises(RevertError) as held:
        await provider_client.register_node(next_run, node, DEFAULT_SPECS)
    assert held.value.error_name == "NodeAlreadyRegistered" and "(status released)" in held.value.message
    await provider_client.withdraw_stake(node)
    await provider_client.register_node(next_run, node, DEFAULT_SPECS)
    info = await parties.reader.get_node(node)
    assert (info.status, info.run_id, info.stake) == (NodeStatus.REGISTERED, next_run, MIN_STAKE_WEI)


async def test_end_run_gas_does_not_grow_with_the_run(parties, fresh_account):
    small = await parties.new_run()
    await joined_node(parties, fresh_account, run_id=small)
    big = await parties.new_run()
    for _ in range(5):
        await joined_node(parties, fresh_account, run_id=big)
    small_gas = (await parties.buyer.end_run(small)).gas_used
    big_gas = (await parties.buyer.end_run(big)).gas_used
    assert small_gas == big_gas


async def test_ejected_node_frees_its_seat_and_registers_again(parties, fresh_account):
    run_id = await parties.new_run(Requirements(max_nodes=1))
    _, _, dead, dead_client = await joined_node(parties, fresh_account, run_id=run_id)
    _, _, spare, spare_client = await new_node(parties, fresh_account, run_id=run_id)
    expiry, sig = await invite(parties, run_id, spare)
    with pytest.raises(RevertError) as full:
        await spare_client.join_run(run_id, spare, expiry, sig)
    assert full.value.error_name == "RunFull"

    await parties.master.eject_node(run_id, dead)
    await spare_client.join_run(run_id, spare, expiry, sig)
    assert (await parties.reader.get_run(run_id)).node_count == 1

    # The ejected node comes back: its stake is withdrawable, then it registers again.
    await dead_client.withdraw_stake(dead)
    await dead_client.register_node(run_id, dead, DEFAULT_SPECS)
    assert await parties.reader.node_status(dead) == NodeStatus.REGISTERED
