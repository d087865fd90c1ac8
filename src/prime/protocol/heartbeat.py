"""Heartbeat link: ``POST /heartbeat`` from a node to its master, and the master's answer.

The node reports its replicas, GPU samples and load; the master answers when to beat next and
the full list of replicas the node should run (anything not listed should be stopped).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from prime.protocol.codec import Message
from prime.protocol.groups import Port, PortRange
from prime.protocol.tasks import (
    ENV_NAME_RE,
    MAX_GPUS_PER_REPLICA,
    REPORTABLE_REPLICA_STATES,
    Attempt,
    EnvName,
    EnvValue,
    ErrorText,
    ExitCode,
    GpuIndex,
    ReplicaIndex,
    ReplicaState,
    TaskId,
    TaskSpec,
)

MAX_REPORTED_TASKS = 4096
MAX_REPORTED_GPUS = 256
MAX_LOAD_KEYS = 32
MAX_MASTER_ENV = 64   # a group member's variables (NODE_RANK ... PRIME_PEERS)
MAX_MEMBER_PORTS = 16

# A measurement: finite (±inf and NaN fail these bounds; JSON itself has no literal for them)
# and within ±2**53, where a float still counts whole numbers exactly (MiB, bytes, percent).
MAX_MEASURE = 2.0**53
Finite = Annotated[float, Meta(ge=-MAX_MEASURE, le=MAX_MEASURE)]

# What a node may report about a replica (only the master assigns, and only it loses replicas).
_REPORTABLE = ("Pulling", "Running", "Completed", "Failed", "Stopped", "Lost")
MAX_RESTARTS = 2**31
ReportedState = Annotated[ReplicaState, Meta(extra_json_schema={"enum": list(_REPORTABLE)})]


class ReplicaReport(Message, frozen=True, omit_defaults=True):
    """What a node says about one replica it runs (``id`` is the task id). ``Lost``: its container
    exited because the engine stopped it (not the task's own exit; see miner/exits.py)."""

    id: TaskId
    replica: ReplicaIndex
    state: ReportedState
    exit_code: ExitCode | None = None
    error: ErrorText | None = None
    # How often the node restarted this replica's container (its restart policy); left out at 0,
    # so a report without restarts reads the same to masters older than the field.
    restarts: Annotated[int, Meta(ge=0, le=MAX_RESTARTS)] = 0
    # The attempt of the container this report is about (None: not known, e.g. no container yet);
    # the master ignores a report of another attempt than the replica's (a leftover's).
    attempt: Attempt | None = None

    def __post_init__(self) -> None:
        if self.state not in REPORTABLE_REPLICA_STATES:
            raise ValueError(f"must be one of {', '.join(_REPORTABLE)} (at state)")


class GpuSample(Message, frozen=True):
    index: Annotated[int, Meta(ge=0, le=MAX_REPORTED_GPUS)]
    util: Annotated[float, Meta(ge=0, le=100)] | None = None          # percent
    mem_used_mib: Annotated[float, Meta(ge=0, le=MAX_MEASURE)] | None = None
    temp_c: Annotated[float, Meta(ge=-100, le=300)] | None = None


LoadName = Annotated[str, Meta(max_length=64)]


class HeartbeatRequest(Message, frozen=True, omit_defaults=True):
    """``POST /heartbeat`` body: the node's replicas, GPU samples and load (cpu_pct, mem_used_mib, ...),
    and the port range its group members may listen on (``--task-ports``; None: it hosts none)."""

    tasks: Annotated[tuple[ReplicaReport, ...], Meta(max_length=MAX_REPORTED_TASKS)] = ()
    gpus: Annotated[tuple[GpuSample, ...], Meta(max_length=MAX_REPORTED_GPUS)] = ()
    load: Annotated[dict[LoadName, Finite], Meta(max_length=MAX_LOAD_KEYS)] | None = None
    task_ports: PortRange | None = None

    def __post_init__(self) -> None:
        if self.load is None:  # "load": null is the same as no load
            msgspec.structs.force_setattr(self, "load", {})
        if self.task_ports is not None and self.task_ports[0] > self.task_ports[1]:
            raise ValueError("the first port must not be above the last (at task_ports)")


class DesiredReplica(Message, frozen=True, omit_defaults=True):
    """One replica a node should run: everything it needs to start one it never saw.

    A group member (``spec.group``) also carries the master's ``env`` (its rank, its peers:
    ``groupenv``), set over the spec's, and the ``ports`` it listens on, from the node's range.
    """

    id: TaskId
    replica: ReplicaIndex
    attempt: Attempt
    gpu_indices: Annotated[tuple[GpuIndex, ...], Meta(max_length=MAX_GPUS_PER_REPLICA)]
    spec: TaskSpec
    env: Annotated[dict[EnvName, EnvValue], Meta(max_length=MAX_MASTER_ENV)] = {}
    ports: Annotated[tuple[Port, ...], Meta(max_length=MAX_MEMBER_PORTS)] = ()

    def __post_init__(self) -> None:
        for name in self.env:
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"variable names must match [A-Za-z_][A-Za-z0-9_]* (at env.{name[:64]})")


class HeartbeatResponse(Message, frozen=True):
    """The master's answer: when to heartbeat next and the full list of replicas the node should run."""

    interval_s: Annotated[float, Meta(ge=0.01, le=86_400)]
    desired: Annotated[tuple[DesiredReplica, ...], Meta(max_length=MAX_REPORTED_TASKS)] = ()
