"""Crash windows of one validation, driven in-process against the real chain: a verdict decided
before a crash is sent as it is (no second challenge), a verdict already on chain is recognised,
another validator's earlier verdict wins, and a node no longer awaiting validation is skipped."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from eth_account import Account

from prime.chain.client import RegistryClient
from prime.chain.types import NodeStatus
from prime.roles.validator.service import ValidatorService, ValidatorSettings
from prime.roles.validator.store import (
    REPORTED,
    SKIPPED,
    SUPERSEDED,
    Registration,
    ValidatorStore,
)
from prime.roles.validator.verdict import gave_up
from prime.store import Database
from tests.roles.validator.conftest import World
from tests.roles.validator.support import register


@pytest_asyncio.fixture(loop_scope="session")
async def service(world: World, anvil, deployment, tmp_path: Path) -> AsyncIterator[ValidatorService]:
    registry = await RegistryClient.connect(anvil.rpc_url, deployment, world.validator)
    store = ValidatorStore(Database(tmp_path / "v.sqlite"))
    yield ValidatorService(registry, world.validator, store, ValidatorSettings())
    store.close()
    await registry.close()


async def registered(world: World, service: ValidatorService) -> Registration:
    """A node registered on chain and queued in the store as the follower would queue it."""
    node = Account.create()
    await register(world.provider, world.run_id, node)
    block = await world.reader.block_number()
    registration = Registration(node=node.address, run_id=world.run_id, block=block, log_index=0, tx_hash=f"0x{block:064x}")
    service.store.enqueue([registration], block + 1, now=service.clock(), deadline_s=60.0)
    return registration


def rejected(registration: Registration):
    return gave_up(registration.node, registration.run_id, kind="unreachable", detail="test", attempts=1,
                   first_seen=0.0, deadline=0.0)


async def test_a_decided_verdict_is_sent_after_a_restart_without_a_new_challenge(world: World, service: ValidatorService) -> None:
    registration = await registered(world, service)
    verdict = rejected(registration)
    service.store.decide(registration.id, verdict, now=service.clock(), miner_url=None)  # ... and then the crash

    (row,) = service.store.due(service.clock(), 10)
    await service.work(row)  # what the dispatcher runs for a due row after the restart

    info = await world.reader.get_node(registration.node)
    assert info.status == NodeStatus.REJECTED and info.report_hash == verdict.report_hash
    done = service.store.get(registration.id)
    assert done.state == REPORTED and done.tx_hash and done.attempts == 1  # the decide, nothing more


async def test_a_verdict_already_on_chain_is_recognised(world: World, service: ValidatorService) -> None:
    registration = await registered(world, service)
    verdict = rejected(registration)
    service.store.decide(registration.id, verdict, now=service.clock(), miner_url=None)
    # The transaction was mined, but the process died before it could note that.
    await service.registry.report_validation(registration.node, False, verdict.report_hash)

    await service.work(service.store.get(registration.id))
    done = service.store.get(registration.id)
    assert done.state == REPORTED and done.tx_hash is None and "already on chain" in done.note


async def test_another_validators_earlier_verdict_wins(world: World, service: ValidatorService, anvil, deployment) -> None:
    registration = await registered(world, service)
    service.store.decide(registration.id, rejected(registration), now=service.clock(), miner_url=None)
    async with await RegistryClient.connect(anvil.rpc_url, deployment, anvil.accounts[1]) as other_validator:
        await other_validator.report_validation(registration.node, True, b"\x22" * 32)

    await service.work(service.store.get(registration.id))
    done = service.store.get(registration.id)
    assert done.state == SUPERSEDED and "another validator" in done.note
    assert (await world.reader.node_status(registration.node)) == NodeStatus.APPROVED


async def test_a_node_no_longer_awaiting_validation_is_skipped_unchallenged(world: World, service: ValidatorService, anvil, deployment) -> None:
    registration = await registered(world, service)
    async with await RegistryClient.connect(anvil.rpc_url, deployment, anvil.accounts[1]) as other_validator:
        await other_validator.report_validation(registration.node, True, b"\x33" * 32)

    await service.work(service.store.get(registration.id))
    done = service.store.get(registration.id)
    assert done.state == SKIPPED and "approved" in done.note and done.attempts == 0
