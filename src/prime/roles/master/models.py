"""The master's data: task specs, tasks and replicas, heartbeat messages, node records.

Every wire message has ``from_json`` (strict: unknown fields, wrong types and out-of-range
values raise ``ValidationError`` naming the field) and ``to_json``. The HTTP layer turns a
``ValidationError`` into ``400 {"error": "invalid_request", "detail": err.detail}``.
Pure data and validation only: no I/O.
"""

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

# Bounds that keep one request from exhausting the master (the app's body limit applies too).
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


class ValidationError(PrimeError):
    """Bad input: ``field`` names what is wrong (dotted/indexed path), ``message`` is one sentence."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    @property
    def detail(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


# --- small strict readers (JSON values come in as Any) ---------------------------------------


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(field, "Must be a JSON object.")
    for key in value:
        if not isinstance(key, str):
            raise ValidationError(field, "Object keys must be strings.")
    return value


def _no_unknown(data: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for key in data:
        if key not in allowed:
            name = f"{prefix}.{key}" if prefix else key
            raise ValidationError(name, "Is not a known field; check its spelling.")


def _required(data: Mapping[str, Any], key: str, prefix: str) -> Any:
    if key not in data:
        raise ValidationError(_join(prefix, key), "Is required.")
    return data[key]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _int(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    # bool is an int in Python; JSON true is never a number here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, "Must be a whole number.")
    if minimum is not None and value < minimum:
        raise ValidationError(field, f"Must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValidationError(field, f"Must be at most {maximum}, got {value}.")
    return value


def _optional_int(value: Any, field: str, **bounds: int) -> int | None:
    return None if value is None else _int(value, field, **bounds)


def _number(value: Any, field: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(field, "Must be a number.")
    if not math.isfinite(value):
        raise ValidationError(field, "Must be a finite number.")
    if minimum is not None and value < minimum:
        raise ValidationError(field, f"Must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValidationError(field, f"Must be at most {maximum}, got {value}.")
    return float(value)


def _optional_number(value: Any, field: str, **bounds: float) -> float | None:
    return None if value is None else _number(value, field, **bounds)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, "Must be true or false.")
    return value


def _text(value: Any, field: str, *, max_length: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "Must be a string.")
    if not allow_empty and not value:
        raise ValidationError(field, "Must not be empty.")
    if len(value) > max_length:
        raise ValidationError(field, f"Must be at most {max_length} characters long.")
    if "\x00" in value:
        raise ValidationError(field, "Must not contain NUL characters.")
    return value


def _optional_text(value: Any, field: str, *, max_length: int) -> str | None:
    return None if value is None else _text(value, field, max_length=max_length)


def _list(value: Any, field: str, *, max_items: int) -> list[Any]:
    if not isinstance(value, list):
        raise ValidationError(field, "Must be a JSON list.")
    if len(value) > max_items:
        raise ValidationError(field, f"Must have at most {max_items} items.")
    return value


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


# --- heartbeat messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaReport:
    """What a node says about one replica it runs (``id`` is the task id)."""

    id: str
    replica: int
    state: ReplicaState
    exit_code: int | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, data: Any, prefix: str) -> ReplicaReport:
        data = _object(data, prefix)
        _no_unknown(data, _REPLICA_REPORT_KEYS, prefix)
        task_id = _text(_required(data, "id", prefix), _join(prefix, "id"), max_length=64, allow_empty=False)
        if not is_task_id(task_id):
            raise ValidationError(_join(prefix, "id"), "Is not a valid task id.")
        replica = _int(data.get("replica", 0), _join(prefix, "replica"), minimum=0, maximum=MAX_REPLICAS - 1)
        raw_state = _required(data, "state", prefix)
        try:
            state = ReplicaState(raw_state)
        except ValueError:
            state = None
        if state not in REPORTABLE_REPLICA_STATES:
            allowed = ", ".join(sorted(s.value for s in REPORTABLE_REPLICA_STATES))
            raise ValidationError(_join(prefix, "state"), f"Must be one of {allowed}.")
        exit_code = _optional_int(data.get("exit_code"), _join(prefix, "exit_code"), minimum=-(2**31), maximum=2**31)
        error = _optional_text(data.get("error"), _join(prefix, "error"), max_length=MAX_ERROR_LENGTH)
        return cls(task_id, replica, state, exit_code, error)

    @classmethod
    def _from_plain_json(cls, data: Any) -> ReplicaReport | None:
        """The common, well-formed report without building error names (see HeartbeatRequest)."""
        if type(data) is not dict or not data.keys() <= _REPLICA_REPORT_KEYS:
            return None
        task_id, replica, raw_state = data.get("id"), data.get("replica", 0), data.get("state")
        exit_code, error = data.get("exit_code"), data.get("error")
        state = _REPORTABLE_BY_VALUE.get(raw_state) if type(raw_state) is str else None
        if (type(task_id) is not str or not 0 < len(task_id) <= 64 or not is_task_id(task_id) or state is None
                or type(replica) is not int or not 0 <= replica <= MAX_REPLICAS - 1
                or not (exit_code is None or (type(exit_code) is int and -(2**31) <= exit_code <= 2**31))
                or not (error is None or (type(error) is str and len(error) <= MAX_ERROR_LENGTH and "\x00" not in error))):
            return None
        return cls(task_id, replica, state, exit_code, error)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "replica": self.replica, "state": self.state.value,
                "exit_code": self.exit_code, "error": self.error}


_REPLICA_REPORT_KEYS = frozenset({"id", "replica", "state", "exit_code", "error"})
_REPORTABLE_BY_VALUE = {s.value: s for s in REPORTABLE_REPLICA_STATES}


@dataclass(frozen=True)
class GpuSample:
    index: int
    util: float | None = None          # percent
    mem_used_mib: float | None = None
    temp_c: float | None = None

    @classmethod
    def from_json(cls, data: Any, prefix: str) -> GpuSample:
        fast = cls._from_plain_json(data)
        return fast if fast is not None else cls._from_json_checked(data, prefix)

    @classmethod
    def _from_json_checked(cls, data: Any, prefix: str) -> GpuSample:
        """Field by field, naming the first one that is wrong."""
        data = _object(data, prefix)
        _no_unknown(data, _GPU_SAMPLE_KEYS, prefix)
        return cls(
            _int(_required(data, "index", prefix), _join(prefix, "index"), minimum=0, maximum=MAX_REPORTED_GPUS),
            _optional_number(data.get("util"), _join(prefix, "util"), minimum=0, maximum=100),
            _optional_number(data.get("mem_used_mib"), _join(prefix, "mem_used_mib"), minimum=0),
            _optional_number(data.get("temp_c"), _join(prefix, "temp_c"), minimum=-100, maximum=300),
        )

    @classmethod
    def _from_plain_json(cls, data: Any) -> GpuSample | None:
        """The common, well-formed sample without building error names (every heartbeat has several)."""
        if type(data) is not dict or not data.keys() <= _GPU_SAMPLE_KEYS:
            return None
        index = data.get("index")
        util, mem, temp = data.get("util"), data.get("mem_used_mib"), data.get("temp_c")
        if (type(index) is int and 0 <= index <= MAX_REPORTED_GPUS and _plain_number(util, 0, 100)
                and _plain_number(mem, 0, sys.float_info.max) and _plain_number(temp, -100, 300)):
            return cls(index, None if util is None else float(util), None if mem is None else float(mem),
                       None if temp is None else float(temp))
        return None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "util": self.util, "mem_used_mib": self.mem_used_mib, "temp_c": self.temp_c}


_GPU_SAMPLE_KEYS = frozenset({"index", "util", "mem_used_mib", "temp_c"})


def _plain_number(value: Any, low: float, high: float) -> bool:
    """None, or an int/float (not bool) that is finite and within [low, high]."""
    return value is None or ((type(value) is int or type(value) is float) and low <= value <= high)


def _parse_load(value: Any, field: str) -> dict[str, float]:
    if value is None:
        return {}
    load = _object(value, field)
    if len(load) > MAX_LOAD_KEYS:
        raise ValidationError(field, f"Must have at most {MAX_LOAD_KEYS} entries.")
    out = {}
    for key, val in load.items():
        if len(key) > 64:
            raise ValidationError(field, "Entry names must be at most 64 characters long.")
        out[key] = _number(val, f"{field}.{key}")
    return out


@dataclass(frozen=True)
class HeartbeatRequest:
    """``POST /heartbeat`` body: the node's replicas, GPU samples and load (cpu_pct, mem_used_mib, ...)."""

    tasks: tuple[ReplicaReport, ...] = ()
    gpus: tuple[GpuSample, ...] = ()
    load: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> HeartbeatRequest:
        fast = cls._from_plain_json(data)
        return fast if fast is not None else cls._from_json_checked(data)

    @classmethod
    def _from_json_checked(cls, data: Any) -> HeartbeatRequest:
        """Field by field, naming the first one that is wrong."""
        data = _object(data, "body")
        _no_unknown(data, _HEARTBEAT_KEYS, "")
        tasks = tuple(
            ReplicaReport.from_json(item, f"tasks[{i}]")
            for i, item in enumerate(_list(data.get("tasks", []), "tasks", max_items=MAX_REPORTED_TASKS))
        )
        gpus = tuple(
            GpuSample._from_json_checked(item, f"gpus[{i}]")
            for i, item in enumerate(_list(data.get("gpus", []), "gpus", max_items=MAX_REPORTED_GPUS))
        )
        return cls(tasks, gpus, _parse_load(data.get("load"), "load"))

    @classmethod
    def _from_plain_json(cls, data: Any) -> HeartbeatRequest | None:
        """A well-formed heartbeat, checked without building error names; None sends it down the
        slow path (which accepts exactly the same bodies, and says what is wrong with the others).
        A master takes thousands of heartbeats a second: this is most of its own work on each."""
        if type(data) is not dict or not data.keys() <= _HEARTBEAT_KEYS:
            return None
        raw_tasks, raw_gpus, raw_load = data.get("tasks", []), data.get("gpus", []), data.get("load")
        if type(raw_tasks) is not list or len(raw_tasks) > MAX_REPORTED_TASKS \
                or type(raw_gpus) is not list or len(raw_gpus) > MAX_REPORTED_GPUS:
            return None
        tasks = _all_plain(raw_tasks, ReplicaReport._from_plain_json)
        gpus = _all_plain(raw_gpus, GpuSample._from_plain_json)
        if tasks is None or gpus is None:
            return None
        load: dict[str, float] = {}
        if raw_load is not None:
            if type(raw_load) is not dict or len(raw_load) > MAX_LOAD_KEYS:
                return None
            for key, value in raw_load.items():
                if len(key) > 64 or value is None or not _plain_number(value, -sys.float_info.max, sys.float_info.max):
                    return None
                load[key] = float(value)
        return cls(tasks, gpus, load)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": [t.to_json() for t in self.tasks], "gpus": [g.to_json() for g in self.gpus],
                "load": dict(self.load)}


_HEARTBEAT_KEYS = frozenset({"tasks", "gpus", "load"})


T = TypeVar("T")


def _all_plain(items: list[Any], parse: Callable[[Any], T | None]) -> tuple[T, ...] | None:
    """Every item through a ``_from_plain_json``; None as soon as one needs the checked path."""
    out = []
    for item in items:
        parsed = parse(item)
        if parsed is None:
            return None
        out.append(parsed)
    return tuple(out)


@dataclass(frozen=True)
class DesiredReplica:
    """One replica a node should run: everything it needs to start one it never saw."""

    id: str                      # task id
    replica: int
    attempt: int
    gpu_indices: tuple[int, ...]
    spec: TaskSpec

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "replica": self.replica, "attempt": self.attempt,
                "gpu_indices": list(self.gpu_indices), "spec": self.spec.to_json()}

    @classmethod
    def from_json(cls, data: Any, prefix: str = "desired") -> DesiredReplica:
        data = _object(data, prefix)
        _no_unknown(data, {"id", "replica", "attempt", "gpu_indices", "spec"}, prefix)
        task_id = _text(_required(data, "id", prefix), _join(prefix, "id"), max_length=64, allow_empty=False)
        if not is_task_id(task_id):
            raise ValidationError(_join(prefix, "id"), "Is not a valid task id.")
        gpu_field = _join(prefix, "gpu_indices")
        gpus = tuple(
            _int(g, f"{gpu_field}[{i}]", minimum=0)
            for i, g in enumerate(_list(data.get("gpu_indices", []), gpu_field, max_items=MAX_REPORTED_GPUS))
        )
        return cls(
            task_id,
            _int(_required(data, "replica", prefix), _join(prefix, "replica"), minimum=0),
            _int(data.get("attempt", 0), _join(prefix, "attempt"), minimum=0),
            gpus,
            TaskSpec.from_json(_required(data, "spec", prefix), _join(prefix, "spec")),
        )


@dataclass(frozen=True)
class HeartbeatResponse:
    """The master's answer: when to heartbeat next and the full list of replicas the node should run
    (anything the node runs that is not listed should be stopped)."""

    interval_s: float
    desired: tuple[DesiredReplica, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "desired": [d.to_json() for d in self.desired]}

    @classmethod
    def from_json(cls, data: Any) -> HeartbeatResponse:
        data = _object(data, "body")
        _no_unknown(data, {"interval_s", "desired"}, "")
        interval = _number(_required(data, "interval_s", ""), "interval_s", minimum=0.01)
        desired = tuple(
            DesiredReplica.from_json(d, f"desired[{i}]")
            for i, d in enumerate(_list(data.get("desired", []), "desired", max_items=MAX_REPORTED_TASKS))
        )
        return cls(interval, desired)


# --- nodes ---------------------------------------------------------------------------------------


class NodeState(StrEnum):
    APPROVED = "Approved"    # approved on chain for our run; an invite is due (or backing off after a failure)
    INVITED = "Invited"      # a signed invite is live (until its expiry)
    JOINED = "Joined"        # a member on chain; no heartbeat yet
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"  # missed heartbeats; keeps its replicas
    DEAD = "Dead"            # missed many heartbeats; its replicas were rescheduled
    LEFT = "Left"            # left, ejected or otherwise out of the run on chain; never invited again


MEMBER_STATES = frozenset({NodeState.JOINED, NodeState.HEALTHY, NodeState.UNHEALTHY, NodeState.DEAD})
# Nodes whose replicas stay where they are (a Dead or Left node's replicas are rescheduled).
HOSTING_STATES = frozenset({NodeState.JOINED, NodeState.HEALTHY, NodeState.UNHEALTHY})


def specs_to_json(specs: Specs) -> dict[str, Any]:
    return {"gpu_count": specs.gpu_count, "gpu_model": specs.gpu_model, "gpu_memory_mib": specs.gpu_memory_mib,
            "cpu_cores": specs.cpu_cores, "ram_mib": specs.ram_mib, "disk_gib": specs.disk_gib}


def specs_from_json(data: Any) -> Specs:
    data = _object(data, "hardware")
    try:
        return Specs(int(data["gpu_count"]), str(data["gpu_model"]), int(data["gpu_memory_mib"]),
                     int(data["cpu_cores"]), int(data["ram_mib"]), int(data.get("disk_gib", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValidationError("hardware", f"Is not a valid hardware record ({exc}).") from None


NO_HARDWARE = Specs(0, "", 0, 0, 0, 0)


@dataclass(frozen=True)
class NodeSample:
    """The latest GPU/load sample a node sent with its heartbeat."""

    at: float
    gpus: tuple[GpuSample, ...] = ()
    load: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "gpus": [g.to_json() for g in self.gpus], "load": dict(self.load)}

    @classmethod
    def from_json(cls, data: Any) -> NodeSample:
        data = _object(data, "sample")
        return cls(
            float(data["at"]),
            tuple(GpuSample.from_json(g, f"gpus[{i}]") for i, g in enumerate(data.get("gpus", []))),
            _parse_load(data.get("load"), "load"),
        )


@dataclass
class NodeRecord:
    """What the master knows about one node: chain view, invite bookkeeping, heartbeat recency."""

    address: str
    state: NodeState
    hardware: Specs = NO_HARDWARE
    chain_status: NodeStatus | None = None   # None: never observed on chain
    chain_block: int | None = None           # block of the chain observation applied last (older ones are ignored)
    url: str | None = None                   # from discovery
    approved_at: float | None = None
    invited_at: float | None = None
    invite_expiry: int | None = None         # unix seconds; set while an invite is live
    invite_failures: int = 0
    next_invite_at: float | None = None      # earliest time of the next invite (backoff)
    invites_sent: int = 0
    member_since: float | None = None        # when the master learned the node is Active on chain
    last_heartbeat: float | None = None
    state_since: float | None = None
    last_error: str | None = None
    last_sample: NodeSample | None = None

    @property
    def joined_on_chain(self) -> bool:
        return self.chain_status == NodeStatus.ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "state": self.state.value,
            "joined_on_chain": self.joined_on_chain,
            "chain_status": self.chain_status.label if self.chain_status is not None else None,
            "chain_block": self.chain_block,
            "hardware": specs_to_json(self.hardware),
            "url": self.url,
            "approved_at": self.approved_at,
            "invited_at": self.invited_at,
            "invite_expiry": self.invite_expiry,
            "invite_failures": self.invite_failures,
            "next_invite_at": self.next_invite_at,
            "invites_sent": self.invites_sent,
            "member_since": self.member_since,
            "last_heartbeat": self.last_heartbeat,
            "state_since": self.state_since,
            "last_error": self.last_error,
            "last_sample": self.last_sample.to_json() if self.last_sample else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> NodeRecord:
        data = _object(data, "node")
        try:
            status = data.get("chain_status")
            sample = data.get("last_sample")
            return cls(
                address=data["address"],
                state=NodeState(data["state"]),
                hardware=specs_from_json(data["hardware"]) if data.get("hardware") else NO_HARDWARE,
                chain_status=NodeStatus[status.upper()] if status else None,
                chain_block=data.get("chain_block"),
                url=data.get("url"),
                approved_at=data.get("approved_at"),
                invited_at=data.get("invited_at"),
                invite_expiry=data.get("invite_expiry"),
                invite_failures=int(data.get("invite_failures", 0)),
                next_invite_at=data.get("next_invite_at"),
                invites_sent=int(data.get("invites_sent", 0)),
                member_since=data.get("member_since"),
                last_heartbeat=data.get("last_heartbeat"),
                state_since=data.get("state_since"),
                last_error=data.get("last_error"),
                last_sample=NodeSample.from_json(sample) if sample else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValidationError("node", f"Is not a valid node record ({exc}).") from None


def normalize_address(address: str) -> str:
    """The checksum form of an Ethereum address (so chain events, signers and URLs agree)."""
    from eth_utils import to_checksum_address  # pure hashing, no network

    if not isinstance(address, str) or not ADDRESS_RE.match(address):
        raise ValidationError("address", f"{address!r} is not a 0x-prefixed 40-hex-digit address.")
    return to_checksum_address(address)


# --- storage sync -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a task's persistent storage as the miner lists it (path relative to /data)."""

    path: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, data: Any, prefix: str = "file") -> ManifestEntry:
        data = _object(data, prefix)
        _no_unknown(data, {"path", "size", "sha256"}, prefix)
        path = validate_relative_path(_required(data, "path", prefix), _join(prefix, "path"))
        size = _int(_required(data, "size", prefix), _join(prefix, "size"), minimum=0)
        digest = _text(_required(data, "sha256", prefix), _join(prefix, "sha256"), max_length=64)
        if not SHA256_RE.match(digest):
            raise ValidationError(_join(prefix, "sha256"), "Must be 64 lowercase hex digits.")
        return cls(path, size, digest)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def validate_relative_path(value: Any, field: str = "path") -> str:
    """A relative POSIX path that cannot climb out of its directory."""
    path = _text(value, field, max_length=MAX_PATH_LENGTH, allow_empty=False)
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise ValidationError(field, f"{path[:200]!r} must be a relative path without '.', '..' or empty parts.")
    return path
