"""ChainPermissions during a chain outage: the last known answers, within a stated bound."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from prime.auth.permissions import ChainPermissions
from prime.errors import ChainError
from tests.auth.test_permissions import MASTER, NODE, OWNER, STRANGER, VALIDATOR, Clock, FakeRegistry


class Stalled(FakeRegistry):
    """An RPC that accepts the call and never answers while ``stalled``."""

    stalled: bool = False

    async def _tick(self) -> None:
        self.calls += 1
        if self.stalled:
            await asyncio.sleep(3600)


async def test_known_answers_are_served_stale_within_the_bound_then_refused() -> None:
    registry, clock = FakeRegistry(), Clock()
    perms = ChainPermissions(registry, ttl_s=5.0, max_stale_s=600.0, clock=clock)
    assert await perms.is_master(7, MASTER)
    assert not await perms.is_master(7, STRANGER)
    assert await perms.is_run_owner(7, OWNER)
    registry.fail = True
    clock.now += 30
    assert await perms.is_master(7, MASTER)  # positive and negative answers both stay what they were
    assert not await perms.is_master(7, STRANGER)
    assert await perms.is_run_owner(7, OWNER)
    assert perms.down_since is not None and perms.stale_answers == 3
    with pytest.raises(ChainError, match="cannot be checked until the chain answers"):
        await perms.is_validator(VALIDATOR)  # never answered before: no stale answer to give
    clock.now += 600  # 630 s after the chain last answered: past the bound
    with pytest.raises(ChainError):
        await perms.is_master(7, MASTER)


async def test_a_stalled_rpc_is_cut_short_and_not_waited_on_again_at_once() -> None:
    registry = Stalled()
    perms = ChainPermissions(registry, ttl_s=0.0, call_timeout_s=0.2, retry_s=60.0)
    assert await perms.is_registered_node(7, NODE)
    registry.stalled = True
    started = time.monotonic()
    assert await perms.is_registered_node(7, NODE)  # waited one call timeout, then the stale answer
    assert 0.15 < time.monotonic() - started < 1.0
    calls = registry.calls
    started = time.monotonic()
    for _ in range(20):  # the chain was just found down: answered at once, no new RPC
        assert await perms.is_active_node(7, NODE) is False
    assert time.monotonic() - started < 0.1 and registry.calls == calls
    with pytest.raises(ChainError, match="did not answer within 0.2 s"):
        await perms.is_validator(VALIDATOR)  # unknown: asked (and cut short), refused


async def test_a_right_revoked_during_the_outage_is_revoked_once_the_chain_answers(caplog) -> None:
    registry, clock = FakeRegistry(), Clock()
    perms = ChainPermissions(registry, ttl_s=5.0, retry_s=10.0, clock=clock)
    assert await perms.is_master(7, MASTER)
    registry.fail = True
    registry.masters[7].discard(MASTER.lower())  # revoked on chain while we cannot see it
    with caplog.at_level(logging.INFO, logger="prime.auth.permissions"):
        for _ in range(3):
            clock.now += 6
            assert await perms.is_master(7, MASTER)
        registry.fail = False
        clock.now += 10  # past the retry interval: asked again
        assert not await perms.is_master(7, MASTER)
        assert perms.down_since is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "again" in r.getMessage()]
    assert len(warnings) == 1 and "last known chain state" in warnings[0].getMessage()
    assert len(infos) == 1


async def test_a_revert_is_an_answer_not_an_outage() -> None:
    registry = FakeRegistry()
    perms = ChainPermissions(registry)
    assert not await perms.is_run_owner(99, OWNER)  # getRun reverts: a cached no
    assert perms.down_since is None


async def test_concurrent_askers_during_a_stall_share_one_call_and_all_get_the_stale_answer() -> None:
    registry = Stalled()
    perms = ChainPermissions(registry, ttl_s=0.0, call_timeout_s=0.2)
    assert await perms.is_validator(VALIDATOR)
    registry.stalled = True
    answers = await asyncio.gather(*(perms.is_validator(VALIDATOR) for _ in range(20)))
    assert all(answers) and registry.calls == 2
