"""Container identity per (node instance, task, replica, attempt): two miners with the same node key
on one engine (two local networks, a suite beside ``make up``) never see, stop or remove each
other's containers; names never collide across attempts or instances (issue 13)."""

from __future__ import annotations

import uuid
from pathlib import Path

import docker
import pytest

from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import TASK_ID_RE, ReplicaState
from prime.roles.miner import core
from prime.roles.miner.containers import LABEL_INSTANCE, LABEL_NODE, LABEL_TASK, MAX_NAME_LENGTH, container_name, instance_id
from prime.roles.miner.core import Placement
from prime.roles.miner.executor import DockerExecutor
from prime.roles.miner.heartbeat import Converger


def _placement(image: str, task_id: str, *, replica: int = 0, attempt: int = 0) -> Placement:
    entry = {"id": task_id, "replica": replica, "attempt": attempt, "gpu_indices": [],
             "spec": {"image": image, "command": ["sleep", "600"]}}
    return core.place(DesiredReplica.from_json(entry), ())


def _executor(client: docker.DockerClient, data_dir: Path, node: str, **kwargs) -> DockerExecutor:
    return DockerExecutor(client, data_dir, node, network_mode="none", stop_timeout_s=0, **kwargs)


def _names(client: docker.DockerClient, node: str, task_id: str) -> set[str]:
    listed = client.containers.list(all=True, filters={"label": [f"{LABEL_NODE}={node}", f"{LABEL_TASK}={task_id}"]}, ignore_removed=True)
    return {c.name for c in listed}


# ---------------------------------------------------------------- pure parts


def test_the_instance_id_is_stable_per_data_dir_chain_registry_and_node(tmp_path: Path) -> None:
    node, registry = "0x" + "ab" * 20, "0x" + "cd" * 20
    base = instance_id(tmp_path / "a", node, 31337, registry)
    assert len(base) == 16 and int(base, 16) >= 0
    assert instance_id(tmp_path / "a", node.upper().replace("0X", "0x"), 31337, registry.upper().replace("0X", "0x")) == base
    assert instance_id(tmp_path / "x" / ".." / "a", node, 31337, registry) == base  # the absolute, resolved path
    others = {
        instance_id(tmp_path / "b", node, 31337, registry),
        instance_id(tmp_path / "a", "0x" + "ef" * 20, 31337, registry),
        instance_id(tmp_path / "a", node, 1, registry),
        instance_id(tmp_path / "a", node, 31337, "0x" + "01" * 20),
        instance_id(tmp_path / "a", node),
    }
    assert len(others) == 5 and base not in others


def test_container_names_are_unique_per_instance_task_replica_and_attempt() -> None:
    instance = "0123456789abcdef"
    assert container_name(instance, "job1") == "prime-01234567-job1-r0-a0"
    assert container_name(instance, "job1", 3, 7) == "prime-01234567-job1-r3-a7"
    names = {container_name(i, t, r, a) for i in (instance, "fedcba9876543210") for t in ("job1", "job2") for r in (0, 1) for a in (0, 1)}
    assert len(names) == 16
    # The longest task ids and numbers still fit 63 characters, in Docker's charset, told apart by a hash.
    long_a, long_b = "a" * 63 + "1", "a" * 63 + "2"
    assert TASK_ID_RE.match(long_a) and TASK_ID_RE.match(long_b)
    name_a, name_b = container_name(instance, long_a, 256, 2**31), container_name(instance, long_b, 256, 2**31)
    assert name_a != name_b and len(name_a) <= MAX_NAME_LENGTH and len(name_b) <= MAX_NAME_LENGTH
    assert name_a.startswith("prime-01234567-aaaa") and name_a.endswith("-r256-a2147483648")


# ---------------------------------------------------------------- real engine


@pytest.mark.docker
async def test_two_miners_with_one_node_key_never_touch_each_others_containers(
    docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path
) -> None:
    node = docker_node_address  # the SAME key for both miners: only their data dirs differ
    one = _executor(docker_client, tmp_path / "one", node)
    two = _executor(docker_client, tmp_path / "two", node)
    assert one.instance != two.instance
    task_id = "shared-" + uuid.uuid4().hex[:8]
    placement = _placement(busybox_image, task_id)

    started_one = await one.start(placement)
    started_two = await two.start(placement)  # the same task id: no name conflict
    assert started_one.state is ReplicaState.RUNNING and started_two.state is ReplicaState.RUNNING
    assert started_one.container_id != started_two.container_id
    assert _names(docker_client, node, task_id) == {container_name(one.instance, task_id), container_name(two.instance, task_id)}

    # Each one's snapshot lists only its own container.
    assert [(s.task_id, s.container_id) for s in await one.snapshot()] == [(task_id, started_one.container_id)]
    assert [(s.task_id, s.container_id) for s in await two.snapshot()] == [(task_id, started_two.container_id)]

    # One converging on an empty list (its master lists nothing) stops its own container only.
    await Converger(one, []).converge([])
    assert await one.snapshot() == []
    (still,) = await two.snapshot()
    assert (still.container_id, still.state) == (started_two.container_id, ReplicaState.RUNNING)
    assert docker_client.containers.get(started_two.container_id).status == "running"
    assert _names(docker_client, node, task_id) == {container_name(two.instance, task_id)}

    # Stopping by task id through the first touches nothing of the second either.
    assert await one.stop(task_id) is False
    assert docker_client.containers.get(started_two.container_id).status == "running"

    # A restarted miner on the same data dir (same key, chain, registry) adopts its own container.
    restarted = _executor(docker_client, tmp_path / "two", node)
    assert restarted.instance == two.instance
    assert [s.container_id for s in await restarted.snapshot()] == [started_two.container_id]
    plan = await Converger(restarted, []).converge([placement.desired])
    assert [type(a) for a in plan.actions] == [core.Keep]

    # The chain and registry are part of the instance: the same data dir on another chain sees nothing.
    other_chain = _executor(docker_client, tmp_path / "two", node)
    other_chain.bind_chain(1, "0x" + "11" * 20)
    assert other_chain.instance != two.instance and await other_chain.snapshot() == []


@pytest.mark.docker
async def test_a_new_attempt_gets_a_new_name_and_leftovers_are_handled(
    docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path
) -> None:
    node = docker_node_address
    executor = _executor(docker_client, tmp_path / "miner", node)
    task_id = "att-" + uuid.uuid4().hex[:8]
    first = await executor.start(_placement(busybox_image, task_id, attempt=0))
    second = await executor.start(_placement(busybox_image, task_id, attempt=1))  # rescheduled here: replaces attempt 0
    assert second.state is ReplicaState.RUNNING and second.container_id != first.container_id
    assert _names(docker_client, node, task_id) == {container_name(executor.instance, task_id, 0, 1)}

    # A leftover of this instance under the name the next attempt needs (no task label: not listed) is removed first.
    leftover_name = container_name(executor.instance, task_id, 0, 2)
    docker_client.containers.create(busybox_image, ["sleep", "600"], name=leftover_name, network_mode="none",
                                    labels={LABEL_INSTANCE: executor.instance, LABEL_NODE: node})
    third = await executor.start(_placement(busybox_image, task_id, attempt=2))
    assert third.state is ReplicaState.RUNNING
    assert docker_client.containers.get(leftover_name).id == third.container_id

    # Under another instance's label the name is never taken over: the start fails with Docker's reason.
    foreign_name = container_name(executor.instance, task_id, 0, 3)
    foreign = docker_client.containers.create(busybox_image, ["sleep", "600"], name=foreign_name, network_mode="none",
                                              labels={LABEL_INSTANCE: "f" * 16, LABEL_NODE: node})
    fourth = await executor.start(_placement(busybox_image, task_id, attempt=3))
    assert fourth.state is ReplicaState.FAILED and "already in use" in (fourth.reason or "")
    assert docker_client.containers.get(foreign_name).id == foreign.id


@pytest.mark.docker
async def test_containers_without_the_instance_label_are_never_touched(
    docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path
) -> None:
    """A container of an older miner (node and task labels, no instance label) is neither adopted nor stopped."""
    node = docker_node_address
    task_id = "old-" + uuid.uuid4().hex[:8]
    old = docker_client.containers.create(busybox_image, ["sleep", "600"], network_mode="none",
                                          labels={LABEL_NODE: node, LABEL_TASK: task_id, "prime.replica": "0"})
    executor = _executor(docker_client, tmp_path / "miner", node)
    assert await executor.snapshot() == []
    assert await executor.unlabelled() == [old.name]  # named in a warning when the miner starts
    await Converger(executor, []).converge([])
    assert await executor.stop(task_id) is False
    docker_client.containers.get(old.id)  # still there (NotFound otherwise)
