"""Tasks: the buyer's TaskSpec and its limits, task and replica records, their states and ids.

``TaskSpec`` is what a buyer sends (``POST /tasks``) and what a master hands a miner inside a
desired replica; ``Task`` and ``Replica`` are the master's records of it, served to the buyer
in the shape of ``TaskView`` / ``ReplicaView``.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from prime.protocol.codec import (
    NO_NUL,
    Answer,
    Message,
    ValidationError,
    decode,
    to_builtins,
)
from prime.protocol.groups import GroupPhase, GroupRequest, GroupView

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
MAX_TIME = 2.0**40  # unix seconds far past any real clock; keeps times finite and comparable

# --- docker image references and ids ----------------------------------------------------------

# The grammar of docker/distribution's reference package: [domain[:port]/]path[:tag][@digest].
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_RE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?$(?!\n)"
)
# "$(?!\n)": Python's "$" also matches before a final newline (and the form reads the same in
# the JSON schema's ECMA regex).
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$(?!\n)")
# The one task id rule (URL paths, container names, data dirs): no '.', so no '..' either.
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$(?!\n)")

TaskId = Annotated[str, Meta(pattern=TASK_ID_RE.pattern, max_length=64, description="1-64 letters, digits, '_' or '-'")]
Text = Annotated[str, Meta(pattern=NO_NUL)]
ErrorText = Annotated[str, Meta(max_length=MAX_ERROR_LENGTH, pattern=NO_NUL)]
Time = Annotated[float, Meta(ge=0, le=MAX_TIME)]
ReplicaIndex = Annotated[int, Meta(ge=0, le=MAX_REPLICAS - 1)]
Attempt = Annotated[int, Meta(ge=0, le=2**31)]
GpuIndex = Annotated[int, Meta(ge=0, le=MAX_GPUS_PER_REPLICA)]
ExitCode = Annotated[int, Meta(ge=-(2**31), le=2**31)]


def validate_image(value: Any, field: str = "image") -> str:
    """A docker image reference (``registry.example/name:tag``); ValidationError otherwise."""
    if not isinstance(value, str):
        raise ValidationError(field, "Must be a string.")
    if not value:
        raise ValidationError(field, "Must not be empty.")
    if len(value) > MAX_IMAGE_LENGTH:
        raise ValidationError(field, f"Must be at most {MAX_IMAGE_LENGTH} characters long.")
    if any(c.isspace() for c in value) or "\x00" in value:
        raise ValidationError(field, "Must not contain whitespace.")
    if not IMAGE_RE.match(value):
        raise ValidationError(
            field, f"{value!r} is not a valid image reference like 'registry.example/name:tag' (lowercase name)."
        )
    return value


def new_task_id() -> str:
    """A short random id (12 hex characters, 48 bits): unique enough for one run's tasks."""
    return secrets.token_hex(6)


def is_task_id(value: str) -> bool:
    """Whether ``value`` can be a task id (for URL paths: 404 vs 400)."""
    return isinstance(value, str) and bool(TASK_ID_RE.match(value))


# --- task specs --------------------------------------------------------------------------------


class RestartPolicy(StrEnum):
    NEVER = "never"
    ON_FAILURE = "on-failure"


GpuRequest = int | str  # a count, or "all" (every GPU of one node)

EnvName = Annotated[str, Meta(max_length=MAX_ENV_NAME_LENGTH)]  # the name rule is checked in __post_init__
EnvValue = Annotated[str, Meta(max_length=MAX_ENV_BYTES, pattern=NO_NUL)]
Argument = Annotated[str, Meta(max_length=MAX_COMMAND_BYTES, pattern=NO_NUL)]
Command = Annotated[tuple[Argument, ...], Meta(max_length=MAX_COMMAND_ARGS)]


class TaskSpec(Message, frozen=True, omit_defaults=True):
    """What the buyer asks to run. ``command`` empty = the image's default command.

    ``cmd`` is DESIGN.md's spelling of ``command`` (accepted, never sent). Encoded inside other
    messages, fields at their defaults are left out; ``to_json`` spells every field out.
    """

    image: Annotated[str, Meta(min_length=1, max_length=MAX_IMAGE_LENGTH,
                                extra_json_schema={"pattern": IMAGE_RE.pattern})]
    command: Command = ()
    env: Annotated[dict[EnvName, EnvValue], Meta(max_length=MAX_ENV_VARS,
                                                  extra_json_schema={"propertyNames": {"pattern": ENV_NAME_RE.pattern}})] = {}
    gpus: Annotated[int, Meta(ge=0, le=MAX_GPUS_PER_REPLICA)] | Literal["all"] = 0
    replicas: Annotated[int, Meta(ge=1, le=MAX_REPLICAS)] = 1
    persistent: bool = False
    cpu_limit: Annotated[float, Meta(gt=0, le=MAX_CPU_LIMIT)] | None = None
    memory_limit_mib: Annotated[int, Meta(ge=1, le=MAX_MEMORY_LIMIT_MIB)] | None = None
    restart: RestartPolicy = RestartPolicy.NEVER
    group: GroupRequest | None = None  # a group task (issue 15): one member on each of N..M nodes
    cmd: Command | None = None

    def __post_init__(self) -> None:
        # Raised ValueErrors become msgspec ValidationErrors naming this struct's path.
        if self.cmd is not None:
            if self.command:
                raise ValueError("give either 'command' or 'cmd', not both (at cmd)")
            msgspec.structs.force_setattr(self, "command", self.cmd)
            msgspec.structs.force_setattr(self, "cmd", None)
        try:
            validate_image(self.image)
        except ValidationError as exc:
            raise ValueError(f"{exc.message.rstrip('.')} (at image)") from None
        if sum(len(a.encode()) for a in self.command) > MAX_COMMAND_BYTES:
            raise ValueError(f"the command must be at most {MAX_COMMAND_BYTES} bytes in all (at command)")
        for name in self.env:
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"variable names must match [A-Za-z_][A-Za-z0-9_]* (at env.{name[:64]})")
        if sum(len(k.encode()) + len(v.encode()) for k, v in self.env.items()) > MAX_ENV_BYTES:
            raise ValueError(f"env must be at most {MAX_ENV_BYTES} bytes in all (at env)")
        if self.group is not None:
            # A group's members are its replicas, and the group restarts as a whole.
            if self.gpus == "all":
                raise ValueError("a group member needs a number of GPUs (GPUs per node), not 'all' (at gpus)")
            if self.replicas != 1:
                raise ValueError("a group's size is group.nodes (and group.max_nodes); leave replicas at 1 (at replicas)")
            if self.restart != RestartPolicy.NEVER:
                raise ValueError("a group restarts as a whole (group.max_restarts); leave restart at never (at restart)")

    @property
    def replica_count(self) -> int:
        """Replicas of a task with this spec: a group's most members, else ``replicas``."""
        return self.group.most_nodes if self.group is not None else self.replicas

    @property
    def wants_all_gpus(self) -> bool:
        return self.gpus == "all"

    def to_json(self) -> dict[str, Any]:
        # Every field but ``cmd``; ``group`` only on a group task (an ordinary spec reads as before).
        return {name: to_builtins(getattr(self, name)) for name in self.__struct_fields__
                if name != "cmd" and not (name == "group" and self.group is None)}


# --- tasks and replicas -----------------------------------------------------------------------


class ReplicaState(StrEnum):
    PENDING = "Pending"      # waiting for a node with room
    ASSIGNED = "Assigned"    # placed on a node; the node has not reported it yet
    PULLING = "Pulling"      # the node is pulling the image
    RUNNING = "Running"
    COMPLETED = "Completed"  # exited 0 (final)
    FAILED = "Failed"        # exited non-zero or could not start (final)
    STOPPED = "Stopped"      # stopped on request (final)
    LOST = "Lost"            # at the master: its node stopped reporting it (still desired there, the node should
    #                          start it again); from a node: the engine stopped it (rescheduled, never Completed)


FINAL_REPLICA_STATES = frozenset({ReplicaState.COMPLETED, ReplicaState.FAILED, ReplicaState.STOPPED})
# Replicas that hold a place (and GPUs) on a node.
PLACED_REPLICA_STATES = frozenset(
    {ReplicaState.ASSIGNED, ReplicaState.PULLING, ReplicaState.RUNNING, ReplicaState.LOST}
)
# What a node may report about a replica.
REPORTABLE_REPLICA_STATES = frozenset(
    {ReplicaState.PULLING, ReplicaState.RUNNING, ReplicaState.COMPLETED, ReplicaState.FAILED, ReplicaState.STOPPED,
     ReplicaState.LOST}
)


class TaskState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPED = "Stopped"


class ReplicaView(Answer, frozen=True):
    """One replica as a master serves it (``GET /tasks/{id}``); unknown fields are ignored so
    an older buyer can read a newer master."""

    task_id: TaskId
    index: ReplicaIndex
    state: ReplicaState
    node: str | None = None
    gpu_indices: tuple[GpuIndex, ...] = ()
    attempt: Attempt = 0
    exit_code: ExitCode | None = None
    assigned_at: Time | None = None
    started_at: Time | None = None
    finished_at: Time | None = None
    error: ErrorText | None = None
    restarts: Annotated[int, Meta(ge=0, le=2**31)] = 0  # the node's restarts of this attempt's container


class TaskView(Answer, frozen=True):
    """A task as a master serves it (``POST /tasks``, ``GET /tasks/{id}``)."""

    id: TaskId
    state: TaskState
    spec: TaskSpec
    created_at: Time
    stop_requested: bool = False
    replicas: Annotated[tuple[ReplicaView, ...], Meta(max_length=MAX_REPLICAS)] = ()
    group: GroupView | None = None  # a group task's phase, attempt and members


class TaskList(Answer, frozen=True):
    """``GET /tasks``."""

    tasks: tuple[TaskView, ...]


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
    restarts: int = 0  # as the node last reported them (its restart policy's restarts of this attempt)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_REPLICA_STATES

    def to_json(self) -> dict[str, Any]:
        """The ``ReplicaView`` of this replica (every field, enums as their values)."""
        return to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls, data: Any) -> Replica:
        view = decode(data, ReplicaView, "replica")
        return cls(**{name: getattr(view, name) for name in view.__struct_fields__})


@dataclass
class Task:
    """A buyer's task and its replicas; its state is derived from theirs."""

    id: str
    spec: TaskSpec
    created_at: float
    replicas: list[Replica] = field(default_factory=list)
    stop_requested: bool = False
    group: GroupView | None = None  # a group task: its state machine's view (the master refreshes it)

    @classmethod
    def new(cls, spec: TaskSpec, created_at: float, task_id: str | None = None) -> Task:
        tid = task_id or new_task_id()
        group = GroupView(GroupPhase.PENDING) if spec.group is not None else None
        return cls(tid, spec, created_at, [Replica(tid, i) for i in range(spec.replica_count)], group=group)

    @property
    def state(self) -> TaskState:
        if self.group is not None and not self.stop_requested:
            return _GROUP_TASK_STATES[self.group.phase]
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
        """The ``TaskView`` of this task."""
        return {
            "id": self.id,
            "state": self.state.value,
            "spec": self.spec.to_json(),
            "created_at": self.created_at,
            "stop_requested": self.stop_requested,
            "replicas": [r.to_json() for r in self.replicas],
            "group": None if self.group is None else self.group.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Task:
        view = decode(data, TaskView)
        replicas = [Replica(**{n: getattr(r, n) for n in r.__struct_fields__}) for r in view.replicas]
        return cls(view.id, view.spec, view.created_at, replicas, view.stop_requested, view.group)


# A group task's state is its group's: Starting and Restarting wait for members, as Pending does.
_GROUP_TASK_STATES = {
    GroupPhase.PENDING: TaskState.PENDING,
    GroupPhase.STARTING: TaskState.PENDING,
    GroupPhase.RUNNING: TaskState.RUNNING,
    GroupPhase.RESTARTING: TaskState.PENDING,
    GroupPhase.FAILED: TaskState.FAILED,
    GroupPhase.COMPLETED: TaskState.COMPLETED,
    GroupPhase.STOPPED: TaskState.STOPPED,  # (a stopping task's state comes from its replicas)
}

