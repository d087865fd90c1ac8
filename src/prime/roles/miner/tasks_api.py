"""Master → miner routes: start and stop replicas now, read their state, logs and files.

Only a master of the node's run (on chain, briefly cached) may call these. The heartbeat's
desired list stays the authority on what runs; these routes let a master act at once and
read what a heartbeat does not carry (logs, the persistent /data manifest and its blobs).

- ``POST /tasks`` {id, replica, attempt, gpu_indices, spec} → 202 {id, replica, state}
- ``DELETE /tasks/{id}`` → {id, stopped} (containers go; the task's /data stays for the last sync)
- ``GET /tasks`` → {tasks: [TaskStatus]}
- ``GET /tasks/{id}/logs?follow=0|1&tail=N&replica=R&attempt=A&offset=N`` → NDJSON {"stream","line","ts"}
- ``GET /tasks/{id}/manifest?replica=R`` → {task_id, replica, final, files: [{path,size,sha256}]}
- ``GET /tasks/{id}/blobs/{sha256}?replica=R`` → the bytes of one file of that task's /data
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from prime.auth.middleware import require
from prime.protocol.answers import ContainerList, ContainerLogLine, DataManifest, ReplicaStarted, TaskStopped
from prime.protocol.errors import InvalidJson, ValidationError
from prime.protocol.heartbeat import DesiredReplica
from prime.protocol.tasks import ReplicaState, is_task_id
from prime.roles.miner import storage
from prime.roles.miner.core import Unplaceable
from prime.roles.miner.executor import TaskNotFound
from prime.roles.miner.heartbeat import Converger
from prime.web import FLAG, NDJSON, Binary, Param, api, json_error
from prime.web.openapi import ascii_int

log = logging.getLogger(__name__)

Check = Callable[[web.Request, str], Awaitable[bool]]
MAX_TAIL = 100_000
MAX_ATTEMPT = 2**31
MAX_OFFSET = 2**53
OFFSET_HEADER = "X-Prime-Log-Offset"
LOG_QUERY = {
    "follow": FLAG,
    "tail": Param(int, "the last N lines", ge=0, le=MAX_TAIL),
    "replica": Param(int, "the replica (default 0)", ge=0, le=255),
    "attempt": Param(int, "only this attempt's container", ge=0, le=MAX_ATTEMPT),
    "offset": Param(int, "leave out the first N lines", ge=0, le=MAX_OFFSET),
}
CHUNK = 256 * 1024


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["id"]
    if not is_task_id(task_id):
        raise web.HTTPBadRequest(text="the task id must be 1-64 letters, digits, '-' or '_'")
    return task_id


def _int_param(request: web.Request, name: str, default: int | None, *, minimum: int = 0, maximum: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = ascii_int(raw, minimum=minimum, maximum=maximum)
    if value is None:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number from {minimum} to {maximum}")
    return value


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "0").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no", ""):
        return False
    raise web.HTTPBadRequest(text=f"{name} must be 0 or 1")


class TasksApi:
    def __init__(self, executor: Any, converger: Converger) -> None:
        self.executor = executor
        self.converger = converger

    @api(request=DesiredReplica, response=ReplicaStarted, status=202, errors=(401, 403, 503))
    async def start_task(self, request: web.Request) -> web.Response:
        """Start one replica now (the master's push; the next heartbeat's desired list agrees).

        Body: a desired entry {id, replica, attempt, gpu_indices, spec}. Answers 202
        {id, replica, state} at once; the image pull and start go on in the background.
        """
        try:
            # typed decoding from the bytes (no untyped parse to nest in, numbers and text checked)
            desired = DesiredReplica.from_json(await request.read(), "body")
            placement = self.converger.push(desired)
        except InvalidJson as exc:
            return json_error(400, "invalid_json", exc.detail)
        except ValidationError as exc:
            return json_error(400, "invalid_request", exc.detail)
        except (Unplaceable, ValueError) as exc:
            return json_error(400, "invalid_request", str(exc))
        await asyncio.sleep(0)  # let the start begin before we read the state
        status = await self.executor.status(placement.task_id, placement.replica)
        state = ReplicaState(status.state).value if status is not None else ReplicaState.PULLING.value
        return web.json_response({"id": placement.task_id, "replica": placement.replica, "state": state}, status=202)

    @api(response=TaskStopped, errors=(400, 401, 403, 503))
    async def stop_task(self, request: web.Request) -> web.Response:
        """Stop and remove every container of a task (its /data directory is kept).

        Answers {id, stopped}: stopped is false when the node had nothing of that task.
        """
        task_id = _task_id(request)
        stopped = await self.converger.stop_task(task_id)
        return web.json_response({"id": task_id, "stopped": stopped})

    @api(response=ContainerList, errors=(401, 403, 503))
    async def list_tasks(self, request: web.Request) -> web.Response:
        """The state of every replica on this node: {tasks: [{task_id, replica, state, exit_code, reason, ...}]}."""
        statuses = await self.executor.snapshot()
        return web.json_response({"tasks": [s.to_dict(self.converger.restarts(s.key)) for s in statuses]})

    @api(response=NDJSON(ContainerLogLine), query=LOG_QUERY, errors=(400, 404, 401, 403, 503))
    async def logs(self, request: web.Request) -> web.StreamResponse:
        """A replica's output as NDJSON lines {"stream","line","ts"}; follow=1 streams until it exits.

        Query: follow=0|1, tail=N (last N lines), replica=R (default 0), attempt=A (only that
        attempt's container), offset=N (leave out the first N lines: a reader that has them
        resumes; the answer's ``X-Prime-Log-Offset`` says where its first line is). The
        container's output spans every restart of it (``restart: on-failure``). 404 when the
        replica has no container (of that attempt) on this node.
        """
        task_id = _task_id(request)
        follow = _flag(request, "follow")
        tail = _int_param(request, "tail", None, maximum=MAX_TAIL)
        replica = _int_param(request, "replica", 0, maximum=255) or 0
        attempt = _int_param(request, "attempt", None, maximum=MAX_ATTEMPT)
        offset = _int_param(request, "offset", 0, maximum=MAX_OFFSET) or 0
        status = await self.executor.status(task_id, replica)
        if status is None or status.container_id is None:
            return json_error(404, "unknown_task", f"task {task_id} replica {replica} has no container on this node")
        if attempt is not None and status.attempt is not None and status.attempt != attempt:
            return json_error(404, "unknown_task", f"task {task_id} replica {replica} has no container of attempt {attempt} on this node")
        # Headers go out at once, so a follower of a quiet task is not left waiting for them.
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", OFFSET_HEADER: str(offset)})
        await response.prepare(request)
        extra: dict[str, Any] = {}
        if attempt is not None:
            extra["attempt"] = attempt
        if offset:
            extra["skip"] = offset
        lines = self.executor.logs(task_id, replica=replica, follow=follow, tail=tail, **extra)
        async with contextlib.aclosing(lines):
            try:
                async for line in lines:
                    await response.write(_line(line))
            except TaskNotFound:
                pass  # removed (or replaced by another attempt's) between the check and the read: the stream just ends
        await response.write_eof()
        return response

    @api(response=DataManifest, query={"replica": Param(int, "the replica (default 0)", ge=0, le=255)}, errors=(400, 404, 401, 403, 503))
    async def manifest(self, request: web.Request) -> web.Response:
        """The files of a task's persistent /data: {task_id, replica, final, files: [{path, size, sha256}]}.

        final is true once the replica's container has finished (or is gone). Unchanged files
        are not re-hashed. 404 when the node knows nothing of the task.
        """
        task_id = _task_id(request)
        replica = _int_param(request, "replica", 0, maximum=255) or 0
        status = await self.executor.status(task_id, replica)
        data_dir = self.executor.task_data_dir(task_id, replica)
        if status is None and not data_dir.is_dir():
            return json_error(404, "unknown_task", f"task {task_id} replica {replica} is not on this node")
        entries = await asyncio.to_thread(storage.manifest, data_dir)
        final = status is None or status.state not in (ReplicaState.RUNNING, ReplicaState.PULLING)
        return web.json_response({
            "task_id": task_id,
            "replica": replica,
            "final": final,
            "files": [entry.to_dict() for entry in entries],
        })

    @api(response=Binary(), query={"replica": Param(int, "the replica (default 0)", ge=0, le=255)}, errors=(400, 404, 401, 403, 503))
    async def blob(self, request: web.Request) -> web.StreamResponse:
        """The bytes of the file with this sha256 in the replica's /data (only that replica's files)."""
        task_id = _task_id(request)
        replica = _int_param(request, "replica", 0, maximum=255) or 0
        data_dir = self.executor.task_data_dir(task_id, replica)
        try:
            handle, size = await asyncio.to_thread(storage.open_blob, data_dir, request.match_info["sha256"])
        except storage.UnsafePath as exc:
            return json_error(400, "invalid_blob_id", str(exc))
        except storage.BlobNotFound as exc:
            return json_error(404, "unknown_blob", str(exc))
        except OSError:
            return json_error(404, "unknown_blob", f"task {task_id} has no data on this node")
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        try:
            await response.prepare(request)
            remaining = size
            while remaining > 0:
                chunk = await asyncio.to_thread(handle.read, min(CHUNK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                await response.write(chunk)
        finally:
            handle.close()
        await response.write_eof()
        return response


def _line(line: Any) -> bytes:
    return (json.dumps({"stream": line.stream, "line": line.text, "ts": line.timestamp}) + "\n").encode()


def add_task_routes(app: web.Application, api: TasksApi, is_master: Check) -> None:
    """Mount the master → miner routes, each guarded by ``is_master`` (403 otherwise)."""
    guard = require(is_master)
    app.router.add_post("/tasks", guard(api.start_task))
    app.router.add_get("/tasks", guard(api.list_tasks))
    app.router.add_delete("/tasks/{id}", guard(api.stop_task))
    app.router.add_get("/tasks/{id}/logs", guard(api.logs))
    app.router.add_get("/tasks/{id}/manifest", guard(api.manifest))
    app.router.add_get("/tasks/{id}/blobs/{sha256}", guard(api.blob))
