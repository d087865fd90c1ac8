"""The release rule without chain or Docker: which chain statuses leave the node's containers
without a master, and the guard that stops them (a real Converger over the in-memory executor).
The real-parts proof is ``test_release_real.py``."""

from __future__ import annotations

from typing import Any

import pytest

from prime.chain.types import NodeInfo, NodeStatus
from prime.protocol.heartbeat import DesiredReplica
from prime.roles.miner import core
from prime.roles.miner.heartbeat import Converger
from prime.roles.miner.release import ReleaseGuard, released, released_too_long
from prime.roles.miner.state import MinerState
from prime.roles.miner.watch import outcome
from tests.fixtures.chain import DEFAULT_SPECS
from tests.support.miner_env import MemoryExecutor

RUN = 7


def info(status: NodeStatus, run_id: int = RUN) -> NodeInfo:
    return NodeInfo("0xnode", "0xprovider", run_id, DEFAULT_SPECS, 0, status, b"\x00" * 32)


def desired(task_id: str) -> DesiredReplica:
    return DesiredReplica.from_json({"id": task_id, "replica": 0, "attempt": 0, "gpu_indices": [],
                                     "spec": {"image": "busybox", "command": ["true"]}})


def ended(status: NodeStatus, run_id: int = RUN) -> str | None:
    """What the chain watch says ends the miner for this status (the rule on_exit follows)."""
    error = outcome(info(status, run_id), RUN, MinerState(), verdict_wait_over=True)
    return None if error is None else str(error)


def test_released_only_for_this_runs_end() -> None:
    assert released(info(NodeStatus.RELEASED), RUN)
    assert not released(info(NodeStatus.RELEASED, RUN + 1), RUN)
    assert not released(info(NodeStatus.ACTIVE), RUN) and not released(None, RUN)


def test_released_too_long_only_for_this_runs_end_past_the_grace() -> None:
    assert released_too_long(info(NodeStatus.RELEASED), RUN, 10.0, 15.0, 5.0)
    assert not released_too_long(info(NodeStatus.RELEASED), RUN, 10.0, 14.9, 5.0)
    assert not released_too_long(info(NodeStatus.RELEASED, RUN + 1), RUN, 10.0, 99.0, 5.0)
    assert not released_too_long(info(NodeStatus.ACTIVE), RUN, 10.0, 99.0, 5.0)
    assert not released_too_long(info(NodeStatus.RELEASED), RUN, None, 99.0, 5.0)


class World:
    def __init__(self) -> None:
        self.now = 0.0
        self.last: NodeInfo | None = info(NodeStatus.ACTIVE)
        self.ended: str | None = None
        self.said: list[str] = []
        self.executor = MemoryExecutor()
        self.converger = Converger(self.executor, [], policy=core.Policy(retention_s=100, push_grace_s=10),
                                   clock=lambda: self.now)
        self.guard = ReleaseGuard(self.converger, RUN, lambda: self.last, lambda: self.ended, grace_s=30.0,
                                  say=self.said.append, clock=lambda: self.now)

    def running(self) -> set[str]:
        return {k[0] for k, s in self.executor.containers.items() if s.state.value == "Running"}


async def test_the_guard_stops_what_runs_once_past_the_grace_after_the_runs_end() -> None:
    w = World()
    await w.converger.converge([desired("a"), desired("b"), desired("done")])
    w.executor.finish("done", 0)
    assert await w.guard.step() == 0 and w.running() == {"a", "b"}  # Active: nothing to do
    w.last = info(NodeStatus.RELEASED)
    assert await w.guard.step() == 0  # the end seen now: the grace starts
    w.now = 29.0
    assert await w.guard.step() == 0 and w.running() == {"a", "b"}
    w.now = 30.0
    assert await w.guard.step() == 2
    assert w.running() == set() and ("done", 0) in w.executor.containers  # a finished one stays (retention)
    assert len(w.said) == 1 and "a, b" in w.said[0] and f"run {RUN} ended" in w.said[0]
    # Once: a task the master starts later (it came back) is not stopped by this guard again.
    await w.converger.converge([desired("c")])
    w.now = 100.0
    assert await w.guard.step() == 0 and w.running() == {"c"}
    # The stop was the miner's own: the converger no longer holds the tasks as its own to restart.
    await w.converger.supervise()
    assert w.running() == {"c"}


async def test_the_grace_restarts_when_the_status_changes_back() -> None:
    w = World()
    await w.converger.converge([desired("a")])
    w.last = info(NodeStatus.RELEASED)
    await w.guard.step()
    w.now = 20.0
    w.last = None  # not read (an RPC outage at the start): the grace is not counted on a guess
    await w.guard.step()
    w.last = info(NodeStatus.RELEASED)
    w.now = 25.0
    await w.guard.step()
    w.now = 54.0
    assert await w.guard.step() == 0 and w.running() == {"a"}
    w.now = 55.0
    assert await w.guard.step() == 1 and w.running() == set()


@pytest.mark.parametrize(("status", "run_id", "stops", "why"), [
    (NodeStatus.EJECTED, RUN, True, "ejected"),
    (NodeStatus.LEFT, RUN, True, "left"),
    (NodeStatus.NONE, 0, True, "no longer registered"),
    (NodeStatus.REGISTERED, RUN + 1, True, f"run {RUN + 1}"),
    (NodeStatus.APPROVED, RUN + 1, True, f"run {RUN + 1}"),
    (NodeStatus.REGISTERED, RUN, False, None),
    (NodeStatus.APPROVED, RUN, False, None),
    (NodeStatus.ACTIVE, RUN, False, None),
    (NodeStatus.RELEASED, RUN, False, None),
])
async def test_on_exit_stops_only_when_the_chain_ended_the_miner(status: NodeStatus, run_id: int, stops: bool,
                                                                  why: str | None) -> None:
    w = World()
    await w.converger.converge([desired("a")])
    w.last, w.ended = info(status, run_id), ended(status, run_id)
    assert await w.guard.on_exit() == (1 if stops else 0)
    assert w.running() == (set() if stops else {"a"})  # a plain stop (SIGTERM) leaves it for the restart to adopt
    assert bool(w.said) is stops
    if why is not None:
        assert why in w.said[0]


async def test_an_engine_failure_while_stopping_raises_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    w = World()
    await w.converger.converge([desired("a")])
    w.last, w.ended = info(NodeStatus.EJECTED), ended(NodeStatus.EJECTED)

    async def broken(*_: Any) -> list[Any]:
        raise OSError("engine away")

    monkeypatch.setattr(w.executor, "snapshot", broken)
    with pytest.raises(OSError):
        await w.guard.on_exit()  # the miner's close suppresses it and goes on
    assert w.said == []
