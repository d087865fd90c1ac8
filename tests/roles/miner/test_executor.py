"""The Docker executor against the real engine (busybox image, network none), plus its pure parts."""

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

from prime.roles.miner.executor import (
    LABEL_HASH,
    LABEL_NODE,
    LABEL_TASK,
    DockerExecutor,
    InvalidTaskSpec,
    LogLine,
    PullProgress,
    TaskNotFound,
    TaskSpec,
    TaskState,
    backoff_delay,
    build_container_kwargs,
    container_name,
    gpu_assignment,
    state_from_inspect,
)
from prime.roles.miner.preflight import nvidia_runtime_available
from prime.roles.miner.storage import ManifestCache, manifest

# ---------------------------------------------------------------- helpers


def _task_id() -> str:
    return "t-" + uuid.uuid4().hex[:12]


@pytest.fixture
def executor(docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path) -> DockerExecutor:
    return DockerExecutor(docker_client, tmp_path / "miner", docker_node_address, network_mode="none", restart_backoff_s=0.05, stop_timeout_s=0)


def _spec(busybox_image: str, script: str, **kwargs) -> TaskSpec:
    return TaskSpec(task_id=kwargs.pop("task_id", _task_id()), image=busybox_image, command=["sh", "-c", script], **kwargs)


def _containers(client: docker.DockerClient, node: str, task_id: str | None = None) -> list:
    labels = [f"{LABEL_NODE}={node}"] + ([f"{LABEL_TASK}={task_id}"] if task_id else [])
    return client.containers.list(all=True, filters={"label": labels})


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
    started = await executor.ensure_running(spec)
    assert started.state in (TaskState.RUNNING, TaskState.COMPLETED)
    done = await executor.wait(spec.task_id, timeout_s=60)
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
    container = docker_client.containers.get(container_name(spec.task_id))
    host = container.attrs["HostConfig"]
    assert container.labels[LABEL_TASK] == spec.task_id and container.labels[LABEL_HASH] == spec.spec_hash()
    assert host["Privileged"] is False and host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert host["NetworkMode"] == "none" and host["RestartPolicy"]["Name"] == "no"
    assert "GREETING=hi" in container.attrs["Config"]["Env"] and f"PRIME_TASK_ID={spec.task_id}" in container.attrs["Config"]["Env"]


async def test_failing_command_is_failed_with_its_exit_code_and_not_restarted(executor: DockerExecutor, busybox_image: str) -> None:
    spec = _spec(busybox_image, "echo run >> /data/runs; echo broken >&2; exit 7", persistent=True)
    await executor.ensure_running(spec)
    done = await executor.wait(spec.task_id, timeout_s=60)
    assert (done.state, done.exit_code) == (TaskState.FAILED, 7)
    assert "7" in (done.reason or "")
    # Default policy is "never": looking at it again (well past the backoff) does not restart it.
    for _ in range(3):
        await executor.ensure_running(spec)
        await executor.supervise()
        await asyncio.sleep(0.1)
    status = await executor.status(spec.task_id)
    assert (status.state, status.exit_code, status.restarts) == (TaskState.FAILED, 7, 0)
    assert (executor.task_data_dir(spec.task_id) / "runs").read_text() == "run\n"


async def test_restart_on_failure_backs_off_and_stops_at_max_restarts(executor: DockerExecutor, busybox_image: str) -> None:
    spec = _spec(busybox_image, "echo run >> /data/runs; exit 3", persistent=True, restart="on-failure", max_restarts=2)
    await executor.ensure_running(spec)
    runs = executor.task_data_dir(spec.task_id) / "runs"

    async def restarted_twice_and_failed():
        statuses = {s.task_id: s for s in await executor.supervise()}
        status = statuses.get(spec.task_id)
        return status if status and status.restarts == 2 and status.state is TaskState.FAILED else None

    final = await _until(restarted_twice_and_failed)
    assert final.exit_code == 3
    await _until(lambda: asyncio.sleep(0, result=runs.read_text().count("run") == 3))
    for _ in range(3):  # the limit holds
        await executor.supervise()
        await asyncio.sleep(0.1)
    assert runs.read_text() == "run\n" * 3
    assert (await executor.status(spec.task_id)).restarts == 2


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff_delay(n, 1.0, 60.0) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(10_000, 1.0, 300.0) == 300


async def test_stop_removes_the_container(executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient) -> None:
    spec = _spec(busybox_image, "sleep 600")
    assert (await executor.ensure_running(spec)).state is TaskState.RUNNING
    assert len(_containers(docker_client, executor.node_address, spec.task_id)) == 1
    assert await executor.stop(spec.task_id) is True
    assert _containers(docker_client, executor.node_address, spec.task_id) == []
    assert (await executor.status(spec.task_id)).state is TaskState.STOPPED
    assert await executor.stop(spec.task_id) is False
    assert spec.task_id not in {s.task_id for s in await executor.list_states()}


async def test_restarted_miner_adopts_instead_of_duplicating(
    executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    spec = _spec(busybox_image, "sleep 600", persistent=True, restart="on-failure")
    first = await executor.ensure_running(spec)
    assert first.state is TaskState.RUNNING

    restarted = DockerExecutor(docker_client, executor.data_dir, executor.node_address, network_mode="none")
    adopted = await restarted.adopt()
    assert [(s.task_id, s.state, s.container_id) for s in adopted] == [(spec.task_id, TaskState.RUNNING, first.container_id)]
    assert restarted.known_specs() == [spec]  # the spec came back from the container's label

    statuses = await restarted.reconcile([spec])
    assert [(s.task_id, s.container_id) for s in statuses] == [(spec.task_id, first.container_id)]
    assert (await restarted.ensure_running(spec)).container_id == first.container_id
    assert len(_containers(docker_client, executor.node_address, spec.task_id)) == 1
    assert (await restarted.status(spec.task_id)).state is TaskState.RUNNING


async def test_reconcile_converges_on_the_desired_set(executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient) -> None:
    a, b, c = (_spec(busybox_image, "sleep 600") for _ in range(3))
    started = {s.task_id: s.container_id for s in await executor.reconcile([a, b])}
    assert {s.state for s in await executor.list_states()} == {TaskState.RUNNING}

    statuses = await executor.reconcile([a, c])
    assert {s.task_id: s.state for s in statuses} == {a.task_id: TaskState.RUNNING, c.task_id: TaskState.RUNNING}
    assert statuses[0].container_id == started[a.task_id]  # left alone
    assert _containers(docker_client, executor.node_address, b.task_id) == []  # undesired: stopped
    assert (await executor.status(b.task_id)).state is TaskState.STOPPED

    changed = TaskSpec(**{**a.to_dict(), "env": {"NEW": "1"}})  # same task, new spec: replaced
    statuses = await executor.reconcile([changed])
    assert statuses[0].container_id != started[a.task_id]
    assert statuses[0].spec_hash == changed.spec_hash()
    remaining = _containers(docker_client, executor.node_address)
    assert [ct.labels[LABEL_TASK] for ct in remaining] == [a.task_id]
    assert await executor.reconcile([]) == []
    assert _containers(docker_client, executor.node_address) == []


async def test_replicas_get_their_own_containers(executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient) -> None:
    task_id = _task_id()
    replicas = [_spec(busybox_image, "sleep 600", task_id=task_id, replica=r) for r in (0, 1)]
    await executor.reconcile(replicas)
    names = sorted(ct.name for ct in _containers(docker_client, executor.node_address, task_id))
    assert names == [f"prime-task-{task_id}", f"prime-task-{task_id}-r1"]
    await executor.stop(task_id, replica=1)
    assert [ct.name for ct in _containers(docker_client, executor.node_address, task_id)] == [f"prime-task-{task_id}"]


async def test_unpullable_image_fails_with_a_reason(executor: DockerExecutor, docker_client: docker.DockerClient) -> None:
    # Port 1 on loopback: refused at once, with or without internet.
    spec = TaskSpec(task_id=_task_id(), image="127.0.0.1:1/prime-missing:v1", command=["true"])
    events: list[PullProgress] = []
    status = await executor.ensure_running(spec, on_progress=events.append)
    assert status.state is TaskState.FAILED and status.container_id is None
    assert "127.0.0.1:1/prime-missing:v1" in status.reason and "could not be pulled" in status.reason
    assert _containers(docker_client, executor.node_address, spec.task_id) == []
    assert (await executor.status(spec.task_id)).state is TaskState.FAILED
    assert spec.task_id in {s.task_id for s in await executor.list_states()}
    again = await executor.ensure_running(spec)  # retried later with backoff; never a crash
    assert again.state is TaskState.FAILED
    assert await executor.stop(spec.task_id) is True
    assert spec.task_id not in {s.task_id for s in await executor.list_states()}


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
    try:
        events: list[PullProgress] = []
        spec = TaskSpec(task_id=_task_id(), image=image, command=["sh", "-c", "sha256sum /payload"])
        await executor.ensure_running(spec, on_progress=events.append)
        done = await executor.wait(spec.task_id, timeout_s=60)
        assert done.state is TaskState.COMPLETED
        assert (await _lines(executor, spec.task_id))[0].text.startswith(hashlib.sha256(payload).hexdigest())
        layers = {e.layer for e in events if e.layer and e.status == "Pull complete"}
        assert layers, [e.status for e in events]
        assert any(e.total for e in events if e.status == "Downloading")

        # Present now: a second task with the same image does not pull.
        events.clear()
        other = TaskSpec(task_id=_task_id(), image=image, command=["true"])
        await executor.ensure_running(other, on_progress=events.append)
        assert events == []
    finally:
        with contextlib.suppress(docker.errors.APIError):
            await executor.reconcile([])
            docker_client.images.remove(image, force=True)


async def test_follow_logs_until_exit(executor: DockerExecutor, busybox_image: str) -> None:
    spec = _spec(busybox_image, "echo a; sleep 1; echo b >&2; sleep 1; echo c")
    await executor.ensure_running(spec)
    lines = await _lines(executor, spec.task_id, follow=True)
    assert [(line.stream, line.text) for line in lines] == [("stdout", "a"), ("stderr", "b"), ("stdout", "c")]


async def test_leaving_a_followed_log_early_ends_its_reader(executor: DockerExecutor, busybox_image: str) -> None:
    spec = _spec(busybox_image, "echo first; sleep 600")
    await executor.ensure_running(spec)

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
    spec = _spec(busybox_image, "true", gpus=[0])
    status = await executor.ensure_running(spec)
    if nvidia_runtime_available(docker_client.info()):
        assert status.state in (TaskState.RUNNING, TaskState.COMPLETED)
    else:  # no NVIDIA runtime: a Failed task that says why, not a crash
        assert status.state is TaskState.FAILED and "nvidia" in (status.reason or "")
    assert status.gpus == "0"


async def test_gpu_counts_take_free_gpus_by_the_labels_of_running_tasks(
    docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path
) -> None:
    executor = DockerExecutor(docker_client, tmp_path, docker_node_address, network_mode="none", node_gpus=[0, 1, 2, 3])
    # A running task of this node that holds GPUs 0 and 1 (by its label; this engine may have no GPUs).
    docker_client.containers.run(
        busybox_image, ["sleep", "600"], detach=True, network_mode="none", name=f"prime-task-{_task_id()}",
        labels={LABEL_TASK: "holder", LABEL_NODE: docker_node_address, "prime.replica": "0", "prime.gpus": "0,1"},
    )
    status = await executor.ensure_running(_spec(busybox_image, "true", gpus=2))
    assert status.gpus == "2,3"
    too_many = await executor.ensure_running(_spec(busybox_image, "true", gpus=3))
    assert too_many.state is TaskState.FAILED and "only" in too_many.reason and too_many.container_id is None


# ---------------------------------------------------------------- pure parts


def test_gpu_device_requests_by_index_and_all(tmp_path: Path) -> None:
    spec = TaskSpec(task_id="job1", image="trainer:1", command=["python", "train.py"], env={"A": "1"}, gpus=[2, 0],
                    persistent=True, cpu_limit=1.5, memory_limit_mib=2048)
    kwargs = build_container_kwargs(spec, node_address="0xabc", gpus=[0, 2], data_mount=tmp_path, network_mode="host")
    (request,) = kwargs["device_requests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == ["0", "2"] and request["Capabilities"] == [["gpu"]]
    assert "Count" not in request or request["Count"] in (None, 0)
    assert kwargs["name"] == "prime-task-job1"
    assert kwargs["command"] == ["python", "train.py"]
    assert kwargs["nano_cpus"] == 1_500_000_000 and kwargs["mem_limit"] == "2048m" and kwargs["memswap_limit"] == "2048m"
    assert kwargs["privileged"] is False and kwargs["cap_drop"] == ["ALL"] and kwargs["security_opt"] == ["no-new-privileges"]
    assert kwargs["restart_policy"] == {"Name": "no"} and kwargs["network_mode"] == "host"
    (mount,) = kwargs["mounts"]
    assert mount["Target"] == "/data" and mount["Source"] == str(tmp_path) and mount["Type"] == "bind"
    labels = kwargs["labels"]
    assert labels["prime.task_id"] == "job1" and labels["prime.node"] == "0xabc" and labels["prime.replica"] == "0"
    assert labels["prime.spec_hash"] == spec.spec_hash() and labels["prime.gpus"] == "0,2"
    assert TaskSpec.from_dict(json.loads(labels["prime.spec"])) == spec
    assert kwargs["environment"]["A"] == "1"

    every = build_container_kwargs(spec, node_address="0xabc", gpus="all", data_mount=None, network_mode="none")
    (request,) = every["device_requests"]
    assert request["Driver"] == "nvidia" and request["Count"] == -1 and not request.get("DeviceIDs")
    assert "mounts" not in every

    none = build_container_kwargs(TaskSpec(task_id="cpu", image="x"), node_address="0xabc", gpus=[], data_mount=None, network_mode="none")
    assert "device_requests" not in none and "command" not in none and "nano_cpus" not in none and "mem_limit" not in none


def test_gpu_assignment() -> None:
    assert gpu_assignment([3, 1], None, set()) == [1, 3]
    assert gpu_assignment("all", None, set()) == "all"
    assert gpu_assignment("all", [1, 3], set()) == [1, 3]  # the node's GPUs, not the host's
    assert gpu_assignment(2, [0, 1, 2, 3], {0, 2}) == [1, 3]
    assert gpu_assignment(0, [0], set()) == []
    with pytest.raises(InvalidTaskSpec, match="only 1"):
        gpu_assignment(2, [0, 1], {1})
    with pytest.raises(InvalidTaskSpec, match="does not offer"):
        gpu_assignment([5], [0, 1], set())
    with pytest.raises(InvalidTaskSpec, match="not known"):
        gpu_assignment(1, None, set())


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


@pytest.mark.parametrize(
    "fields",
    [
        {"task_id": "../etc"},
        {"task_id": ""},
        {"task_id": "a" * 65},
        {"image": ""},
        {"image": "bad image"},
        {"command": "sh -c true"},
        {"command": ["ok", 3]},
        {"env": {"BAD-NAME": "x"}},
        {"env": {"A": 1}},
        {"gpus": True},
        {"gpus": [0, 0]},
        {"gpus": [-1]},
        {"gpus": "some"},
        {"replica": -1},
        {"persistent": "yes"},
        {"cpu_limit": 0},
        {"memory_limit_mib": 1},
        {"restart": "always"},
        {"max_restarts": -1},
    ],
)
def test_bad_specs_are_refused_in_one_sentence(fields: dict) -> None:
    with pytest.raises(InvalidTaskSpec) as excinfo:
        TaskSpec(**{"task_id": "ok", "image": "busybox", **fields})
    assert excinfo.value.message.endswith(".")


def test_spec_from_dict_and_hash() -> None:
    spec = TaskSpec.from_dict({"task_id": "x1", "image": "busybox", "command": ["true"], "gpus": "all"})
    assert spec.key == ("x1", 0) and spec.container_name == "prime-task-x1"
    assert spec.spec_hash() == TaskSpec.from_dict(spec.to_dict()).spec_hash()
    assert spec.spec_hash() != TaskSpec.from_dict({**spec.to_dict(), "command": ["false"]}).spec_hash()
    with pytest.raises(InvalidTaskSpec, match="unknown field"):
        TaskSpec.from_dict({"task_id": "x1", "image": "busybox", "privileged": True})
    with pytest.raises(InvalidTaskSpec, match="incomplete"):
        TaskSpec.from_dict({"task_id": "x1"})
    with pytest.raises(InvalidTaskSpec):
        TaskSpec.from_dict(["not", "a", "dict"])
