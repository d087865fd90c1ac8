"""Wire messages: strict validation of buyer/miner input and JSON round trips."""

from __future__ import annotations

import json

import pytest

from prime.chain.types import NodeStatus, Specs
from prime.errors import PrimeError
from prime.protocol.errors import ValidationError
from prime.protocol.heartbeat import DesiredReplica, GpuSample, HeartbeatRequest, HeartbeatResponse
from prime.protocol.nodes import NodeRecord, NodeSample, NodeState, normalize_address
from prime.protocol.storage import ManifestEntry
from prime.protocol.tasks import (
    MAX_REPLICAS,
    Replica,
    ReplicaState,
    RestartPolicy,
    Task,
    TaskSpec,
    TaskState,
    is_task_id,
    new_task_id,
    validate_image,
)

# --- TaskSpec ---------------------------------------------------------------------------------


def test_minimal_spec_gets_defaults() -> None:
    spec = TaskSpec.from_json({"image": "busybox"})
    assert spec == TaskSpec("busybox")
    assert spec.command == () and spec.env == {} and spec.gpus == 0 and spec.replicas == 1
    assert spec.persistent is False and spec.cpu_limit is None and spec.memory_limit_mib is None
    assert spec.restart == RestartPolicy.NEVER


def test_full_spec_round_trips_through_json() -> None:
    body = {
        "image": "nvcr.io/nvidia/pytorch:24.01-py3",
        "command": ["python", "-c", "print('hi')"],
        "env": {"WANDB_MODE": "offline", "_X1": ""},
        "gpus": "all",
        "replicas": 3,
        "persistent": True,
        "cpu_limit": 2.5,
        "memory_limit_mib": 4096,
        "restart": "on-failure",
    }
    spec = TaskSpec.from_json(body)
    assert spec.wants_all_gpus
    assert spec.command == ("python", "-c", "print('hi')")
    assert spec.to_json() == body
    # and through a real JSON encoding
    assert TaskSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_cmd_is_accepted_as_design_md_spells_it() -> None:
    assert TaskSpec.from_json({"image": "busybox", "cmd": ["sleep", "1"]}).command == ("sleep", "1")


def test_integer_cpu_limit_is_accepted() -> None:
    assert TaskSpec.from_json({"image": "busybox", "cpu_limit": 2}).cpu_limit == 2.0


@pytest.mark.parametrize(
    "image",
    [
        "busybox",
        "busybox:latest",
        "prime-test-busybox:latest",
        "library/ubuntu:22.04",
        "localhost:5000/team/trainer:v1.2",
        "ghcr.io/org/repo_name/sub-image:tag_1",
        "registry.example.com/a/b/c",
        "busybox@sha256:" + "a" * 64,
        "nvcr.io/nvidia/pytorch:24.01-py3@sha256:" + "0123456789abcdef" * 4,
    ],
)
def test_good_image_references(image: str) -> None:
    assert validate_image(image) == image


@pytest.mark.parametrize(
    "image",
    ["", " ", "busy box", "busybox\n", "Ubuntu", "-busybox", "busybox:", "busybox:-tag", "a//b", "/busybox",
     "busybox@sha256:xyz", "busybox:" + "t" * 200, "a" * 600, "busy\tbox:1"],
)
def test_bad_image_references(image: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate_image(image)
    assert err.value.field == "image"


# Each bad body names the field that is wrong.
BAD_SPECS = [
    ({}, "image"),
    ({"image": ""}, "image"),
    ({"image": 5}, "image"),
    ({"image": "busybox", "gpu": 1}, "gpu"),                         # typo of a known field
    ({"image": "busybox", "command": "sleep 5"}, "command"),         # a string, not a list
    ({"image": "busybox", "command": ["ok", 3]}, "command[1]"),
    ({"image": "busybox", "command": ["a\x00b"]}, "command[0]"),
    ({"image": "busybox", "cmd": ["a"], "command": ["b"]}, "cmd"),
    ({"image": "busybox", "env": ["A=1"]}, "env"),
    ({"image": "busybox", "env": {"BAD-KEY": "1"}}, "env.BAD-KEY"),
    ({"image": "busybox", "env": {"1ABC": "1"}}, "env.1ABC"),
    ({"image": "busybox", "env": {"": "1"}}, "env."),
    ({"image": "busybox", "env": {"A": 1}}, "env"),
    ({"image": "busybox", "env": {"A": "x\x00y"}}, "env"),
    ({"image": "busybox", "env": {"A": "x" * 70_000}}, "env"),
    ({"image": "busybox", "env": {f"V{i}": "x" for i in range(300)}}, "env"),
    ({"image": "busybox", "gpus": -1}, "gpus"),
    ({"image": "busybox", "gpus": 1.5}, "gpus"),
    ({"image": "busybox", "gpus": True}, "gpus"),
    ({"image": "busybox", "gpus": "two"}, "gpus"),
    ({"image": "busybox", "gpus": "ALL"}, "gpus"),
    ({"image": "busybox", "gpus": 10_000}, "gpus"),
    ({"image": "busybox", "replicas": 0}, "replicas"),
    ({"image": "busybox", "replicas": MAX_REPLICAS + 1}, "replicas"),
    ({"image": "busybox", "replicas": 10**12}, "replicas"),
    ({"image": "busybox", "replicas": "2"}, "replicas"),
    ({"image": "busybox", "persistent": "yes"}, "persistent"),
    ({"image": "busybox", "persistent": 1}, "persistent"),
    ({"image": "busybox", "cpu_limit": 0}, "cpu_limit"),
    ({"image": "busybox", "cpu_limit": -2}, "cpu_limit"),
    ({"image": "busybox", "cpu_limit": float("nan")}, "cpu_limit"),
    ({"image": "busybox", "cpu_limit": "1"}, "cpu_limit"),
    ({"image": "busybox", "memory_limit_mib": 0}, "memory_limit_mib"),
    ({"image": "busybox", "memory_limit_mib": 512.5}, "memory_limit_mib"),
    ({"image": "busybox", "restart": "always"}, "restart"),
]


@pytest.mark.parametrize(("body", "field"), BAD_SPECS)
def test_bad_specs_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        TaskSpec.from_json(body)
    assert err.value.field == field
    assert err.value.message.endswith(".")
    assert err.value.detail == {"field": field, "message": err.value.message}
    assert isinstance(err.value, PrimeError)  # the CLI prints it as one sentence


@pytest.mark.parametrize("body", [None, [], "image", 3])
def test_spec_body_must_be_an_object(body: object) -> None:
    with pytest.raises(ValidationError):
        TaskSpec.from_json(body)


# --- Task / Replica ------------------------------------------------------------------------


def test_new_task_has_pending_replicas_and_a_short_unique_id() -> None:
    task = Task.new(TaskSpec("busybox", replicas=3), created_at=100.0)
    assert is_task_id(task.id) and len(task.id) == 12
    assert [r.index for r in task.replicas] == [0, 1, 2]
    assert all(r.task_id == task.id and r.state == ReplicaState.PENDING for r in task.replicas)
    assert task.state == TaskState.PENDING
    assert len({new_task_id() for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("states", "stop_requested", "expected"),
    [
        (["Pending", "Pending"], False, TaskState.PENDING),
        (["Assigned", "Pulling"], False, TaskState.PENDING),
        (["Running", "Pending"], False, TaskState.RUNNING),
        (["Running", "Completed"], False, TaskState.RUNNING),
        (["Lost", "Completed"], False, TaskState.PENDING),
        (["Completed", "Completed"], False, TaskState.COMPLETED),
        (["Completed", "Failed"], False, TaskState.FAILED),
        (["Failed", "Running"], False, TaskState.RUNNING),   # not over until every replica is
        (["Stopped", "Completed"], False, TaskState.STOPPED),
        (["Stopped", "Stopped"], True, TaskState.STOPPED),
        (["Completed", "Stopped"], True, TaskState.STOPPED),
        (["Running", "Stopped"], True, TaskState.RUNNING),    # still stopping
    ],
)
def test_task_state_is_derived_from_replicas(states: list[str], stop_requested: bool, expected: TaskState) -> None:
    task = Task.new(TaskSpec("busybox", replicas=len(states)), 0.0, "t1")
    for r, s in zip(task.replicas, states):
        r.state = ReplicaState(s)
    task.stop_requested = stop_requested
    assert task.state == expected
    assert task.is_final == (expected in (TaskState.COMPLETED, TaskState.FAILED, TaskState.STOPPED))


def test_task_json_round_trip() -> None:
    task = Task.new(TaskSpec("busybox", command=("sleep", "1"), gpus=2, replicas=2), 5.0, "abc123")
    task.replicas[0] = Replica("abc123", 0, "0xNode", ReplicaState.RUNNING, (0, 1), 1, None, 6.0, 7.0, None, None)
    data = json.loads(json.dumps(task.to_json()))
    assert data["state"] == "Running"
    assert Task.from_json(data) == task


@pytest.mark.parametrize("value", ["abc", "a1b2c3d4e5f6", "task-1_x"])
def test_task_ids(value: str) -> None:
    assert is_task_id(value)


@pytest.mark.parametrize("value", ["", "../x", "a/b", "-a", "x" * 65, "a b"])
def test_not_task_ids(value: str) -> None:
    assert not is_task_id(value)


# --- heartbeat ----------------------------------------------------------------------------------


def test_heartbeat_request_parses() -> None:
    body = {
        "tasks": [{"id": "abc", "replica": 1, "state": "Running", "exit_code": None, "error": None},
                  {"id": "def", "replica": 0, "state": "Failed", "exit_code": 2, "error": "boom"}],
        "gpus": [{"index": 0, "util": 97.5, "mem_used_mib": 1024, "temp_c": 71}],
        "load": {"cpu_pct": 50, "mem_used_mib": 2048.5},
    }
    hb = HeartbeatRequest.from_json(body)
    assert hb.tasks[0].replica == 1 and hb.tasks[0].state == ReplicaState.RUNNING
    assert hb.tasks[1].replica == 0 and hb.tasks[1].exit_code == 2 and hb.tasks[1].error == "boom"
    assert hb.gpus[0] == GpuSample(0, 97.5, 1024, 71)
    assert hb.load == {"cpu_pct": 50.0, "mem_used_mib": 2048.5}
    assert HeartbeatRequest.from_json(hb.to_json()) == hb


def test_empty_heartbeat_is_fine() -> None:
    assert HeartbeatRequest.from_json({}) == HeartbeatRequest()


BAD_HEARTBEATS = [
    ([], "body"),
    ({"taskz": []}, "taskz"),
    ({"tasks": {}}, "tasks"),
    ({"tasks": [{"state": "Running"}]}, "tasks[0].id"),
    ({"tasks": [{"id": "../etc", "state": "Running"}]}, "tasks[0].id"),
    ({"tasks": [{"id": "a", "replica": 0, "state": "Assigned"}]}, "tasks[0].state"),  # only the master assigns
    ({"tasks": [{"id": "a", "replica": 0, "state": "running"}]}, "tasks[0].state"),
    ({"tasks": [{"id": "a", "state": "Running", "replica": -1}]}, "tasks[0].replica"),
    ({"tasks": [{"id": "a", "replica": 0, "state": "Failed", "exit_code": "1"}]}, "tasks[0].exit_code"),
    ({"tasks": [{"id": "a", "replica": 0, "state": "Failed", "error": "x" * 5000}]}, "tasks[0].error"),
    ({"gpus": [{"util": 3}]}, "gpus[0].index"),
    ({"gpus": [{"index": 0, "util": 101}]}, "gpus[0].util"),
    ({"gpus": [{"index": 0, "temp_c": "hot"}]}, "gpus[0].temp_c"),
    ({"load": {"cpu_pct": "high"}}, "load"),
    ({"load": {"cpu_pct": float("inf")}}, "load"),
    ({"load": {f"k{i}": 1 for i in range(40)}}, "load"),
    ({"tasks": [{"id": "a", "replica": 0, "state": "Running"}] * 5000}, "tasks"),
    ({"tasks": [{"id": "a", "state": "Running"}]}, "tasks[0].replica"),  # the replica is always named
]


@pytest.mark.parametrize(("body", "field"), BAD_HEARTBEATS)
def test_bad_heartbeats_name_the_field(body: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        HeartbeatRequest.from_json(body)
    assert err.value.field == field


def test_heartbeat_response_carries_what_a_node_needs_to_start_a_task() -> None:
    spec = TaskSpec("busybox", command=("sleep", "60"), env={"A": "1"}, gpus=2, persistent=True)
    resp = HeartbeatResponse(30.0, (DesiredReplica("abc", 1, 2, (2, 3), spec),))
    data = json.loads(json.dumps(resp.to_json()))
    assert data == {
        "interval_s": 30.0,
        "desired": [{"id": "abc", "replica": 1, "attempt": 2, "gpu_indices": [2, 3],
                     "spec": {"image": "busybox", "command": ["sleep", "60"], "env": {"A": "1"}, "gpus": 2,
                              "persistent": True}}],  # fields at their defaults are left out
    }
    assert HeartbeatResponse.from_json(data) == resp


def test_heartbeat_response_rejects_junk() -> None:
    with pytest.raises(ValidationError) as err:
        HeartbeatResponse.from_json({"interval_s": 30, "desired": [{"id": "a", "replica": 0, "spec": {}}]})
    assert err.value.field == "desired[0].spec.image"


# --- nodes --------------------------------------------------------------------------------------


def test_node_record_json_round_trip() -> None:
    rec = NodeRecord(
        "0x" + "ab" * 20, NodeState.HEALTHY, Specs(8, "H100", 81559, 64, 512000, 2000), NodeStatus.ACTIVE, 17,
        "http://10.0.0.2:8000", 1.0, 2.0, 602, 1, 3.0, 2, 4.0, 5.0, 6.0, "x",
        NodeSample(5.0, (GpuSample(0, 10.0, 100.0, 50.0),), {"cpu_pct": 3.0}),
    )
    data = json.loads(json.dumps(rec.to_json()))
    assert data["joined_on_chain"] is True and data["chain_status"] == "active"
    assert data["hardware"]["gpu_count"] == 8
    assert NodeRecord.from_json(data) == rec


def test_normalize_address() -> None:
    lower = "0x" + "ab" * 20
    assert normalize_address(lower) == normalize_address(lower.upper().replace("0X", "0x"))
    assert normalize_address(lower) != lower  # checksum casing
    for bad in ["", "0x12", "ab" * 20, "0x" + "zz" * 20]:
        with pytest.raises(ValidationError):
            normalize_address(bad)


# --- manifests ---------------------------------------------------------------------------------


def test_manifest_entry() -> None:
    entry = ManifestEntry.from_json({"path": "ckpt/step-1.pt", "size": 10, "sha256": "0" * 64})
    assert entry.to_json() == {"path": "ckpt/step-1.pt", "size": 10, "sha256": "0" * 64}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"path": "../x", "size": 1, "sha256": "0" * 64}, "file.path"),
        ({"path": "/etc/passwd", "size": 1, "sha256": "0" * 64}, "file.path"),
        ({"path": "a//b", "size": 1, "sha256": "0" * 64}, "file.path"),
        ({"path": "a/./b", "size": 1, "sha256": "0" * 64}, "file.path"),
        ({"path": "a", "size": -1, "sha256": "0" * 64}, "file.size"),
        ({"path": "a", "size": 1, "sha256": "A" * 64}, "file.sha256"),
        ({"path": "a", "size": 1}, "file.sha256"),
    ],
)
def test_bad_manifest_entries(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        ManifestEntry.from_json(body)
    assert err.value.field == field


# --- decoding from bytes and from parsed JSON agree ---------------------------------------------

_GOOD_HEARTBEAT = {
    "tasks": [{"id": "t-1", "replica": 0, "state": "Running", "exit_code": None, "error": None},
              {"id": "t-2", "replica": 3, "state": "Failed", "exit_code": 7, "error": "boom"}],
    "gpus": [{"index": 0, "util": 93, "mem_used_mib": 40000.5, "temp_c": 71}, {"index": 1}],
    "load": {"cpu_pct": 12.5, "mem_used_mib": 8123},
}


def _variants() -> list:
    """The good body, and each field bent in ways the validation must refuse or normalise."""
    out: list = [_GOOD_HEARTBEAT, {}, {"load": None}, {"tasks": [], "gpus": []}, [], "x", None]
    bad_values = [None, True, -1, 2**31 + 1, 1.5, float("nan"), float("inf"), "", "a\x00b", "x" * 5000, [], {}]
    for section, key in (("tasks", "id"), ("tasks", "replica"), ("tasks", "state"), ("tasks", "exit_code"),
                         ("tasks", "error"), ("gpus", "index"), ("gpus", "util"), ("gpus", "mem_used_mib"),
                         ("gpus", "temp_c")):
        for value in bad_values:
            body = json.loads(json.dumps(_GOOD_HEARTBEAT))
            body[section][0][key] = value
            out.append(body)
    for value in bad_values + ["x" * 65]:
        out.append({**_GOOD_HEARTBEAT, "load": {"cpu_pct": value}})
        out.append({**_GOOD_HEARTBEAT, "load": {str(value)[:70]: 1.0}})
    out.append({**_GOOD_HEARTBEAT, "extra": 1})
    out.append({**_GOOD_HEARTBEAT, "tasks": [{**_GOOD_HEARTBEAT["tasks"][0], "extra": 1}]})
    out.append({**_GOOD_HEARTBEAT, "gpus": [{"index": 0, "extra": 1}]})
    out.append({**_GOOD_HEARTBEAT, "gpus": [{"index": 0}] * 257})
    out.append({**_GOOD_HEARTBEAT, "load": {f"k{i}": 1 for i in range(33)}})
    return out


@pytest.mark.parametrize("body", _variants())
def test_bytes_and_parsed_json_decode_alike(body) -> None:
    """A route decodes raw bytes, a client parsed JSON: both must accept and refuse the same bodies."""
    try:
        raw = json.dumps(body, allow_nan=False).encode()
    except ValueError:
        pytest.skip("NaN and infinities have no JSON form")
    try:
        parsed = HeartbeatRequest.from_json(body)
    except ValidationError as exc:
        with pytest.raises(ValidationError) as err:
            HeartbeatRequest.from_json(raw)
        assert err.value.field == exc.field
        return
    assert HeartbeatRequest.from_json(raw) == parsed


def test_good_heartbeat_is_normalised() -> None:
    hb = HeartbeatRequest.from_json(json.dumps(_GOOD_HEARTBEAT).encode())
    assert hb.to_json()["tasks"][1]["exit_code"] == 7 and hb.tasks[1].state is ReplicaState.FAILED
    assert hb.gpus[1].util is None and hb.load == {"cpu_pct": 12.5, "mem_used_mib": 8123.0}


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_heartbeat_is_a_validation_error(depth: int) -> None:
    body = b'{"tasks": ' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(ValidationError) as err:
        HeartbeatRequest.from_json(body)
    assert err.value.field.startswith("tasks")
