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
