"""Group tasks on the wire (issue 15): the spec's ``group``, the view of a group, a heartbeat's
``task_ports`` and a desired member's ``env`` / ``ports`` — the happy shapes and the hostile ones."""

from __future__ import annotations

import json
from typing import Any

import pytest

from prime.protocol.errors import ValidationError
from prime.protocol.groups import GroupPhase, GroupRequest, GroupView, MemberView
from prime.protocol.heartbeat import DesiredReplica, HeartbeatRequest
from prime.protocol.tasks import Task, TaskSpec, TaskState, TaskView


def test_a_group_spec_round_trips_and_sizes_its_replicas() -> None:
    spec = TaskSpec.from_json({"image": "busybox", "gpus": 8, "group": {"nodes": 2, "max_nodes": 4, "same_gpu_model": True}})
    assert spec.group == GroupRequest(2, 4, same_gpu_model=True) and spec.replica_count == 4
    assert spec.to_json()["group"] == {"nodes": 2, "max_nodes": 4, "same_gpu_model": True}  # defaults left out
    assert "group" not in TaskSpec.from_json({"image": "busybox"}).to_json()  # an ordinary spec reads as before
    task = Task.new(spec, 1.0, "g")
    assert len(task.replicas) == 4 and task.group is not None and task.group.phase == GroupPhase.PENDING
    assert Task.from_json(json.loads(json.dumps(task.to_json()))).group == task.group


@pytest.mark.parametrize("phase, state", [
    (GroupPhase.PENDING, TaskState.PENDING), (GroupPhase.STARTING, TaskState.PENDING),
    (GroupPhase.RUNNING, TaskState.RUNNING), (GroupPhase.RESTARTING, TaskState.PENDING),
    (GroupPhase.FAILED, TaskState.FAILED), (GroupPhase.COMPLETED, TaskState.COMPLETED),
    (GroupPhase.STOPPED, TaskState.STOPPED),
])
def test_a_group_tasks_state_is_its_groups(phase: GroupPhase, state: TaskState) -> None:
    task = Task.new(TaskSpec(image="busybox", group=GroupRequest(2)), 1.0, "g")
    task.group = GroupView(phase)
    assert task.state == state


def test_a_group_view_reads_with_fields_a_newer_master_adds() -> None:
    view = TaskView.from_json({
        "id": "g", "state": "Running", "spec": {"image": "busybox", "group": {"nodes": 2}}, "created_at": 1.0,
        "group": {"phase": "Running", "attempt": 1, "members": [
            {"rank": 0, "node": "0xa", "address": "10.0.0.1", "rendezvous_port": 29500, "peer_port": 29501, "later": 1}],
            "later": True},
    })
    assert view.group is not None and view.group.members == (MemberView(0, "0xa", "10.0.0.1", 29500, 29501),)


@pytest.mark.parametrize("group, field", [
    ({"nodes": -1}, "group.nodes"),
    ({"nodes": 2**64}, "group.nodes"),
    ({"nodes": 2.5}, "group.nodes"),
    ({"nodes": None}, "group.nodes"),
    ({"nodes": 2, "max_nodes": 1}, "group.max_nodes"),
    ({"nodes": 2, "max_nodes": 300}, "group.max_nodes"),
    ({"nodes": 2, "same_gpu_model": "yes"}, "group.same_gpu_model"),
    ({"nodes": 2, "start_timeout_s": -5}, "group.start_timeout_s"),
    ({"nodes": 2, "start_timeout_s": "5m"}, "group.start_timeout_s"),
    ({"nodes": 2, "max_restarts": 10**6}, "group.max_restarts"),
    ({"nodes": 2, "restart_backoff_s": -1}, "group.restart_backoff_s"),
    ({"nodes": 2, "restart_backoff_s": 3601}, "group.restart_backoff_s"),
    ({"nodes": 2, "extra": 1}, "group.extra"),
    ("2", "group"),
])
def test_hostile_groups_are_refused_naming_the_field(group: Any, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        TaskSpec.from_json({"image": "busybox", "group": group})
    assert err.value.field == field


def test_nan_and_infinity_are_no_timeout() -> None:
    for raw in (b'{"image": "busybox", "group": {"nodes": 2, "start_timeout_s": NaN}}',
                b'{"image": "busybox", "group": {"nodes": 2, "start_timeout_s": 1e999}}'):
        with pytest.raises(ValidationError):
            TaskSpec.from_json(raw)


@pytest.mark.parametrize("ports", [[0, 10], [10, 5], [1], [1, 2, 3], ["a", "b"], [1, 70000], [True, 5], {"first": 1}])
def test_hostile_task_ports_in_a_heartbeat(ports: Any) -> None:
    with pytest.raises(ValidationError) as err:
        HeartbeatRequest.from_json({"task_ports": ports})
    assert err.value.field.startswith("task_ports")


def test_task_ports_in_a_heartbeat() -> None:
    assert HeartbeatRequest.from_json({"task_ports": [29500, 29509]}).task_ports == (29500, 29509)
    assert HeartbeatRequest.from_json({}).task_ports is None
    assert "task_ports" not in HeartbeatRequest().to_json()  # a node without --task-ports beats as before


DESIRED = {"id": "g", "replica": 1, "attempt": 0, "gpu_indices": [], "spec": {"image": "busybox", "group": {"nodes": 2}}}


@pytest.mark.parametrize("extra, field", [
    ({"env": {"1BAD": "x"}}, "env.1BAD"),
    ({"env": {"A=B": "x"}}, "env.A=B"),
    ({"env": {"OK": "nul\x00"}}, "env"),
    ({"env": {f"V{i}": "x" for i in range(65)}}, "env"),
    ({"ports": [0]}, "ports"),
    ({"ports": [65536]}, "ports"),
    ({"ports": list(range(1000, 1017))}, "ports"),
    ({"ports": "29500"}, "ports"),
])
def test_hostile_member_entries_are_refused(extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        DesiredReplica.from_json({**DESIRED, **extra})
    assert err.value.field.startswith(field), err.value.field


def test_a_member_entry_round_trips_and_an_ordinary_one_reads_as_before() -> None:
    entry = DesiredReplica.from_json({**DESIRED, "env": {"NODE_RANK": "1"}, "ports": [29510, 29511]})
    assert entry.env == {"NODE_RANK": "1"} and entry.ports == (29510, 29511)
    assert DesiredReplica.from_json(entry.to_json()) == entry
    plain = DesiredReplica.from_json({**DESIRED, "spec": {"image": "busybox"}})
    assert "env" not in plain.to_json() and "ports" not in plain.to_json()
