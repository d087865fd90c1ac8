"""Tasks: the buyer's TaskSpec and its limits, task and replica records and states."""
from __future__ import annotations

import math
import re
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from prime.chain.types import NodeStatus, Specs
from prime.errors import PrimeError

from prime.protocol.errors import *  # noqa
from prime.protocol.errors import _object, _no_unknown, _required, _join, _int, _optional_int, _number, _optional_number, _bool, _text, _optional_text, _list
MAX_REPLICAS = 256
MAX_GPUS_PER_REPLICA = 256
MAX_CPU_LIMIT = 4096.0
MAX_MEMORY_LIMIT_MIB = 64 * 1024 * 1024  # 64 TiB
MAX_IMAGE_LENGTH = 512
MAX_COMMAND_ARGS = 1024
MAX_COMMAND_BYTES = 64 * 1024
MAX_ENV_VARS = 256
MAX_ENV_NAME_LENGTH = 256
MAX_ENV_BYTES = 64 * 1024
MAX_ERROR_LENGTH = 4096
MAX_REPORTED_TASKS = 4096
MAX_REPORTED_GPUS = 256
MAX_LOAD_KEYS = 32
MAX_PATH_LENGTH = 4096
# --- docker image references ------------------------------------------------------------------

# The grammar of docker/distribution's reference package: [domain[:port]/]path[:tag][@digest].
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_RE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?$"
)
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")


def validate_image(value: Any, field: str = "image") -> str:
    image = _text(value, field, max_length=MAX_IMAGE_LENGTH, allow_empty=False)
    if any(c.isspace() for c in image):
        raise ValidationError(field, "Must not contain whitespace.")
    if not IMAGE_RE.match(image):
        raise ValidationError(
            field, f"{image!r} is not a valid image reference like 'registry.example/name:tag' (lowercase name)."
        )
    return image


def new_task_id() -> str:
    """A short random id (12 hex characters, 48 bits): unique enough for one run's tasks."""
    return secrets.token_hex(6)


def is_task_id(value: str) -> bool:
    """Whether ``value`` can be a task id (for URL paths: 404 vs 400)."""
    return bool(TASK_ID_RE.match(value))


# --- task specs --------------------------------------------------------------------------------


class RestartPolicy(StrEnum):
    NEVER = "never"
    ON_FAILURE = "on-failure"


GpuRequest = int | str  # a count, or "all" (every GPU of one node)

_SPEC_FIELDS = {
    "image", "command", "cmd", "env", "gpus", "replicas", "persistent",
    "cpu_limit", "memory_limit_mib", "restart",
}


@dataclass(frozen=True)
class TaskSpec:
    """What the buyer asks to run. ``command`` empty = the image's default command."""

    image: str
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    gpus: GpuRequest = 0
    replicas: int = 1
    persistent: bool = False
    cpu_limit: float | None = None
    memory_limit_mib: int | None = None
    restart: RestartPolicy = RestartPolicy.NEVER

    @property
    def wants_all_gpus(self) -> bool:
        return self.gpus == "all"

    @classmethod
    def from_json(cls, data: Any, prefix: str = "") -> TaskSpec:
        """Parse and validate a buyer's task (also accepts DESIGN.md's ``cmd`` for ``command``)."""
        data = _object(data, prefix or "body")
        _no_unknown(data, _SPEC_FIELDS, prefix)
        if "command" in data and "cmd" in data:
            raise ValidationError(_join(prefix, "cmd"), "Give either 'command' or 'cmd', not both.")
        image = validate_image(_required(data, "image", prefix), _join(prefix, "image"))
        command_key = "cmd" if "cmd" in data else "command"
        command = _parse_command(data.get(command_key), _join(prefix, command_key))
        env = _parse_env(data.get("env"), _join(prefix, "env"))
        gpus = _parse_gpus(data.get("gpus", 0), _join(prefix, "gpus"))
        replicas = _int(data.get("replicas", 1), _join(prefix, "replicas"), minimum=1, maximum=MAX_REPLICAS)
        persistent = _bool(data.get("persistent", False), _join(prefix, "persistent"))
        cpu_limit = data.get("cpu_limit")
        if cpu_limit is not None:
            cpu_limit = _number(cpu_limit, _join(prefix, "cpu_limit"), maximum=MAX_CPU_LIMIT)
            if cpu_limit <= 0:
                raise ValidationError(_join(prefix, "cpu_limit"), "Must be more than 0 CPUs.")
        memory = _optional_int(
            data.get("memory_limit_mib"), _join(prefix, "memory_limit_mib"), minimum=1, maximum=MAX_MEMORY_LIMIT_MIB
        )
        restart_raw = data.get("restart", RestartPolicy.NEVER.value)
        try:
            restart = RestartPolicy(restart_raw)
        except ValueError:
            raise ValidationError(_join(prefix, "restart"), "Must be 'never' or 'on-failure'.") from None
        return cls(image, command, env, gpus, replicas, persistent, cpu_limit, memory, restart)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "command": list(self.command),
            "env": dict(self.env),
            "gpus": self.gpus,
            "replicas": self.replicas,
            "persistent": self.persistent,
            "cpu_limit": self.cpu_limit,
            "memory_limit_mib": self.memory_limit_mib,
            "restart": self.restart.value,
        }


def _parse_command(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = _list(value, field, max_items=MAX_COMMAND_ARGS)
    args = tuple(_text(item, f"{field}[{i}]", max_length=MAX_COMMAND_BYTES) for i, item in enumerate(items))
    if sum(len(a.encode()) for a in args) > MAX_COMMAND_BYTES:
        raise ValidationError(field, f"Must be at most {MAX_COMMAND_BYTES} bytes in all.")
    return args


def _parse_env(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    env = _object(value, field)
    if len(env) > MAX_ENV_VARS:
        raise ValidationError(field, f"Must have at most {MAX_ENV_VARS} variables.")
    total = 0
    for name, val in env.items():
        if len(name) > MAX_ENV_NAME_LENGTH or not ENV_NAME_RE.match(name):
            raise ValidationError(f"{field}.{name[:64]}", "Variable names must match [A-Za-z_][A-Za-z0-9_]*.")
        _text(val, f"{field}.{name}", max_length=MAX_ENV_BYTES)
        total += len(name.encode()) + len(val.encode())
    if total > MAX_ENV_BYTES:
        raise ValidationError(field, f"Must be at most {MAX_ENV_BYTES} bytes in all.")
    return dict(env)


def _parse_gpus(value: Any, field: str) -> GpuRequest:
    if value == "all" and isinstance(value, str):
        return "all"
    if isinstance(value, str):
        raise ValidationError(field, "Must be a whole number of GPUs or 'all'.")
    return _int(value, field, minimum=0, maximum=MAX_GPUS_PER_REPLICA)


# --- tasks and replicas -----------------------------------------------------------------------


class ReplicaState(StrEnum):
    PENDING = "Pending"      # waiting for a node with room
    ASSIGNED = "Assigned"    # placed on a node; the node has not reported it yet
    PULLING = "Pulling"      # the node is pulling the image
    RUNNING = "Running"
    COMPLETED = "Completed"  # exited 0 (final)
    FAILED = "Failed"        # exited non-zero or could not start (final)
    STOPPED = "Stopped"      # stopped on request (final)
    LOST = "Lost"            # its node stopped reporting it; still desired there, the node should start it again


FINAL_REPLICA_STATES = frozenset({ReplicaState.COMPLETED, ReplicaState.FAILED, ReplicaState.STOPPED})
# Replicas that hold a place (and GPUs) on a node.
PLACED_REPLICA_STATES = frozenset(
    {ReplicaState.ASSIGNED, ReplicaState.PULLING, ReplicaState.RUNNING, ReplicaState.LOST}
)
# What a node may report about a replica.
REPORTABLE_REPLICA_STATES = frozenset(
    {ReplicaState.PULLING, ReplicaState.RUNNING, ReplicaState.COMPLETED, ReplicaState.FAILED, ReplicaState.STOPPED}
)


class TaskState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPED = "Stopped"


@dataclass
class Replica:
    """One copy of a task; ``attempt`` counts placements (it grows when a lost node's replica is rescheduled)."""

    task_id: str
    index: int
    node: str | None = None
    state: ReplicaState = ReplicaState.PENDING
    gpu_indices: tuple[int, ...] = ()
    attempt: int = 0
    exit_code: int | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_REPLICA_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "index": self.index,
            "node": self.node,
            "state": self.state.value,
            "gpu_indices": list(self.gpu_indices),
            "attempt": self.attempt,
            "exit_code": self.exit_code,
            "assigned_at": self.assigned_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Any) -> Replica:
        data = _object(data, "replica")
        try:
            return cls(
                task_id=data["task_id"],
                index=int(data["index"]),
                node=data.get("node"),
                state=ReplicaState(data["state"]),
                gpu_indices=tuple(int(i) for i in data.get("gpu_indices", ())),
                attempt=int(data.get("attempt", 0)),
                exit_code=data.get("exit_code"),
                assigned_at=data.get("assigned_at"),
                started_at=data.get("started_at"),
                finished_at=data.get("finished_at"),
                error=data.get("error"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError("replica", f"Is not a valid replica record ({exc}).") from None


@dataclass
class Task:
    """A buyer's task and its replicas; its state is derived from theirs."""

    id: str
    spec: TaskSpec
    created_at: float
    replicas: list[Replica] = field(default_factory=list)
    stop_requested: bool = False

    @classmethod
    def new(cls, spec: TaskSpec, created_at: float, task_id: str | None = None) -> Task:
        tid = task_id or new_task_id()
        return cls(tid, spec, created_at, [Replica(tid, i) for i in range(spec.replicas)])

    @property
    def state(self) -> TaskState:
        states = [r.state for r in self.replicas]
        if states and all(s in FINAL_REPLICA_STATES for s in states):
            if ReplicaState.FAILED in states:
                return TaskState.FAILED
            if self.stop_requested or ReplicaState.STOPPED in states:
                return TaskState.STOPPED
            return TaskState.COMPLETED
        if not states and self.stop_requested:
            return TaskState.STOPPED
        if any(s == ReplicaState.RUNNING for s in states):
            return TaskState.RUNNING
        return TaskState.PENDING

    @property
    def is_final(self) -> bool:
        return self.state in (TaskState.COMPLETED, TaskState.FAILED, TaskState.STOPPED)

    def replica(self, index: int) -> Replica | None:
        return self.replicas[index] if 0 <= index < len(self.replicas) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "spec": self.spec.to_json(),
            "created_at": self.created_at,
            "stop_requested": self.stop_requested,
            "replicas": [r.to_json() for r in self.replicas],
        }

    @classmethod
    def from_json(cls, data: Any) -> Task:
        data = _object(data, "task")
        task_id = _text(_required(data, "id", ""), "id", max_length=64, allow_empty=False)
        if not is_task_id(task_id):
            raise ValidationError("id", "Must be 1-64 letters, digits, '-' or '_'.")
        spec = TaskSpec.from_json(_required(data, "spec", ""), "spec")
        created_at = _number(_required(data, "created_at", ""), "created_at")
        replicas = [Replica.from_json(r) for r in _list(data.get("replicas", []), "replicas", max_items=MAX_REPLICAS)]
        return cls(task_id, spec, created_at, replicas, _bool(data.get("stop_requested", False), "stop_requested"))
