"""Crash windows of one re-validation, driven in-process against the real chain: a failure decided
before a crash is reported as it is (no second challenge), a report already on chain is
recognised, a node that left first makes it superseded, and a node that is not active at its
turn is never challenged (asked again if it may still join, dropped if it is out)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from eth_account import Account

from prime.chain.client import RegistryClient
from prime.chain.types import NodeStatus
from prime.roles.validator.revalidate import Revalidator
from prime.roles.validator.service import ValidatorService, ValidatorSettings
from prime.roles.validator.store import REPORTED, SUPERSEDED, Registration, ValidatorStore
from prime.roles.validator.verdict import Verdict
from prime.store import Database
from tests.roles.validator.conftest import World
from tests.roles.validator.support import register

FAILED = Verdict(False, "entries", "entries check failed: test", {"n": 64, "approved": False, "test": True})


@pytest_asyncio.fixture(loop_scope="session")
async def revalidator(world: World, anvil, deployment, tmp_path: Path) -> AsyncIterator[Revalidator]:
    registry = await RegistryClient.connect(anvil.rpc_url, deployment, world.validator)
    store = ValidatorStore(Database(tmp_path / "v.sqlite"))
    yield Revalidator(ValidatorService(registry, world.validator, store, ValidatorSettings()), mean_s=60.0)
    store.close()
    await registry.close()


async def approved_node(world: World, revalidator: Revalidator, anvil, *, join: bool = True):
    """A node approved on chain (and joined), recorded in the store as this validator approved it."""
    service = revalidator.service
    node = Account.create()
    await register(world.provider, world.run_id, node)
    block = await world.reader.block_number()
    registration = Registration(node=node.address, run_id=world.run_id, block=block, log_index=0, tx_hash=f"0x{block:064x}")
    service.store.enqueue([registration], block + 1, now=service.clock(), deadline_s=60.0)
    approval = Verdict(True, None, "all checks passed", {"n": 64, "approved": True, "node": node.address})
    service.store.decide(registration.id, approval, now=service.clock(), miner_url=None)
    await service.registry.report_validation(node, True, approval.report_hash)
    service.store.reported(registration.id, tx_hash="0x01", now=service.clock())
    if join:
        expiry = await world.reader.block_timestamp() + 600
        await world.provider.join_run(world.run_id, node, expiry, world.provider.sign_invite(anvil.accounts[3], world.run_id, node, expiry))
    (row,) = [r for r in service.store.revalidation_candidates() if r.node == node.address]
    return node, row


async def test_a_failure_decided_before_a_crash_is_reported_without_a_new_challenge(world, revalidator, anvil) -> None:
    store = revalidator.service.store
    node, row = await approved_node(world, revalidator, anvil)
    started = store.start_revalidation(row, now=1.0, deadline_s=60.0)
    store.decide_revalidation(started.id, FAILED, now=2.0, miner_url=None)  # ... and then the crash

    await revalidator.turn(row)  # nothing to challenge: the node has no address anywhere

    info = await world.reader.get_node(node.address)
    assert (info.status, info.report_hash) == (NodeStatus.EJECTED, FAILED.report_hash)
    done = store.get_revalidation(started.id)
    assert done.state == REPORTED and done.tx_hash
    assert all(r.node != node.address for r in store.revalidation_candidates())  # ejected: never again
    assert row.id in revalidator._out


async def test_a_failure_already_on_chain_is_recognised(world, revalidator, anvil) -> None:
    store = revalidator.service.store
    node, row = await approved_node(world, revalidator, anvil)
    started = store.start_revalidation(row, now=1.0, deadline_s=60.0)
    store.decide_revalidation(started.id, FAILED, now=2.0, miner_url=None)
    await revalidator.service.registry.report_revalidation_failure(node.address, FAILED.report_hash)  # sent, then the crash

    await revalidator.turn(row)

    done = store.get_revalidation(started.id)
    assert (done.state, done.tx_hash, done.note) == (REPORTED, None, "this failure was already on chain (sent before a restart)")


async def test_a_node_that_left_before_the_report_makes_it_superseded(world, revalidator, anvil) -> None:
    store = revalidator.service.store
    node, row = await approved_node(world, revalidator, anvil)
    started = store.start_revalidation(row, now=1.0, deadline_s=60.0)
    store.decide_revalidation(started.id, FAILED, now=2.0, miner_url=None)
    await world.provider.leave_run(node.address)

    await revalidator.turn(row)

    done = store.get_revalidation(started.id)
    assert done.state == SUPERSEDED and done.note == "the node was left on chain before the report could land"
    assert (await world.reader.get_node(node.address)).stake > 0  # it escaped the penalty (documented)


async def test_a_node_not_active_at_its_turn_is_not_challenged(world, revalidator, anvil) -> None:
    store = revalidator.service.store
    waiting, waiting_row = await approved_node(world, revalidator, anvil, join=False)
    gone, gone_row = await approved_node(world, revalidator, anvil)
    await world.provider.leave_run(gone.address)

    await revalidator.turn(waiting_row)
    await revalidator.turn(gone_row)

    assert store.revalidations(node=waiting.address) == [] == store.revalidations(node=gone.address)
    assert waiting_row.id in revalidator._due and waiting_row.id not in revalidator._out  # asked again later
    assert gone_row.id in revalidator._out and gone_row.id not in revalidator._due  # dropped
