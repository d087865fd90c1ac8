"""An engine stop the miner did not ask for is Lost, never Completed (real Docker).

Stopping the shared dockerd would disturb every other test on this machine, so the test does to
one container what dockerd does to each of them when it shuts down or restarts: the engine sends
the container its stop signal (SIGTERM) without the miner asking, and the task's process exits
(here with 0, as many do on SIGTERM). ``docker kill --signal TERM`` is that very signal from the
engine; the miner sees it as a ``kill`` event it has no stop intent for. (In a real shutdown
dockerd closes its API first, so the miner sees its event stream break instead and the exit falls
in the outage window: that half of the rule is tested without Docker in test_exits.py.)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import docker
import pytest

from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import ReplicaState
from prime.roles.miner import core
from prime.roles.miner.executor import DockerExecutor
from prime.roles.miner.heartbeat import Converger
from tests.support.engine_proxy import EngineProxy

# Exits 0 on SIGTERM, after printing a line; otherwise counts to 60 (a minute of "work").
SCRIPT = "trap 'echo term; exit 0' TERM; i=0; while [ $i -lt 60 ]; do i=$((i+1)); sleep 1 & wait $!; done"


async def _until(predicate, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met within {timeout_s}s"
        await asyncio.sleep(0.05)


@pytest.fixture
def executor(docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path) -> DockerExecutor:
    return DockerExecutor(docker_client, tmp_path / "miner", docker_node_address, network_mode="none", stop_timeout_s=0)


async def test_a_task_stopped_by_the_engine_is_lost_not_completed(
    executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    task_id = "t-" + uuid.uuid4().hex[:12]
    entry = DesiredReplica.from_json({"id": task_id, "replica": 0, "attempt": 0, "gpu_indices": [],
                                      "spec": {"image": busybox_image, "command": ["sh", "-c", SCRIPT]}})
    converger = Converger(executor, [])
    assert converger.watch_engine
    try:
        await converger.converge([entry])

        async def running():  # type: ignore[no-untyped-def]
            status = await executor.status(task_id)
            return status if status and status.state is ReplicaState.RUNNING and converger.engine_seen_at else None

        status = await _until(running)
        await asyncio.sleep(0.5)  # the trap is set up
        docker_client.containers.get(status.container_id).kill(signal="SIGTERM")  # not the miner's doing

        async def exited():  # type: ignore[no-untyped-def]
            got = await executor.status(task_id)
            return got if got and got.state is not ReplicaState.RUNNING else None

        done = await _until(exited)
        # Docker alone calls it a success: exit 0 after 1 of 60 steps.
        assert (done.state, done.exit_code) == (ReplicaState.COMPLETED, 0)

        async def signalled():  # type: ignore[no-untyped-def]
            return status.container_id in converger.book.marks.signalled

        await _until(signalled)
        plan = await converger.converge([entry])
        [report] = plan.reports
        assert report.state is ReplicaState.LOST and report.attempt == 0, report
        assert "signal 15" in (report.error or "")
        assert [type(a) for a in plan.actions] == [core.Keep]  # not restarted here: the master reschedules it

        # The master moves it (a new attempt): the miner replaces the container, and its own stop
        # of the old one is no outside signal.
        moved = DesiredReplica.from_json({**entry.to_json(), "attempt": 1})
        plan = await converger.converge([moved])
        assert isinstance(plan.actions[0], core.Start) and plan.actions[0].replace
        fresh = await _until(running)
        assert fresh.container_id != status.container_id
        await converger.converge([])  # the miner stops it: a stop it asked for
        await asyncio.sleep(0.5)
        assert fresh.container_id not in converger.book.marks.signalled
    finally:
        await converger.close()
        await executor.stop(task_id)


async def test_a_task_that_exits_while_the_engine_is_away_is_lost(
    busybox_image: str, docker_client: docker.DockerClient, docker_node_address: str, tmp_path: Path
) -> None:
    """The other half of a dockerd restart: the miner reaches the engine through a proxy the test cuts
    (dockerd closes its API first when it stops), the container gets SIGTERM meanwhile and exits 0 (as
    at dockerd's shutdown), and no kill event can reach the miner. Once the engine answers again, the
    exit lies in the outage window: Lost."""
    proxy = EngineProxy(tmp_path / "engine.sock").start()
    client = docker.DockerClient(base_url=proxy.base_url, timeout=10)
    executor = DockerExecutor(client, tmp_path / "miner", docker_node_address, network_mode="none", stop_timeout_s=0)
    task_id = "t-" + uuid.uuid4().hex[:12]
    entry = DesiredReplica.from_json({"id": task_id, "replica": 0, "attempt": 0, "gpu_indices": [],
                                      "spec": {"image": busybox_image, "command": ["sh", "-c", SCRIPT]}})
    converger = Converger(executor, [])
    try:
        await converger.converge([entry])

        async def running():  # type: ignore[no-untyped-def]
            status = await executor.status(task_id)
            return status if status and status.state is ReplicaState.RUNNING and converger.engine_seen_at else None

        status = await _until(running)
        await asyncio.sleep(0.5)  # the trap is set up
        proxy.cut()  # the engine's API goes away first...

        async def away():  # type: ignore[no-untyped-def]
            return converger.book.marks.away_since is not None

        await _until(away, timeout_s=10)
        direct = docker_client.containers.get(status.container_id)
        direct.kill(signal="SIGTERM")  # ...then it stops the containers
        assert direct.wait(timeout=30)["StatusCode"] == 0
        await asyncio.sleep(2.5)  # past the engine's replay of recent events on reconnect: no kill event is seen
        proxy.start()  # the engine is back

        async def lost():  # type: ignore[no-untyped-def]
            try:
                plan = await converger.converge([entry])
            except Exception:  # noqa: BLE001 - the client may still hold a dead connection
                return None
            return plan if plan.reports and plan.reports[0].state is not ReplicaState.RUNNING else None

        plan = await _until(lost, timeout_s=30)
        [report] = plan.reports
        assert report.state is ReplicaState.LOST, report
        assert "while the Docker engine was away" in (report.error or "")
        assert status.container_id not in converger.book.marks.signalled  # the outage told, not a kill event
    finally:
        await converger.close()
        if not proxy.path.exists():
            proxy.start()
        await executor.stop(task_id)
        proxy.cut()
        client.close()
