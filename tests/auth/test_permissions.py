"""ChainPermissions over a small fake registry (the real RegistryClient is tested against anvil)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from prime.auth.permissions import ChainPermissions, TTLCache
from prime.errors import ChainError

OWNER = "0x00000000000000000000000000000000000000aA"
MASTER = "0x00000000000000000000000000000000000000bB"
VALIDATOR = "0x00000000000000000000000000000000000000cC"
NODE = "0x00000000000000000000000000000000000000dD"
STRANGER = "0x00000000000000000000000000000000000000eE"


class Reverted(ChainError):
    """Shaped like prime.chain.client.RevertError: a ChainError with the contract's error name."""

    def __init__(self, message: str, error_name: str) -> None:
        super().__init__(message)
        self.error_name = error_name


@dataclass
class Run:
    owner: str


@dataclass
class Node:
    run_id: int
    status: int


@dataclass
class FakeRegistry:
    """Answers like RegistryClient's views; counts calls so caching is observable."""

    validators: set[str] = field(default_factory=lambda: {VALIDATOR.lower()})
    masters: dict[int, set[str]] = field(default_factory=lambda: {7: {MASTER.lower()}})
    nodes: dict[str, Node] = field(default_factory=lambda: {NODE.lower(): Node(7, 1)})
    calls: int = 0
    fail: bool = False
    delay: float = 0.0

    async def _tick(self) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise ChainError("RPC unreachable")

    async def is_validator(self, address: str) -> bool:
        await self._tick()
        return address.lower() in self.validators

    async def is_master(self, run_id: int, address: str) -> bool:
        await self._tick()
        return address.lower() in self.masters.get(run_id, set())

    async def get_run(self, run_id: int) -> Run:
        await self._tick()
        if run_id != 7:
            raise Reverted(f"getRun call reverted: UnknownRun({run_id}).", "UnknownRun")
        return Run(owner=OWNER)

    async def get_node(self, node: str) -> Node:
        await self._tick()
        return self.nodes.get(node.lower(), Node(0, 0))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_answers() -> None:
    perms = ChainPermissions(FakeRegistry())
    assert await perms.is_validator(VALIDATOR)
    assert not await perms.is_validator(STRANGER)
    assert await perms.is_master(7, MASTER)
    assert not await perms.is_master(8, MASTER)
    assert await perms.is_run_owner(7, OWNER.lower())
    assert not await perms.is_run_owner(7, STRANGER)
    assert await perms.is_registered_node(7, NODE)
    assert not await perms.is_registered_node(8, NODE)
    assert not await perms.is_registered_node(7, STRANGER)
    assert await perms.node_run_id(NODE) == 7
    assert await perms.node_run_id(STRANGER) is None


@pytest.mark.parametrize("status, member", [(1, True), (2, True), (3, False), (4, True), (5, False), (6, False)])
async def test_which_node_states_count_as_registered(status: int, member: bool) -> None:
    registry = FakeRegistry(nodes={NODE.lower(): Node(7, status)})
    perms = ChainPermissions(registry)
    assert await perms.is_registered_node(7, NODE) is member
    assert await perms.is_active_node(7, NODE) is (status == 4)
    assert await perms.node_run_id(NODE) == 7  # the run stays known after leaving


async def test_unknown_run_is_a_cached_no_not_an_error() -> None:
    registry = FakeRegistry()
    perms = ChainPermissions(registry)
    assert not await perms.is_run_owner(99, OWNER)
    assert not await perms.is_run_owner(99, OWNER)
    assert registry.calls == 1
    registry.fail = True  # an RPC failure, by contrast, is an error
    with pytest.raises(ChainError):
        await perms.is_run_owner(8, OWNER)


async def test_answers_are_cached_for_ttl_then_refreshed() -> None:
    registry, clock = FakeRegistry(), Clock()
    perms = ChainPermissions(registry, ttl_s=5.0, clock=clock)
    for _ in range(10):
        assert await perms.is_master(7, MASTER)
        assert not await perms.is_master(7, STRANGER)  # negative answers are cached too
    assert registry.calls == 2
    registry.masters[7].discard(MASTER.lower())  # removed on chain
    clock.now += 4.9
    assert await perms.is_master(7, MASTER)  # still the cached answer
    clock.now += 0.2
    assert not await perms.is_master(7, MASTER)  # expired: asked again
    assert registry.calls == 3


async def test_address_case_shares_one_cache_entry() -> None:
    registry = FakeRegistry()
    perms = ChainPermissions(registry)
    await perms.is_validator(VALIDATOR)
    await perms.is_validator(VALIDATOR.lower())
    assert registry.calls == 1


async def test_concurrent_askers_share_one_call() -> None:
    registry = FakeRegistry(delay=0.05)
    perms = ChainPermissions(registry)
    answers = await asyncio.gather(*(perms.is_registered_node(7, NODE) for _ in range(50)))
    assert all(answers)
    assert registry.calls == 1


async def test_errors_are_not_cached() -> None:
    registry = FakeRegistry(fail=True)
    perms = ChainPermissions(registry)
    with pytest.raises(ChainError):
        await perms.is_validator(VALIDATOR)
    registry.fail = False
    assert await perms.is_validator(VALIDATOR)
    assert registry.calls == 2


async def test_a_cancelled_asker_does_not_fail_the_others() -> None:
    registry = FakeRegistry(delay=0.05)
    perms = ChainPermissions(registry)
    first = asyncio.create_task(perms.is_validator(VALIDATOR))
    await asyncio.sleep(0)
    second = asyncio.create_task(perms.is_validator(VALIDATOR))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second is True


async def test_cache_size_is_capped() -> None:
    cache = TTLCache(60.0, max_entries=10)

    async def value() -> int:
        return 1

    for i in range(100):
        await cache.get(i, value)
    assert len(cache) == 10
