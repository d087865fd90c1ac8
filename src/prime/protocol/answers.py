"""Answers of routes that build a plain dict today, as Structs for their ``/openapi.json`` schema.

Each mirrors, field for field, what its handler sends (the role tests validate real answers
against these schemas, so a handler that drifts fails there). Messages that have a home in
another protocol module (tasks, nodes, discovery, storage, challenge, invite) are not here.
Imports nothing from ``prime.roles``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from prime.protocol.storage import ManifestEntry
from prime.protocol.tasks import Time

# What a miner's executor reports of a replica (prime.roles.miner.executor.TaskState values).
ContainerState = Literal["Pulling", "Running", "Completed", "Failed", "Stopped"]
LogStream = Annotated[str, Meta(description='"stdout" or "stderr" ("error" for a line the master adds about a miner it could not read, "dropped" for its notice of lines it no longer keeps)')]
Replica = Annotated[int, Meta(ge=0, le=2**31)]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]


class Ok(msgspec.Struct, frozen=True):
    """``{"ok": true}``: the request was taken (``POST /challenge/{id}/verdict``)."""

    ok: bool


# --- miner: master -> miner task routes ------------------------------------------------------


class ReplicaStarted(msgspec.Struct, frozen=True):
    """``POST /tasks`` on a miner (202): the start goes on in the background."""

    id: str
    replica: Replica
    state: ContainerState


class TaskStopped(msgspec.Struct, frozen=True):
    """``DELETE /tasks/{id}`` on a miner: ``stopped`` is false when the node had nothing of it."""

    id: str
    stopped: bool


class ContainerStatus(msgspec.Struct, frozen=True):
    """One replica's container on a miner."""

    task_id: str
    replica: Replica
    state: ContainerState
    exit_code: Annotated[int, Meta(ge=-(2**31), le=2**31)] | None = None
    reason: str | None = None
    container_id: str | None = None
    spec_hash: str | None = None
    restarts: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    gpus: str | None = None


class ContainerList(msgspec.Struct, frozen=True):
    """``GET /tasks`` on a miner."""

    tasks: list[ContainerStatus]


class ContainerLogLine(msgspec.Struct, frozen=True):
    """One NDJSON line of ``GET /tasks/{id}/logs`` on a miner (``ts``: Docker's RFC 3339 time)."""

    stream: LogStream
    line: str
    ts: str | None = None


class DataManifest(msgspec.Struct, frozen=True):
    """``GET /tasks/{id}/manifest`` on a miner: the files of the task's persistent /data."""

    task_id: str
    replica: Replica
    final: bool
    files: list[ManifestEntry]


# --- master: buyer API ------------------------------------------------------------------------


class TaskLogLine(msgspec.Struct, frozen=True):
    """One NDJSON line of ``GET /tasks/{id}/logs`` on a master: a miner's line as the master kept it, tagged."""

    replica: Replica
    node: str | None
    stream: LogStream
    line: str
    ts: str | Time | None = None  # the miner's RFC 3339 time; unix seconds on the master's own "error" lines
    attempt: Replica | None = None  # the replica's attempt the line is from (0: its first placement)
    seq: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None  # its place in the attempt's output (None on the master's own lines)


class SyncedFile(msgspec.Struct, frozen=True):
    """One file of a task's /data as synced into the master's store."""

    replica: Replica
    path: str
    size: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    sha256: Sha256
    synced_at: Time


class SyncedFiles(msgspec.Struct, frozen=True):
    """``GET /tasks/{id}/files`` on a master."""

    files: list[SyncedFile]
