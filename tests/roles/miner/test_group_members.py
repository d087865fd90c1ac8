"""Members of group tasks on the miner (issue 15): placed only on a node with --task-ports and only
on ports inside them, run with host networking and the master's env over the spec's; an ordinary
replica's container record (and so its hash: adoption after an upgrade) is what it always was.
The translation is tested pure; the last tests run members on the real engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest

from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import ReplicaState, RestartPolicy
from prime.roles.miner import core
from prime.roles.miner.containers import LABEL_SPEC, build_container_kwargs, ports_of, restart_policy
from prime.roles.miner.executor import DockerExecutor
from prime.roles.miner.heartbeat import Converger
from prime.roles.miner.preflight import check_task_ports
from tests.support.miner_env import MemoryExecutor, free_port_range

INSTANCE = "0123456789abcdef"
NO_PORTS = "This node offers no task ports (--task-ports), so it cannot host a member of a group task."


def _entry(task_id: str = "t-member", *, group: bool = True, env: dict[str, str] | None = None,
           ports: list[int] | None = None, spec_env: dict[str, str] | None = None, image: str = "busybox:1",
           command: list[str] | None = None, replica: int = 1, attempt: int = 3) -> dict[str, Any]:
    spec: dict[str, Any] = {"image": image, "command": command or ["true"], "env": spec_env or {}, "gpus": 0}
    if group:
        spec["group"] = {"nodes": 2}
    out: dict[str, Any] = {"id": task_id, "replica": replica, "attempt": attempt, "gpu_indices": [], "spec": spec}
    if env is not None:
        out["env"] = env
    if ports is not None:
        out["ports"] = ports
    return out


def _desired(**kwargs: Any) -> DesiredReplica:
    return DesiredReplica.from_json(_entry(**kwargs))


def _kwargs(placement: core.Placement, network_mode: str = "none") -> dict[str, Any]:
    return build_container_kwargs(placement, node_address="0xabc", instance=INSTANCE, data_mount=None, network_mode=network_mode)


# ---------------------------------------------------------------- the translation (pure)


def test_an_ordinary_replicas_record_and_hash_are_unchanged() -> None:
    # The hash of this entry under every miner before group tasks: a container they started is adopted.
    entry = {"id": "t-golden", "replica": 1, "attempt": 2, "gpu_indices": [0],
             "spec": {"image": "busybox:1", "command": ["sh", "-c", "echo hi"], "env": {"A": "1"}, "gpus": 1, "replicas": 2,
                      "persistent": True, "cpu_limit": 1.5, "memory_limit_mib": 64, "restart": "on-failure"}}
    placement = core.place(DesiredReplica.from_json(entry), [3])
    assert placement.spec_hash() == "f14845eee633a76316c99abd7c69cb81c563f62cd06c048fc7d3eafcf42c52d3"
    assert sorted(placement.record()) == ["command", "cpu_limit", "env", "gpus", "image", "max_restarts", "memory_limit_mib",
                                          "persistent", "replica", "restart", "task_id"]
    # A master's env or ports on an ordinary replica change nothing: only members take them.
    odd = core.place(DesiredReplica.from_json({**entry, "env": {"NODE_RANK": "0"}, "ports": [1]}), [3], (29500, 29509))
    assert odd.spec_hash() == placement.spec_hash() and "NODE_RANK" not in _kwargs(odd)["environment"]
    assert _kwargs(placement, "bridge")["network_mode"] == "bridge" and ports_of(_kwargs(placement)["labels"][LABEL_SPEC]) == ()


@pytest.mark.parametrize("network_mode", ["none", "bridge", "host", "my-net"])
def test_a_member_runs_with_host_networking_whatever_the_task_network(network_mode: str) -> None:
    placement = core.place(_desired(env={"NODE_RANK": "1"}, ports=[29500, 29501]), [], (29500, 29509))
    assert placement.member and _kwargs(placement, network_mode)["network_mode"] == "host"


def test_a_members_env_is_the_spec_then_the_master_then_the_miners_own() -> None:
    spec_env = {"A": "spec", "NODE_RANK": "spec", "PRIME_ATTEMPT": "spec", "PRIME_TASK_ID": "spec"}
    master_env = {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "PRIME_ATTEMPT": "99", "PRIME_TASK_ID": "other", "PRIME_REPLICA": "7"}
    placement = core.place(_desired(spec_env=spec_env, env=master_env, ports=[29502]), [], (29500, 29509))
    env = _kwargs(placement)["environment"]
    assert env["A"] == "spec" and env["NODE_RANK"] == "1" and env["MASTER_ADDR"] == "10.0.0.1"
    assert (env["PRIME_ATTEMPT"], env["PRIME_TASK_ID"], env["PRIME_REPLICA"]) == ("3", "t-member", "1")


def test_a_members_record_carries_the_master_env_and_ports() -> None:
    def placed(**kwargs: Any) -> core.Placement:
        return core.place(_desired(**{"env": {"NODE_RANK": "1"}, "ports": [29500, 29501], **kwargs}), [], (29500, 29509))

    placement = placed()
    record = json.loads(_kwargs(placement)["labels"][LABEL_SPEC])
    assert record["ports"] == [29500, 29501] and record["network"] == "host" and record["env"]["NODE_RANK"] == "1"
    assert record["restart"] == "never" and restart_policy(_kwargs(placement)["labels"][LABEL_SPEC]) is RestartPolicy.NEVER
    assert ports_of(_kwargs(placement)["labels"][LABEL_SPEC]) == (29500, 29501)
    # Another rank or other ports: another container.
    assert len({placement.spec_hash(), placed(env={"NODE_RANK": "0"}).spec_hash(), placed(ports=[29502, 29503]).spec_hash()}) == 3
    assert placed().spec_hash() == placement.spec_hash()


def test_a_member_needs_task_ports_and_ports_inside_them() -> None:
    member = _desired(env={"NODE_RANK": "0"}, ports=[29500, 29501])
    with pytest.raises(core.Unplaceable) as no_range:
        core.place(member, [])
    assert str(no_range.value) == NO_PORTS
    with pytest.raises(core.Unplaceable) as outside:
        core.place(_desired(ports=[29509, 29510]), [], (29500, 29509))
    assert str(outside.value) == "The master gave this group member port 29510, outside this node's --task-ports 29500-29509."
    with pytest.raises(core.Unplaceable, match="port 22,"):
        core.place(_desired(ports=[22]), [], (29500, 29509))
    # The edges of the range are inside it; an ordinary replica needs no task ports.
    assert core.place(_desired(ports=[29500, 29509]), [], (29500, 29509)).member
    assert not core.place(_desired(group=False), []).member


def test_the_core_reports_an_unplaceable_member_failed_and_starts_nothing() -> None:
    plan = core.plan([_desired(task_id="t-a", ports=[29500]), _desired(task_id="t-b", ports=[40000])], [], core.Book(), 0.0,
                     task_ports=(29500, 29509))
    assert [a.key for a in plan.of(core.Start)] == [("t-a", 1)]
    (report,) = core.reports([], plan.book)
    assert (report.id, report.state, report.attempt) == ("t-b", ReplicaState.FAILED, 3)
    assert report.error == "The master gave this group member port 40000, outside this node's --task-ports 29500-29509."


async def test_the_converger_places_members_on_its_task_ports_and_refuses_pushes_without() -> None:
    executor = MemoryExecutor()
    converger = Converger(executor, [], task_ports=(29500, 29509))
    await converger.converge([_desired(ports=[29500, 29501])])
    assert executor.started("t-member") == 1
    bare = Converger(MemoryExecutor(), [])
    with pytest.raises(core.Unplaceable, match=r"no task ports \(--task-ports\)"):
        bare.push(_desired(ports=[29500]))
    await bare.converge([_desired(ports=[29500])])
    assert bare.invalid[("t-member", 1)] == NO_PORTS


# ---------------------------------------------------------------- the real engine


@pytest.fixture
def executor(docker_client: docker.DockerClient, busybox_image: str, docker_node_address: str, tmp_path: Path) -> DockerExecutor:
    # network "none" as the test suite's miners use: a member gets the host's network all the same.
    return DockerExecutor(docker_client, tmp_path / "miner", docker_node_address, network_mode="none", stop_timeout_s=0)


async def _until(predicate: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.05)


def _connects(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@pytest.mark.docker
async def test_a_member_runs_on_the_hosts_network_with_the_masters_env(
    executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    first, last = free_port_range(4)
    task_id = "t-" + uuid.uuid4().hex[:12]
    # It prints its rank, then listens on its rendezvous port: reachable from the host, no port mapping.
    script = f"echo rank=$NODE_RANK addr=$MASTER_ADDR; exec httpd -f -p {first} -h /"
    member = _desired(task_id=task_id, image=busybox_image, command=["sh", "-c", script], spec_env={"NODE_RANK": "9"},
                      env={"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(first)}, ports=[first, first + 1])
    converger = Converger(executor, [], task_ports=(first, last))
    try:
        plan = await converger.converge([member])
        assert plan.of(core.Start) and not converger.invalid
        await _until(lambda: asyncio.to_thread(_connects, first))  # the member's listener, on the host's loopback
        (container,) = docker_client.containers.list(all=True, filters={"label": f"prime.task_id={task_id}"})
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        env = container.attrs["Config"]["Env"]
        assert "NODE_RANK=1" in env and f"MASTER_PORT={first}" in env and f"PRIME_TASK_ID={task_id}" in env
        assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "no"
        logs = await _until(lambda: asyncio.to_thread(lambda: container.logs().decode()))
        assert "rank=1 addr=127.0.0.1" in logs

        # A restarted miner (same data dir, node) finds the member's ports busy by its own member: not refused.
        assert check_task_ports((first, last), "127.0.0.1") == \
            f"Port {first} of --task-ports {first}-{last} is in use; free it or choose another range."
        restarted = DockerExecutor(docker_client, executor.data_dir, executor.node_address, network_mode="none")
        held = await restarted.held_ports()
        assert held == {first, first + 1} and check_task_ports((first, last), "127.0.0.1", held=held) is None
    finally:
        await executor.stop(task_id)
    assert await executor.held_ports() == set()


@pytest.mark.docker
async def test_a_member_on_a_port_outside_the_range_is_failed_with_the_reason(
    executor: DockerExecutor, busybox_image: str, docker_client: docker.DockerClient
) -> None:
    first, last = free_port_range(4)
    task_id = "t-" + uuid.uuid4().hex[:12]
    member = _desired(task_id=task_id, image=busybox_image, command=["true"], env={"NODE_RANK": "0"}, ports=[first, last + 1])
    converger = Converger(executor, [], task_ports=(first, last))
    plan = await converger.converge([member])
    assert not plan.of(core.Start)
    (report,) = core.reports(await executor.snapshot(), converger.book)
    assert (report.id, report.state) == (task_id, ReplicaState.FAILED)
    assert report.error == f"The master gave this group member port {last + 1}, outside this node's --task-ports {first}-{last}."
    assert docker_client.containers.list(all=True, filters={"label": f"prime.task_id={task_id}"}) == []
