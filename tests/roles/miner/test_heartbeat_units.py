"""Pure parts of the heartbeat module, and the converger's decisions against a fake executor
(a unit test of this one module; the Docker-backed behaviour is in test_heartbeat.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from prime.protocol.heartbeat import DesiredReplica, HeartbeatRequest
from prime.protocol.tasks import ReplicaState, TaskSpec
from prime.roles.miner.executor import InvalidTaskSpec, TaskState, TaskStatus
from prime.roles.miner.executor import TaskSpec as ExecutorSpec
from prime.roles.miner.heartbeat import Converger, executor_spec, load_sample, physical_gpus, replica_reports, report_state


def _desired(task_id: str = "t1", *, replica: int = 0, attempt: int = 0, gpus: tuple[int, ...] = (), **spec) -> DesiredReplica:
    return DesiredReplica(task_id, replica, attempt, gpus, TaskSpec.from_json({"image": "busybox:1", "command": ["true"], **spec}))


def test_gpu_positions_map_to_the_offered_cards() -> None:
    assert physical_gpus([0, 1], [2, 5]) == [2, 5]
    assert physical_gpus([1], [2, 5]) == [5]
    assert physical_gpus([], []) == []
    with pytest.raises(InvalidTaskSpec, match="offers only 2"):
        physical_gpus([2], [2, 5])


def test_executor_spec_from_a_desired_replica() -> None:
    spec = executor_spec(
        _desired("abc", replica=2, attempt=3, gpus=(1,), env={"A": "1"}, persistent=True, cpu_limit=1.5, memory_limit_mib=512, restart="on-failure"),
        [4, 6],
    )
    assert spec.task_id == "abc" and spec.replica == 2 and spec.image == "busybox:1" and spec.command == ["true"]
    assert spec.gpus == [6] and spec.persistent and spec.cpu_limit == 1.5 and spec.memory_limit_mib == 512
    assert spec.restart == "on-failure" and spec.env == {"A": "1", "PRIME_ATTEMPT": "3"}
    # A new attempt is a different container (different spec hash), the same attempt the same one.
    assert executor_spec(_desired(attempt=1), []).spec_hash() != executor_spec(_desired(attempt=0), []).spec_hash()
    assert executor_spec(_desired(attempt=1), []).spec_hash() == executor_spec(_desired(attempt=1), []).spec_hash()


def test_reports_for_the_master() -> None:
    on_failure = ExecutorSpec(task_id="r", image="x", restart="on-failure")
    statuses = [
        TaskStatus("a", 0, TaskState.RUNNING),
        TaskStatus("b", 1, TaskState.COMPLETED, exit_code=0),
        TaskStatus("r", 0, TaskState.FAILED, exit_code=3, reason="exited with code 3"),
        TaskStatus("not.a.master.id", 0, TaskState.RUNNING),
    ]
    reports = replica_reports(statuses, [on_failure], {("c", 0): "The master assigned GPU 4 but this node offers only 0 GPU(s)."})
    by_id = {r.id: r for r in reports}
    assert set(by_id) == {"a", "b", "c", "r"}
    assert by_id["b"].state == ReplicaState.COMPLETED and by_id["b"].exit_code == 0 and by_id["b"].replica == 1
    assert by_id["r"].state == ReplicaState.PULLING and by_id["r"].error == "exited with code 3"  # will be restarted
    assert by_id["c"].state == ReplicaState.FAILED and "GPU 4" in by_id["c"].error
    assert report_state(TaskStatus("r", 0, TaskState.FAILED), replace(on_failure, max_restarts=0)) == ReplicaState.FAILED
    request = HeartbeatRequest(tuple(reports), (), load_sample())
    assert HeartbeatRequest.from_json(request.to_json()) == request  # the master's strict parser agrees


class FakeExecutor:
    """Records what the converger asks of it; containers are (key → TaskStatus)."""

    def __init__(self) -> None:
        self.containers: dict[tuple[str, int], TaskStatus] = {}
        self.specs: dict[tuple[str, int], ExecutorSpec] = {}
        self.stopped: list[tuple[str, int | None]] = []
        self.started: list[str] = []

    def known_specs(self) -> list[ExecutorSpec]:
        return list(self.specs.values())

    async def list_states(self) -> list[TaskStatus]:
        return list(self.containers.values())

    async def stop(self, task_id: str, replica: int | None = None) -> bool:
        self.stopped.append((task_id, replica))
        return self.containers.pop((task_id, replica or 0), None) is not None

    async def ensure_running(self, spec: ExecutorSpec, on_progress=None) -> TaskStatus:
        self.specs[spec.key] = spec
        self.started.append(spec.task_id)
        status = self.containers.setdefault(spec.key, TaskStatus(spec.task_id, spec.replica, TaskState.RUNNING))
        return status


async def test_converger_starts_stops_and_keeps_finished_ones_a_while() -> None:
    now = [0.0]
    executor = FakeExecutor()
    converger = Converger(executor, [], retention_s=100, push_grace_s=10, clock=lambda: now[0])
    await converger.converge([_desired("a"), _desired("b")])
    assert sorted(executor.started) == ["a", "b"]

    executor.containers[("b", 0)] = TaskStatus("b", 0, TaskState.COMPLETED, exit_code=0)
    await converger.converge([])  # a runs but is no longer wanted: stopped; b finished: kept
    assert executor.stopped == [("a", 0)] and ("b", 0) in executor.containers
    now[0] = 150
    await converger.converge([])
    assert executor.stopped[-1] == ("b", 0) and not executor.containers

    # A pushed replica survives a desired list computed before the push, for the grace period.
    converger.push(_desired("p"))
    await asyncio.sleep(0.01)
    await converger.converge([])
    assert ("p", 0) in executor.containers
    now[0] = 200
    await converger.converge([])
    assert ("p", 0) not in executor.containers

    # A replica that cannot run here is reported Failed with the reason, and forgotten once undesired.
    await converger.converge([_desired("g", gpus=(0,))])
    assert "offers only 0" in converger.invalid[("g", 0)]
    await converger.converge([])
    assert converger.invalid == {}


async def test_submit_runs_the_latest_list_in_the_background() -> None:
    executor = FakeExecutor()
    converger = Converger(executor, [])
    converger.submit([_desired("one")])
    converger.submit([_desired("two")])  # replaces the list not started yet
    await asyncio.sleep(0.05)
    assert "two" in executor.started and ("one", 0) not in executor.containers
    await converger.close()
