"""The miner's task side in process, with an in-memory executor and an in-memory master:
converging, supervising, pushes and heartbeats, with no Docker (``DOCKER_HOST`` points
nowhere) and no chain."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from prime.protocol.heartbeat import DesiredReplica, HeartbeatRequest
from prime.roles.miner import core
from prime.roles.miner.heartbeat import Converger, load_sample
from prime.roles.miner.node import build_task_runtime
from prime.roles.miner.state import MinerState, MinerStore, StateFile
from prime.web import LoopHealth
from tests.support.miner_env import MemoryExecutor, MemoryMaster, wait_until


@pytest.fixture(autouse=True)
def no_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent")


def entry(task_id: str, *, replica: int = 0, attempt: int = 0, gpus: tuple[int, ...] = (), **spec: Any) -> dict[str, Any]:
    return {"id": task_id, "replica": replica, "attempt": attempt, "gpu_indices": list(gpus),
            "spec": {"image": "busybox:1", "command": ["true"], **spec}}


def desired(task_id: str, **kwargs: Any) -> DesiredReplica:
    return DesiredReplica.from_json(entry(task_id, **kwargs))


async def test_converger_starts_stops_and_keeps_finished_ones_a_while() -> None:
    now = [0.0]
    executor = MemoryExecutor()
    converger = Converger(executor, [], policy=core.Policy(retention_s=100, push_grace_s=10), clock=lambda: now[0])
    await converger.converge([desired("a"), desired("b")])
    assert sorted(k[0] for k in executor.containers) == ["a", "b"]

    executor.finish("b", 0)
    await converger.converge([])  # a runs but is no longer wanted: stopped; b finished: kept
    assert ("stop", ("a", 0)) in executor.calls and ("b", 0) in executor.containers
    now[0] = 150
    await converger.converge([])
    assert not executor.containers

    # A pushed replica survives a desired list computed before the push, for the grace period.
    converger.push(desired("p"))
    await asyncio.sleep(0.01)
    await converger.converge([])
    assert ("p", 0) in executor.containers
    now[0] = 200
    await converger.converge([])
    assert ("p", 0) not in executor.containers

    # A replica that cannot run here is reported Failed with the reason, and forgotten once undesired.
    await converger.converge([desired("g", gpus=(0,))])
    assert "offers only 0" in converger.invalid[("g", 0)]
    await converger.converge([])
    assert converger.invalid == {}


async def test_submit_runs_the_latest_list_in_the_background() -> None:
    executor = MemoryExecutor()
    converger = Converger(executor, [])
    converger.submit([desired("one")])
    converger.submit([desired("two")])  # replaces the list not started yet
    await asyncio.sleep(0.05)
    assert ("two", 0) in executor.containers and ("one", 0) not in executor.containers
    await converger.close()


async def test_supervise_restarts_a_crash_loop_with_backoff_and_never_restarts_never() -> None:
    now = [0.0]
    executor = MemoryExecutor()
    converger = Converger(executor, [], policy=core.Policy(backoff_s=1.0, backoff_max_s=4.0), clock=lambda: now[0])
    await converger.converge([desired("loop", restart="on-failure"), desired("once")])
    executor.finish("loop", 3)
    executor.finish("once", 3)
    restarts = []
    for step in range(40):
        now[0] = step * 0.5
        await converger.supervise()
        if executor.containers[("loop", 0)].state == "Running":
            restarts.append(now[0])
            executor.finish("loop", 3)  # and it crashes again
    assert restarts[:3] == [1.0, 3.5, 8.0] and converger.restarts(("loop", 0)) == len(restarts)
    assert executor.containers[("once", 0)].state == "Failed" and ("restart", ("once", 0)) not in executor.calls


async def test_a_start_that_raises_is_reported_failed_until_the_next_list() -> None:
    class Broken(MemoryExecutor):
        async def start(self, placement: Any, on_progress: Any = None, *, replace: bool = False) -> Any:
            raise RuntimeError("the engine said no")

    converger = Converger(Broken(), [])
    await converger.converge([desired("x")])
    reports = core.reports([], converger.book)
    assert [(r.id, r.state, r.error) for r in reports] == [("x", "Failed", "the engine said no")]


async def test_the_heartbeat_loop_runs_what_the_master_lists_without_docker_or_chain(tmp_path: Path) -> None:
    executor = MemoryExecutor(tmp_path)
    master = MemoryMaster(interval_s=0.02)
    store = MinerStore(StateFile(tmp_path), MinerState(node="0x" + "11" * 20, run_id=1, master_url="http://master.invalid", master="0x" + "22" * 20))
    runtime = build_task_runtime(executor, store, master, [], LoopHealth(), retention_s=0.2)
    runtime.heartbeat.active = True
    loop = asyncio.create_task(runtime.heartbeat.run())
    try:
        await wait_until(lambda: len(master.heartbeats) >= 2, timeout_s=5, interval_s=0.01, what="heartbeats")
        request = HeartbeatRequest.from_json(master.heartbeats[-1])  # the master's own strict parser accepts it
        assert request.tasks == () and "cpu_pct" in request.load

        master.desired = [entry("sleeper"), entry("hello", replica=1)]
        await wait_until(lambda: (master.now("sleeper") or {}).get("state") == "Running", timeout_s=5, interval_s=0.01, what="Running")
        executor.finish("hello", 0, replica=1)
        await wait_until(lambda: (master.now("hello") or {}).get("state") == "Completed", timeout_s=5, interval_s=0.01, what="Completed")
        assert master.now("hello")["replica"] == 1 and master.now("hello")["exit_code"] == 0
        assert executor.started("sleeper") == 1  # kept, not started on every beat

        # The master stops listing both: the running one stops at once, the finished one after the retention.
        master.desired = []
        await wait_until(lambda: ("sleeper", 0) not in executor.containers, timeout_s=5, interval_s=0.01, what="the stop")
        assert ("hello", 1) in executor.containers
        await wait_until(lambda: not executor.containers, timeout_s=5, interval_s=0.01, what="the retention to pass")

        # The master goes away: the failure is recorded and saved; heartbeats resume when it is back.
        master.down = True
        await wait_until(lambda: store.state.last_heartbeat_error, timeout_s=5, interval_s=0.01, what="a failure")
        # Saved off the loop, just after the state changed: waited for, not raced.
        await wait_until(lambda: StateFile(tmp_path).load().last_heartbeat_error == "the master is down", timeout_s=5,
                         interval_s=0.01, what="the failure saved")
        master.down = False
        await wait_until(lambda: store.state.last_heartbeat_error is None, timeout_s=10, interval_s=0.01, what="a beat again")
        await wait_until(lambda: StateFile(tmp_path).load().last_heartbeat_error is None, timeout_s=5, interval_s=0.01,
                         what="the beat saved")
        saved = StateFile(tmp_path).load()
        assert saved.last_heartbeat_error is None and saved.heartbeat_interval_s == pytest.approx(0.02)
        assert runtime.heartbeat.beats >= 4
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await runtime.converger.close()


async def test_the_store_writes_off_the_loop_and_coalesces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    file = StateFile(tmp_path)
    writes: list[str] = []
    original = file.write

    def write(data: dict[str, Any]) -> None:
        writes.append(threading.current_thread().name)
        original(data)

    monkeypatch.setattr(file, "write", write)
    store = MinerStore(file, MinerState(node="0x1", run_id=1))
    await asyncio.gather(*(store.heartbeat_failed(f"failure {i}") for i in range(20)))
    assert 1 <= len(writes) < 20 and threading.main_thread().name not in writes
    assert file.load().last_heartbeat_error == "failure 19"
    await store.joined("http://m", "0x" + "22" * 20, None, 5.0)
    await store.joined("http://m2", "0x" + "22" * 20, None, 9.0)  # no transaction: joined_at stays
    assert (file.load().master_url, file.load().joined_at) == ("http://m2", 5.0)


def test_load_sample() -> None:
    load = load_sample()
    assert {"cpu_pct", "mem_used_mib", "mem_total_mib"} <= set(load)


def test_the_node_takes_its_executor_and_builds_none_itself(tmp_path: Path) -> None:
    from eth_account import Account

    from prime.roles.miner.executor import DockerExecutor
    from prime.roles.miner.node import MinerNode, MinerOptions

    options = MinerOptions(run_id=1, rpc_url="http://127.0.0.1:9", deployment=tmp_path / "none.json", data_dir=tmp_path)
    account = Account.create()
    memory = MemoryExecutor(tmp_path)
    assert MinerNode(options, account, executor=memory).executor is memory
    default = MinerNode(options, account).executor  # made, but it has not touched Docker (DOCKER_HOST points nowhere)
    assert isinstance(default, DockerExecutor) and default.engine._client is None
