"""The miner's log reading as the master's keeper uses it, on a real Docker engine: one attempt's
container only (``attempt``), the first N lines left out (``skip``, what ``offset`` asks), a line
without end in bounded pieces counted the same on every read, and a container restarted in place
(``restart: on-failure``) keeping the output of its earlier runs."""

from __future__ import annotations

import contextlib
from pathlib import Path

import docker
import pytest

from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import ReplicaState
from prime.roles.miner import core
from prime.roles.miner.executor import MAX_LOG_LINE, DockerExecutor, LogLine, TaskNotFound
from tests.fixtures.docker import remove_prime_containers

pytestmark = pytest.mark.docker

# 5 lines, then 200 000 characters without a newline, then one more line.
SCRIPT = "for i in 1 2 3 4 5; do echo line $i; done; head -c 200000 /dev/zero | tr '\\0' x; echo; echo last"


@pytest.fixture
def executor(docker_client: docker.DockerClient, docker_node_address: str, tmp_path: Path):
    executor = DockerExecutor(docker_client, tmp_path / "miner", docker_node_address, network_mode="none", stop_timeout_s=0)
    yield executor
    remove_prime_containers(docker_client, docker_node_address)


def _placement(image: str, script: str, task_id: str, attempt: int) -> core.Placement:
    entry = {"id": task_id, "replica": 0, "attempt": attempt, "gpu_indices": [],
             "spec": {"image": image, "command": ["sh", "-c", script], "restart": "on-failure", "persistent": True}}
    return core.place(DesiredReplica.from_json(entry), ())


async def _lines(executor: DockerExecutor, task_id: str, **kwargs) -> list[LogLine]:
    async with contextlib.aclosing(executor.logs(task_id, **kwargs)) as stream:
        return [line async for line in stream]


async def _exited(executor: DockerExecutor, task_id: str) -> None:
    import asyncio
    for _ in range(600):
        status = await executor.status(task_id, 0)
        if status is not None and status.state in (ReplicaState.COMPLETED, ReplicaState.FAILED):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the container did not exit")


async def test_an_attempts_lines_from_an_offset_with_a_line_without_end_in_pieces(executor: DockerExecutor, busybox_image: str) -> None:
    await executor.start(_placement(busybox_image, SCRIPT, "logskip", attempt=2))
    await _exited(executor, "logskip")
    every = await _lines(executor, "logskip", attempt=2)
    texts = [line.text for line in every]
    assert texts[:5] == [f"line {i}" for i in range(1, 6)] and texts[-1] == "last"
    pieces = texts[5:-1]
    assert len(pieces) > 1 and all(len(p) <= MAX_LOG_LINE + 16 * 1024 for p in pieces)  # never one 200 000-character line
    assert "".join(pieces) == "x" * 200_000
    assert await _lines(executor, "logskip") == every  # no attempt named: the replica's container
    for skip in (1, 5, 6, len(every) - 1, len(every), len(every) + 3):
        assert await _lines(executor, "logskip", attempt=2, skip=skip) == every[skip:]  # counted the same every time
    with pytest.raises(TaskNotFound):
        await _lines(executor, "logskip", attempt=1)


async def test_a_container_restarted_in_place_keeps_its_earlier_output(executor: DockerExecutor, busybox_image: str) -> None:
    script = "if [ -f /data/ran ]; then echo second run; exit 0; fi; touch /data/ran; echo first run; exit 3"
    await executor.start(_placement(busybox_image, script, "logrestart", attempt=0))
    await _exited(executor, "logrestart")
    status = await executor.status("logrestart", 0)
    assert status is not None and status.state is ReplicaState.FAILED and status.container_id is not None
    first = await _lines(executor, "logrestart", attempt=0)
    assert [line.text for line in first] == ["first run"]
    await executor.restart(("logrestart", 0), status.container_id)  # what the core's on-failure policy does
    await _exited(executor, "logrestart")
    assert [line.text for line in await _lines(executor, "logrestart", attempt=0)] == ["first run", "second run"]
    assert [line.text for line in await _lines(executor, "logrestart", attempt=0, skip=len(first))] == ["second run"]
