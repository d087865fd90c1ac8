"""The Docker executor against the real engine (busybox image, network none), the converger driving
it (restart policy), and the Docker translation's pure parts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import tarfile
import threading
import time
import uuid
from pathlib import Path

import docker
import docker.errors
import pytest

from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import ReplicaState as TaskState
from prime.roles.miner import core
from prime.roles.miner.containers import (
    LABEL_HASH,
    LABEL_INSTANCE,
    LABEL_NODE,
    LABEL_TASK,
    build_container_kwargs,
    container_name,
    parse_log_frame,
    restart_policy,
    state_from_inspect,
    status_of,
)
from prime.roles.miner.core import Placement
from prime.roles.miner.executor import DockerExecutor, LogLine, TaskNotFound
from prime.roles.miner.heartbeat import Converger
from prime.roles.miner.images import PullProgress
from prime.roles.miner.preflight import nvidia_runtime_available
from prime.roles.miner.registries import RegistryPolicy
from prime.roles.miner.storage import ManifestCache, manifest

# ---------------------------------------------------------------- helpers


def _task_id() -> str:
    return "t-" + uuid.uuid4().hex[:12]


@pytest.fixture
def executor(docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path) -> DockerExecutor:
    return DockerExecutor(docker_client, tmp_path / "miner", docker_node_address, network_mode="none", pull_backoff_s=0.05, stop_timeout_s=0)


def _placement(image: str, command: list[str] | None = None, *, task_id: str | None = None, replica: int = 0, attempt: int = 0,
               gpus: tuple[int, ...] = (), **spec) -> Placement:
    """A placement as the converger makes it from the master's desired entry (GPU indices given as is)."""
    entry = {"id": task_id or _task_id(), "replica": replica, "attempt": attempt, "gpu_indices": list(range(len(gpus))),
             "spec": {"image": image, "command": command or [], **spec}}
    return core.place(DesiredReplica.from_json(entry), gpus)


def _spec(busybox_image: str, script: str, **kwargs) -> Placement:
    return _placement(busybox_image, ["sh", "-c", script], **kwargs)


def _desired(placement: Placement) -> DesiredReplica:
    return placement.desired


async def _wait(executor: DockerExecutor, task_id: str, replica: int = 0, timeout_s: float = 60):
    """The replica's state once its container has exited."""
    async def final():
        status = await executor.status(task_id, replica)
        return status if status and status.state in (TaskState.COMPLETED, TaskState.FAILED) else None
    return await _until(final, timeout_s=timeout_s)


def _containers(client: docker.DockerClient, node: str, task_id: str | None = None) -> list:
    labels = [f"{LABEL_NODE}={node}"] + ([f"{LABEL_TASK}={task_id}"] if task_id else [])
    return client.containers.list(all=True, filters={"label": labels}, ignore_removed=True)


async def _lines(executor: DockerExecutor, task_id: str, **kwargs) -> list[LogLine]:
    async with contextlib.aclosing(executor.logs(task_id, **kwargs)) as stream:
        return [line async for line in stream]


async def _until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05):
    """Poll an async predicate until it returns something truthy (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


# ---------------------------------------------------------------- real engine


async def test_task_writes_logs_and_files_then_completes(executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient) -> None:
    script = "echo line1; echo err1 >&2; echo line2; echo hello > /data/out.txt; mkdir -p /data/sub; seq 1 100 > /data/sub/numbers; id -u; printf no-newline"
    spec = _spec(busybox_image, script, persistent=True, env={"GREETING": "hi"})
    started = await executor.start(spec)
    assert started.state in (TaskState.RUNNING, TaskState.COMPLETED)
    done = await _wait(executor, spec.task_id)
    assert (done.state, done.exit_code, done.reason) == (TaskState.COMPLETED, 0, None)
    assert done.spec_hash == spec.spec_hash()

    lines = await _lines(executor, spec.task_id)
    assert [line.text for line in lines if line.stream == "stdout"] == ["line1", "line2", "0", "no-newline"]
    assert [line.text for line in lines if line.stream == "stderr"] == ["err1"]
    assert all(line.timestamp and line.timestamp.endswith("Z") for line in lines)
    assert [line.text for line in await _lines(executor, spec.task_id, tail=1)] == ["no-newline"]

    data = executor.task_data_dir(spec.task_id)
    assert (data / "out.txt").read_text() == "hello\n"
    assert (data / "sub" / "numbers").read_text().splitlines() == [str(i) for i in range(1, 101)]
    assert [(e.path, e.size) for e in manifest(data, cache=ManifestCache())] == [("out.txt", 6), ("sub/numbers", 292)]

    # The container as Docker sees it: labelled, unprivileged, no capabilities, no Docker restarts.
    container = docker_client.containers.get(container_name(executor.instance, spec.task_id))
    host = container.attrs["HostConfig"]
    assert container.labels[LABEL_TASK] == spec.task_id and container.labels[LABEL_HASH] == spec.spec_hash()
    assert container.labels[LABEL_INSTANCE] == executor.instance and container.labels[LABEL_NODE] == executor.node_address
    assert host["Privileged"] is False and host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert host["NetworkMode"] == "none" and host["RestartPolicy"]["Name"] == "no"
    env = container.attrs["Config"]["Env"]
    assert "GREETING=hi" in env and f"PRIME_TASK_ID={spec.task_id}" in env and "PRIME_ATTEMPT=0" in env


async def test_failing_command_is_failed_with_its_exit_code_and_not_restarted(executor: DockerExecutor, busybox_image: str) -> None:
    spec = _spec(busybox_image, "echo run >> /data/runs; echo broken >&2; exit 7", persistent=True)
    converger = Converger(executor, [], policy=core.Policy(backoff_s=0.05))
    await converger.converge([_desired(spec)])
    done = await _wait(executor, spec.task_id)
    assert (done.state, done.exit_code) == (TaskState.FAILED, 7)
    assert "7" in (done.reason or "")
    # Default policy is "never": looking at it again (well past the backoff) does not restart it.
    for _ in range(3):
        await converger.converge([_desired(spec)])
        await converger.supervise()
        await asyncio.sleep(0.1)
    status = await executor.status(spec.task_id)
    assert (status.state, status.exit_code, converger.restarts(status.key)) == (TaskState.FAILED, 7, 0)
    assert (executor.task_data_dir(spec.task_id) / "runs").read_text() == "run\n"


async def test_restart_on_failure_restarts_the_same_container_with_backoff(executor: DockerExecutor, busybox_image: str) -> None:
    spec = _spec(busybox_image, "echo run >> /data/runs; exit 3", persistent=True, restart="on-failure")
    converger = Converger(executor, [], policy=core.Policy(backoff_s=0.05, backoff_max_s=0.2))
    await converger.converge([_desired(spec)])
    first = await executor.status(spec.task_id)
    runs = executor.task_data_dir(spec.task_id) / "runs"

    async def restarted_twice():
        await converger.supervise()
        return converger.restarts(spec.key) >= 2 and runs.read_text().count("run") >= 3

    await _until(restarted_twice)
    status = await executor.status(spec.task_id)
    assert status.container_id == first.container_id and status.restart == "on-failure"
    # While it waits for its next restart, the master hears that it is not final.
    failed = await _wait(executor, spec.task_id)
    assert failed.exit_code == 3 and core.reports([failed], converger.book)[0].state == TaskState.PULLING
    # The master stops listing it: stopped at once (a restartable replica is not kept).
    await converger.converge([])
    assert await executor.status(spec.task_id) == core.ReplicaStatus(spec.task_id, 0, TaskState.STOPPED)


async def test_stop_removes_the_container(executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient) -> None:
    spec = _spec(busybox_image, "sleep 600")
    assert (await executor.start(spec)).state is TaskState.RUNNING
    assert len(_containers(docker_client, executor.node_address, spec.task_id)) == 1
    assert await executor.stop(spec.task_id) is True
    assert _containers(docker_client, executor.node_address, spec.task_id) == []
    assert (await executor.status(spec.task_id)).state is TaskState.STOPPED
    assert await executor.stop(spec.task_id) is False
    assert spec.task_id not in {s.task_id for s in await executor.snapshot()}


@pytest.mark.parametrize("on_term", ["exit 0", "exit 3"])
async def test_a_container_that_exits_on_the_miners_stop_is_stopped_until_removed(
        executor: DockerExecutor, busybox_image: str, on_term: str) -> None:
    """The window between the container's exit on SIGTERM and its removal: a heartbeat snapshot
    taken there said Completed (the task trapped TERM and exited 0) and the master kept it."""
    spec = _spec(busybox_image, f"trap '{on_term}' TERM; sleep 600 & wait")
    assert (await executor.start(spec)).state is TaskState.RUNNING
    exited, go_on = asyncio.Event(), asyncio.Event()
    engine_call = executor._docker

    async def pause_after_the_stop(fn, *args, **kwargs):  # the real engine calls, a pause before the removal
        if getattr(fn, "__name__", "") == "stop":
            kwargs["timeout"] = 5  # time for the trap to run (the fixture's executor kills at once)
            result = await engine_call(fn, *args, **kwargs)
            exited.set()
            await go_on.wait()
            return result
        return await engine_call(fn, *args, **kwargs)

    executor._docker = pause_after_the_stop  # type: ignore[method-assign]
    stopping = asyncio.ensure_future(executor.stop(spec.task_id))
    await asyncio.wait_for(exited.wait(), 30)
    seen = {s.key: s for s in await executor.snapshot()}[spec.key]
    assert seen.state is TaskState.STOPPED, seen
    assert seen.container_id is not None  # the exited container itself, read while the stop is on
    assert (await executor.status(spec.task_id)).state is TaskState.STOPPED
    go_on.set()
    assert await stopping is True
    assert (await executor.status(spec.task_id)).state is TaskState.STOPPED
    # the mark goes with the stop: the replica's next container reads as Docker says
    again = await executor.start(_spec(busybox_image, "exit 0", task_id=spec.task_id))
    assert again.state in (TaskState.RUNNING, TaskState.COMPLETED)
    assert (await _wait(executor, spec.task_id)).state is TaskState.COMPLETED


async def test_restarted_miner_adopts_instead_of_duplicating(
    executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    spec = _spec(busybox_image, "sleep 600", persistent=True, restart="on-failure")
    first = await executor.start(spec)
    assert first.state is TaskState.RUNNING

    restarted = DockerExecutor(docker_client, executor.data_dir, executor.node_address, network_mode="none")
    adopted = await restarted.snapshot()
    assert [(s.task_id, s.state, s.container_id, s.restart) for s in adopted] == [
        (spec.task_id, TaskState.RUNNING, first.container_id, "on-failure")  # the policy came back from the label
    ]
    converger = Converger(restarted, [])
    plan = await converger.converge([_desired(spec)])
    assert [type(a) for a in plan.actions] == [core.Keep]
    assert len(_containers(docker_client, executor.node_address, spec.task_id)) == 1
    assert (await restarted.status(spec.task_id)).container_id == first.container_id


async def test_converging_on_the_desired_set(executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient) -> None:
    a, b, c = (_spec(busybox_image, "sleep 600") for _ in range(3))
    converger = Converger(executor, [])
    await converger.converge([_desired(a), _desired(b)])
    started = {s.task_id: s.container_id for s in await executor.snapshot()}
    assert {s.state for s in await executor.snapshot()} == {TaskState.RUNNING}

    await converger.converge([_desired(a), _desired(c)])
    states = {s.task_id: s for s in await executor.snapshot()}
    assert {k: s.state for k, s in states.items()} == {a.task_id: TaskState.RUNNING, c.task_id: TaskState.RUNNING}
    assert states[a.task_id].container_id == started[a.task_id]  # left alone
    assert _containers(docker_client, executor.node_address, b.task_id) == []  # undesired: stopped
    assert (await executor.status(b.task_id)).state is TaskState.STOPPED

    changed = _placement(busybox_image, ["sh", "-c", "sleep 600"], task_id=a.task_id, attempt=1)  # same replica, new attempt: replaced
    plan = await converger.converge([_desired(changed)])
    assert [type(x) for x in plan.of(core.Start)] == [core.Start] and plan.of(core.Start)[0].replace
    now = await executor.status(a.task_id)
    assert now.container_id != started[a.task_id] and now.spec_hash == changed.spec_hash()
    remaining = _containers(docker_client, executor.node_address)
    assert [ct.labels[LABEL_TASK] for ct in remaining] == [a.task_id]
    await converger.converge([])
    assert _containers(docker_client, executor.node_address) == []


async def test_replicas_get_their_own_containers(executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient) -> None:
    task_id = _task_id()
    replicas = [_spec(busybox_image, "sleep 600", task_id=task_id, replica=r) for r in (0, 1)]
    await Converger(executor, []).converge([_desired(r) for r in replicas])
    names = sorted(ct.name for ct in _containers(docker_client, executor.node_address, task_id))
    prefix = f"prime-{executor.instance[:8]}-{task_id}"
    assert names == [f"{prefix}-r0-a0", f"{prefix}-r1-a0"]
    await executor.stop(task_id, replica=1)
    assert [ct.name for ct in _containers(docker_client, executor.node_address, task_id)] == [f"{prefix}-r0-a0"]


async def test_unpullable_image_fails_with_a_reason(executor: DockerExecutor, docker_client: docker.DockerClient) -> None:
    # Port 1 on loopback: refused at once, with or without internet (allowed, as by --allow-registry).
    executor.registries = RegistryPolicy.from_flags(["127.0.0.1:1"])
    spec = _placement("127.0.0.1:1/prime-missing:v1", ["true"])
    events: list[PullProgress] = []
    status = await executor.start(spec, on_progress=events.append)
    assert status.state is TaskState.FAILED and status.container_id is None
    assert "127.0.0.1:1/prime-missing:v1" in status.reason and "could not be pulled" in status.reason
    assert events and events[-1].done and events[-1].error  # the pull's end is told, with why (the console's last line)
    assert _containers(docker_client, executor.node_address, spec.task_id) == []
    assert (await executor.status(spec.task_id)).state is TaskState.FAILED
    assert spec.task_id in {s.task_id for s in await executor.snapshot()}
    again = await executor.start(spec)  # retried later with backoff; never a crash
    assert again.state is TaskState.FAILED
    assert await executor.stop(spec.task_id) is True
    assert spec.task_id not in {s.task_id for s in await executor.snapshot()}


async def test_missing_image_is_pulled_with_per_layer_progress(
    executor: DockerExecutor, docker_client: docker.DockerClient, busybox_image: str, local_registry: str
) -> None:
    # A fresh layer that exists nowhere but in the registry, so the pull really downloads it.
    payload = os.urandom(512 * 1024)
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", f"FROM {busybox_image}\nCOPY payload /payload\n".encode()), ("payload", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    repository, tag = f"{local_registry}/prime-pull-test", uuid.uuid4().hex[:12]
    image = f"{repository}:{tag}"
    built, _ = docker_client.images.build(fileobj=context, custom_context=True, tag=image, network_mode="none", rm=True)
    for event in docker_client.images.push(repository, tag=tag, stream=True, decode=True):
        assert "error" not in event, event
    docker_client.images.remove(built.id, force=True)
    executor.registries = RegistryPolicy.from_flags([local_registry])  # a loopback registry: the operator's choice
    try:
        events: list[PullProgress] = []
        spec = _placement(image, ["sh", "-c", "sha256sum /payload"])
        await executor.start(spec, on_progress=events.append)
        done = await _wait(executor, spec.task_id)
        assert done.state is TaskState.COMPLETED
        assert (await _lines(executor, spec.task_id))[0].text.startswith(hashlib.sha256(payload).hexdigest())
        layers = {e.layer for e in events if e.layer and e.status == "Pull complete"}
        assert layers, [e.status for e in events]
        assert any(e.total for e in events if e.status == "Downloading")
        assert events[-1].done and events[-1].error is None and not any(e.done for e in events[:-1])

        # Present now: a second task with the same image does not pull.
        events.clear()
        other = _placement(image, ["true"])
        await executor.start(other, on_progress=events.append)
        assert events == []
    finally:
        with contextlib.suppress(docker.errors.APIError):
            await Converger(executor, []).converge([])
            docker_client.images.remove(image, force=True)


async def test_follow_logs_until_exit(executor: DockerExecutor, busybox_image: str) -> None:
    spec = _spec(busybox_image, "echo a; sleep 1; echo b >&2; sleep 1; echo c")
    await executor.start(spec)
    lines = await _lines(executor, spec.task_id, follow=True)
    assert [(line.stream, line.text) for line in lines] == [("stdout", "a"), ("stderr", "b"), ("stdout", "c")]


async def test_leaving_a_followed_log_early_ends_its_reader(executor: DockerExecutor, busybox_image: str) -> None:
    spec = _spec(busybox_image, "echo first; sleep 600")
    await executor.start(spec)

    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == f"prime-logs-{spec.task_id}"]

    async with contextlib.aclosing(executor.logs(spec.task_id, follow=True)) as stream:
        async for line in stream:
            assert line.text == "first"
            break
    await _until(lambda: asyncio.sleep(0, result=not readers()), timeout_s=15)
    # The event loop was never blocked: other work ran while the container kept running.
    assert (await executor.status(spec.task_id)).state is TaskState.RUNNING


async def test_logs_of_an_unknown_task(executor: DockerExecutor) -> None:
    with pytest.raises(TaskNotFound):
        await _lines(executor, "no-such-task")
    assert await executor.status("no-such-task") is None


async def test_gpu_request_on_this_engine(executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient) -> None:
    spec = _spec(busybox_image, "true", gpus=(0,))
    status = await executor.start(spec)
    if nvidia_runtime_available(docker_client.info()):
        assert status.state in (TaskState.RUNNING, TaskState.COMPLETED)
    else:  # no NVIDIA runtime: a Failed task that says why, not a crash
        assert status.state is TaskState.FAILED and "nvidia" in (status.reason or "")
    assert status.gpus == "0"


# ---------------------------------------------------------------- pure parts


def test_gpu_device_requests_by_index(tmp_path: Path) -> None:
    spec = _placement("trainer:1", ["python", "train.py"], task_id="job1", env={"A": "1"}, gpus=(2, 0), persistent=True,
                      cpu_limit=1.5, memory_limit_mib=2048)
    kwargs = build_container_kwargs(spec, node_address="0xabc", instance="0123456789abcdef", data_mount=tmp_path, network_mode="host")
    (request,) = kwargs["device_requests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == ["0", "2"] and request["Capabilities"] == [["gpu"]]
    assert "Count" not in request or request["Count"] in (None, 0)
    assert kwargs["name"] == "prime-01234567-job1-r0-a0"
    assert kwargs["command"] == ["python", "train.py"]
    assert kwargs["nano_cpus"] == 1_500_000_000 and kwargs["mem_limit"] == "2048m" and kwargs["memswap_limit"] == "2048m"
    assert kwargs["privileged"] is False and kwargs["cap_drop"] == ["ALL"] and kwargs["security_opt"] == ["no-new-privileges"]
    assert kwargs["restart_policy"] == {"Name": "no"} and kwargs["network_mode"] == "host"
    (mount,) = kwargs["mounts"]
    assert mount["Target"] == "/data" and mount["Source"] == str(tmp_path) and mount["Type"] == "bind"
    labels = kwargs["labels"]
    assert labels["prime.task_id"] == "job1" and labels["prime.node"] == "0xabc" and labels["prime.replica"] == "0"
    assert labels["prime.instance"] == "0123456789abcdef"
    assert labels["prime.spec_hash"] == spec.spec_hash() and labels["prime.gpus"] == "0,2"
    assert json.loads(labels["prime.spec"]) == spec.record() and restart_policy(labels["prime.spec"]) == "never"
    assert kwargs["environment"]["A"] == "1" and kwargs["environment"]["PRIME_ATTEMPT"] == "0"

    none = build_container_kwargs(_placement("x", task_id="cpu"), node_address="0xabc", instance="0123456789abcdef", data_mount=None, network_mode="none")
    assert "device_requests" not in none and "command" not in none and "nano_cpus" not in none and "mem_limit" not in none
    assert "mounts" not in none


def test_a_container_read_back_as_the_core_sees_it() -> None:
    spec = _placement("x", ["true"], task_id="back", replica=2, restart="on-failure")
    labels = build_container_kwargs(spec, node_address="0xabc", instance="0123456789abcdef", data_mount=None, network_mode="none")["labels"]

    class Container:
        id = "c1"

    container = Container()
    container.labels = labels
    container.attrs = {"State": {"Status": "exited", "ExitCode": 4}}
    assert status_of(container) == core.ReplicaStatus(
        "back", 2, TaskState.FAILED, exit_code=4, reason="exited with code 4", container_id="c1",
        spec_hash=spec.spec_hash(), gpus="", restart="on-failure", attempt=0,
    )
    container.labels = {**labels, "prime.spec": "not json"}
    assert status_of(container).restart is None  # reported, but never restarted: its policy is unknown


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"Status": "running", "ExitCode": 0}, (TaskState.RUNNING, None)),
        ({"Status": "created", "ExitCode": 0, "Error": ""}, (TaskState.PULLING, None)),
        ({"Status": "created", "ExitCode": 127, "Error": "exec: not found"}, (TaskState.FAILED, 127)),
        ({"Status": "exited", "ExitCode": 0}, (TaskState.COMPLETED, 0)),
        ({"Status": "exited", "ExitCode": 2}, (TaskState.FAILED, 2)),
        ({"Status": "exited", "ExitCode": 137, "OOMKilled": True}, (TaskState.FAILED, 137)),
        ({"Status": "dead", "ExitCode": 1}, (TaskState.FAILED, 1)),
    ],
)
def test_state_from_inspect(state: dict, expected: tuple) -> None:
    got_state, exit_code, reason = state_from_inspect({"State": state})
    assert (got_state, exit_code) == expected
    assert (reason is not None) == (got_state is TaskState.FAILED)
    if state.get("OOMKilled"):
        assert "memory" in reason


def test_log_frame_timestamps() -> None:
    assert parse_log_frame(b"2026-01-01T00:00:00.000000000Z hello\n") == ("2026-01-01T00:00:00.000000000Z", "hello\n")
    assert parse_log_frame(b"no timestamp here") == (None, "no timestamp here")
