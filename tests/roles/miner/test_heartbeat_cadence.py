"""Heartbeats keep their cadence whatever the engine does (issue 13: with Dead after 3 missed
heartbeats + 1 s, a beat held back by a slow `docker ps` would make a live node Dead).

In process: an in-memory executor whose snapshot can hang or fail, an in-memory master."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from prime.roles.miner.executor import ExecutorError
from prime.roles.miner.heartbeat import next_beat_in
from prime.roles.miner.node import build_task_runtime
from prime.roles.miner.state import MinerState, MinerStore, StateFile
from prime.web import LoopHealth
from tests.support.miner_env import MemoryExecutor, MemoryMaster, wait_until


class SlowEngine(MemoryExecutor):
    """Its snapshot hangs while ``hang`` is set (a busy engine), or fails while ``away`` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hang = False
        self.away = False
        self.released = asyncio.Event()

    async def snapshot(self) -> list[Any]:
        if self.away:
            raise ExecutorError("the Docker engine is not reachable")
        if self.hang:
            await self.released.wait()
        return await super().snapshot()


def _entry(task_id: str) -> dict[str, Any]:
    return {"id": task_id, "replica": 0, "attempt": 0, "gpu_indices": [],
            "spec": {"image": "busybox:1", "command": ["true"]}}


async def test_a_hanging_or_unreachable_engine_does_not_hold_heartbeats_back(tmp_path: Path) -> None:
    executor = SlowEngine(tmp_path)
    master = MemoryMaster(interval_s=0.02)
    store = MinerStore(StateFile(tmp_path), MinerState(node="0x" + "11" * 20, run_id=1,
                                                       master_url="http://master.invalid", master="0x" + "22" * 20))
    runtime = build_task_runtime(executor, store, master, [], LoopHealth())
    beats = runtime.heartbeat
    beats.active = True
    loop = asyncio.create_task(beats.run())
    try:
        master.desired = [_entry("steady")]
        await wait_until(lambda: (master.now("steady") or {}).get("state") == "Running", timeout_s=5, interval_s=0.01,
                         what="Running")

        # The engine hangs: heartbeats go on, with the last known states.
        executor.hang = True
        seen = len(master.heartbeats)
        await wait_until(lambda: len(master.heartbeats) >= seen + 3, timeout_s=10, interval_s=0.01,
                         what="heartbeats while the engine hangs")
        assert all([t["state"] for t in body["tasks"]] == ["Running"] for body in master.heartbeats[seen:])
        executor.released.set()
        executor.hang = False

        # The engine is away: the same.
        executor.away = True
        seen = len(master.heartbeats)
        await wait_until(lambda: len(master.heartbeats) >= seen + 3, timeout_s=10, interval_s=0.01,
                         what="heartbeats while the engine is away")
        assert (master.now("steady") or {}).get("state") == "Running"

        # For at most the stale limit: then the node stops heartbeating (its engine is gone).
        beats.stale_reports_s = 0.0
        await wait_until(lambda: store.state.last_heartbeat_error, timeout_s=10, interval_s=0.01, what="a failed beat")
        assert "could not be listed" in (store.state.last_heartbeat_error or "")
        executor.away = False
        await wait_until(lambda: store.state.last_heartbeat_error is None, timeout_s=10, interval_s=0.01,
                         what="heartbeats again once the engine is back")
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await runtime.converger.close()


@pytest.mark.parametrize(("took", "delay"), [(0.0, 1.0), (0.3, 0.7), (1.5, 0.0), (-2.0, 1.0)])
def test_the_next_beat_is_one_interval_after_the_last_one_began(took: float, delay: float) -> None:
    assert next_beat_in(1.0, took) == pytest.approx(delay)


async def test_closing_a_converger_ends_its_engine_watcher_thread_and_starts_none_again(
        docker_client, tmp_path: Path) -> None:
    import threading

    from prime.roles.miner.executor import DockerExecutor
    from prime.roles.miner.heartbeat import Converger

    def watchers() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "prime-engine-events" and t.is_alive())

    before = watchers()
    executor = DockerExecutor(None, tmp_path, "0x" + "33" * 20, network_mode="none")
    converger = Converger(executor, [])
    await converger.converge([])
    await wait_until(lambda: watchers() > before, timeout_s=10, interval_s=0.05, what="the watcher thread")
    await converger.close()
    await wait_until(lambda: watchers() == before, timeout_s=10, interval_s=0.05, what="the watcher thread to end")
    await converger.converge([])  # a round after close (a loop not stopped yet)
    await asyncio.sleep(0.5)
    assert converger._watcher is None or converger._watcher.done()
    assert watchers() == before
