"""ChainWatcher on its own: registry events in, master state events out, in batches.

The registry and the event follower are small fakes here (a unit test of one module); the
real chain path is covered by test_service.py against anvil.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

from prime.chain.types import ChainEvent, Specs
from prime.protocol.nodes import NodeState
from prime.roles.master.chainwatch import SPEC_READS_IN_FLIGHT, ChainWatcher
from prime.roles.master.state import ChainSynced, MasterStarted, MasterState, StateConfig, handle

RUN = 3
SPECS = Specs(2, "A100", 40_000, 16, 128_000, 500)


def node(i: int) -> str:
    return f"0x{i:040x}"


def event(name: str, i: int, block: int, run: int = RUN, **args) -> ChainEvent:
    return ChainEvent(name, {"runId": run, "node": node(i), **args}, block, f"0x{block:064x}", i)


class SlowRegistry:
    """get_node takes a moment, and records how many reads overlapped."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def get_node(self, address: str) -> SimpleNamespace:
        self.reads.append(address)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        return SimpleNamespace(specs=SPECS)


@dataclass
class ListFollower:
    batches: list[list[ChainEvent]]
    committed: list[int] = field(default_factory=list)

    async def poll(self) -> list[ChainEvent]:
        return self.batches.pop(0) if self.batches else []

    async def commit(self, events: list[ChainEvent]) -> None:
        self.committed.append(events[-1].block)

    @property
    def caught_up(self) -> bool:
        return not self.batches

    async def cursor(self) -> int:
        return self.committed[-1] if self.committed else 0


async def test_a_large_batch_reads_specs_concurrently_and_applies_inside_one_batch() -> None:
    state = MasterState(StateConfig())
    handle(state, MasterStarted(0.0))
    approvals = [event("NodeValidated", i, 10, approved=True) for i in range(40)]
    joins = [event("NodeJoined", i, 11) for i in range(40)]
    others = [event("NodeValidated", 99, 10, run=RUN + 1, approved=True),  # another run: ignored
              event("NodeValidated", 98, 10, approved=False)]  # rejected: ignored
    follower = ListFollower([approvals + others + joins])
    registry = SlowRegistry()
    applied_outside_batch: list[str] = []
    batching = False

    @contextlib.contextmanager
    def batch() -> Iterator[None]:
        nonlocal batching
        batching = True
        try:
            yield
        finally:
            batching = False

    def apply(ev) -> list:
        if not batching:
            applied_outside_batch.append(type(ev).__name__)
        return handle(state, ev)

    watcher = ChainWatcher(registry, follower, RUN, lambda: state, apply, batch=batch, clock=lambda: 5.0)
    applied = await watcher.step()

    assert applied == 80
    assert sorted(registry.reads) == sorted(node(i) for i in range(40))  # each node read once
    assert 1 < registry.most_in_flight <= SPEC_READS_IN_FLIGHT
    assert follower.committed == [11]
    # Every chain event went through the batch; only ChainSynced (after it) did not.
    assert applied_outside_batch == [ChainSynced.__name__]
    assert {state.nodes[node(i)].hardware for i in range(40)} == {SPECS}
    assert {state.nodes[node(i)].state for i in range(40)} == {NodeState.JOINED}
    assert node(99) not in state.nodes and node(98) not in state.nodes


async def test_a_join_of_a_known_node_reads_nothing() -> None:
    state = MasterState(StateConfig())
    handle(state, MasterStarted(0.0))
    registry = SlowRegistry()
    follower = ListFollower([[event("NodeValidated", 1, 5, approved=True)], [event("NodeJoined", 1, 6)]])
    watcher = ChainWatcher(registry, follower, RUN, lambda: state, lambda ev: handle(state, ev), max_batches=1)
    await watcher.step()
    assert registry.reads == [node(1)]  # a single approval is read directly
    await watcher.step()
    assert registry.reads == [node(1)]  # its join needs no second read
    assert state.nodes[node(1)].state == NodeState.JOINED


async def test_run_ended_of_this_run_is_an_event_of_the_core() -> None:

    state = MasterState(StateConfig())
    handle(state, MasterStarted(0.0))
    seen: list[object] = []

    def apply(ev) -> list:
        seen.append(ev)
        return handle(state, ev)

    ended = ChainEvent("RunEnded", {"runId": RUN}, 7, "0x" + "07" * 32, 0)
    elsewhere = ChainEvent("RunEnded", {"runId": RUN + 1}, 7, "0x" + "08" * 32, 1)
    follower = ListFollower([[elsewhere, ended], [event("NodeValidated", 1, 8, approved=True)]])
    watcher = ChainWatcher(SlowRegistry(), follower, RUN, lambda: state, apply, clock=lambda: 5.0)
    await watcher.step()
    assert [type(e).__name__ for e in seen] == ["RunEnded", "NodeApprovedOnChain", "ChainSynced"]
    assert state.run_ended
    assert state.nodes[node(1)].state == NodeState.APPROVED  # approved after the end: never invited
