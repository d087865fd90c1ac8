"""The master's HTTP API.

- ``POST /heartbeat``: a node of the run (signed by the node key; 403 for anyone else).
- Buyer API, signed by the run's owner on chain (403 for anyone else):
  ``POST /tasks``, ``GET /tasks``, ``GET /tasks/{id}``, ``DELETE /tasks/{id}``,
  ``GET /tasks/{id}/logs?follow=0|1&tail=N&replica=R&attempt=A`` (NDJSON, from the master's log store), ``GET /tasks/{id}/files``,
  ``GET /tasks/{id}/files/{path}?replica=R`` (raw bytes).
- ``GET /nodes``: the run's owner or a master of the run.
- ``GET /tasks/{id}/seed?replica=R``, ``GET /tasks/{id}/seed/{sha256}?replica=R``: the node a
  replica is assigned to reads the synced copy of its /data (seed_api.py).
Every request is signed (401 otherwise); bad input is a 400 JSON naming the field.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import overload

from aiohttp import web

from prime.auth.middleware import SIGNER, SignedService, any_of, require
from prime.auth.permissions import ChainPermissions
from prime.errors import ChainError
from prime.protocol.answers import SyncedFiles, TaskLogLine
from prime.protocol.codec import encode
from prime.protocol.errors import InvalidJson, ValidationError
from prime.protocol.heartbeat import HeartbeatRequest, HeartbeatResponse
from prime.protocol.nodes import NodeList
from prime.protocol.storage import validate_relative_path
from prime.protocol.tasks import Task, TaskList, TaskSpec, TaskView, is_task_id
from prime.roles.master.cas import BlobStore
from prime.roles.master.logs import TaskLogs
from prime.roles.master.seed_api import add_seed_routes
from prime.roles.master.service import HeartbeatDenied, MasterService
from prime.web import FLAG, NDJSON, ApiError, Binary, Param, api, json_error, make_app
from prime.web.openapi import ascii_int

log = logging.getLogger(__name__)

# Task specs may carry 64 KiB of command and 64 KiB of env; heartbeats list up to 4096 replicas.
CLIENT_MAX_SIZE = 1024 * 1024
MAX_TAIL = 100_000

SERVICE = web.AppKey("prime.master.service", MasterService)
LOGS = web.AppKey("prime.master.logs", TaskLogs)
BLOBS = web.AppKey("prime.master.blobs", BlobStore)


def new_app(signing: SignedService) -> web.Application:
    """The bare app (signature checks, signed answers, JSON errors, /health, /metrics); ``add_routes`` adds the API."""
    return make_app(name="master", middlewares=[signing.middleware()], client_max_size=CLIENT_MAX_SIZE, identity=signing.identity())


def add_routes(
    app: web.Application, service: MasterService, permissions: ChainPermissions, *, logs: TaskLogs, blobs: BlobStore
) -> web.Application:
    run_id = service.run_id

    async def run_owner(request: web.Request, signer: str) -> bool:
        return await permissions.is_run_owner(run_id, signer)

    async def run_master(request: web.Request, signer: str) -> bool:
        return await permissions.is_master(run_id, signer)

    owner_only = require(run_owner)
    app[SERVICE] = service
    app[LOGS] = logs
    app[BLOBS] = blobs
    app.router.add_post("/heartbeat", heartbeat)
    app.router.add_post("/tasks", owner_only(create_task))
    app.router.add_get("/tasks", owner_only(list_tasks))
    app.router.add_get("/tasks/{task_id}", owner_only(get_task))
    app.router.add_delete("/tasks/{task_id}", owner_only(stop_task))
    app.router.add_get("/tasks/{task_id}/logs", owner_only(task_logs))
    app.router.add_get("/tasks/{task_id}/files", owner_only(list_files))
    app.router.add_get("/tasks/{task_id}/files/{path:.+}", owner_only(get_file))
    app.router.add_get("/nodes", require(any_of(run_owner, run_master))(list_nodes))
    add_seed_routes(app, service, blobs)  # node → master: a new attempt's /data (seed_api.py)
    return app


# --- helpers --------------------------------------------------------------------------------------


def _service(request: web.Request) -> MasterService:
    return request.app[SERVICE]


def _invalid(err: ValidationError) -> web.Response:
    if isinstance(err, InvalidJson):
        return json_error(400, "invalid_json", err.detail)
    return json_error(400, "invalid_request", err.detail)


def _task_or_raise(request: web.Request) -> Task:
    task_id = request.match_info["task_id"]
    if not is_task_id(task_id):
        raise ApiError(400, "invalid_task_id", {"field": "task_id", "message": "Must be 1-64 letters, digits, '-' or '_'."})
    task = _service(request).task(task_id)
    if task is None:
        raise ApiError(404, "task_not_found", f"There is no task {task_id} in run {_service(request).run_id}.")
    return task


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "0").lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise ApiError(400, "invalid_request", {"field": name, "message": "Must be 0 or 1."})


@overload
def _int_query(request: web.Request, name: str, *, default: int, maximum: int) -> int: ...
@overload
def _int_query(request: web.Request, name: str, *, default: None, maximum: int) -> int | None: ...
def _int_query(request: web.Request, name: str, *, default: int | None, maximum: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = ascii_int(raw, maximum=maximum)  # ASCII digits only: "²" and "١٢" are isdigit() too
    if value is None:
        raise ApiError(400, "invalid_request", {"field": name, "message": f"Must be a whole number from 0 to {maximum}."})
    return value


# --- nodes ----------------------------------------------------------------------------------------


@api(request=HeartbeatRequest, response=HeartbeatResponse, errors=(401, 403, 503))
async def heartbeat(request: web.Request) -> web.Response:
    """A node reports its replicas, GPUs and load; the answer lists what it should run.

    Signed by the node key. Body: HeartbeatRequest {tasks: [{id, replica, state, exit_code, error}],
    gpus: [{index, util, mem_used_mib, temp_c}], load: {name: number}}. Answer: {interval_s, desired:
    [{id, replica, attempt, gpu_indices, spec}]}. 403 for a node that is not a member of this run.
    """
    service = _service(request)
    node = request[SIGNER]
    try:
        # Decoded straight from the bytes the signature check already read (no dict in between).
        payload = HeartbeatRequest.from_json(await request.read())
    except ValidationError as err:
        service.metrics.heartbeats.labels("invalid").inc()
        return _invalid(err)
    try:
        answer = await service.heartbeat(node, payload)
    except HeartbeatDenied as exc:
        service.metrics.heartbeats.labels("refused").inc()
        return json_error(403, "not_a_member", exc.message)
    except ChainError as exc:
        return json_error(503, "chain_unavailable", f"could not check membership on chain: {exc}")
    service.metrics.heartbeat_accepted.inc()
    return web.Response(body=encode(answer), content_type="application/json")


@api(response=NodeList, errors=(401, 403, 503))
async def list_nodes(request: web.Request) -> web.Response:
    """Every node the master knows, with its state, hardware and last heartbeat (owner or master)."""
    state = _service(request).state
    return web.json_response({"nodes": [state.nodes[a].to_json() for a in sorted(state.nodes)]})


# --- tasks ----------------------------------------------------------------------------------------


@api(request=TaskSpec, response=TaskView, status=201, errors=(409, 401, 403, 503))
async def create_task(request: web.Request) -> web.Response:
    """Create a task: {image, command|cmd, env, gpus (count or "all"), replicas, persistent, cpu_limit,
    memory_limit_mib, restart}. 201 with the task; 400 naming the bad field; 409 once the run ended."""
    service = _service(request)
    try:
        spec = TaskSpec.from_json(await request.read())  # typed decoding from the signed bytes
    except ValidationError as err:
        return _invalid(err)
    task = Task.new(spec, service.clock())
    refused = service.create_task(task)  # admission is the core's decision
    if refused is not None:
        return json_error(refused.status, refused.error, refused.detail)
    return web.json_response(task.to_json(), status=201)


@api(response=TaskList, errors=(401, 403, 503))
async def list_tasks(request: web.Request) -> web.Response:
    """Every task of the run, oldest first, with its replicas."""
    tasks = sorted(_service(request).state.tasks.values(), key=lambda t: (t.created_at, t.id))
    return web.json_response({"tasks": [t.to_json() for t in tasks]})


@api(response=TaskView, errors=(400, 404, 401, 403, 503))
async def get_task(request: web.Request) -> web.Response:
    """One task with its replicas (where each runs, its state and exit code)."""
    return web.json_response(_task_or_raise(request).to_json())


@api(response=TaskView, errors=(400, 404, 401, 403, 503))
async def stop_task(request: web.Request) -> web.Response:
    """Stop a task: its replicas are stopped on their nodes (and no longer desired there)."""
    task = _task_or_raise(request)
    _service(request).stop_task(task.id)
    return web.json_response(task.to_json())


MAX_ATTEMPT = 2**31
LOG_QUERY = {
    "follow": FLAG,
    "tail": Param(int, "the last N lines", ge=0, le=MAX_TAIL),
    "replica": Param(int, "only this replica", ge=0, le=10_000),
    "attempt": Param(int, "only this attempt (0 is the first placement)", ge=0, le=MAX_ATTEMPT),
}


@api(response=NDJSON(TaskLogLine), query=LOG_QUERY, errors=(400, 404, 401, 403, 503))
async def task_logs(request: web.Request) -> web.StreamResponse:
    """The task's logs, kept by the master for every attempt of every replica, as NDJSON lines
    {replica, attempt, node, stream, line, ts, seq}: readable after the node is gone.

    ``follow=1`` keeps streaming new lines until every replica finished (or the client leaves);
    ``tail=N`` starts with the last N lines; ``replica=R`` and ``attempt=A`` select lines.
    """
    task = _task_or_raise(request)
    follow = _flag(request, "follow")
    tail = _int_query(request, "tail", default=None, maximum=MAX_TAIL)
    replica = _int_query(request, "replica", default=None, maximum=10_000)
    attempt = _int_query(request, "attempt", default=None, maximum=MAX_ATTEMPT)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    source = request.app[LOGS]
    try:
        async with contextlib.aclosing(source.lines(task.id, follow=follow, tail=tail, replica=replica, attempt=attempt)) as lines:
            async for item in lines:
                if request.transport is None or request.transport.is_closing():
                    return response  # the client went away
                if item is not None:
                    await response.write(json.dumps(item, separators=(",", ":")).encode() + b"\n")
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away while we wrote
    return response


# --- files ----------------------------------------------------------------------------------------


@api(response=SyncedFiles, errors=(400, 404, 401, 403, 503))
async def list_files(request: web.Request) -> web.Response:
    """The task's synced persistent files: {files: [{replica, path, size, sha256, synced_at}]}."""
    task = _task_or_raise(request)
    files = _service(request).store.manifest(task.id)
    return web.json_response({"files": [
        {"replica": f.replica, "path": f.path, "size": f.size, "sha256": f.sha256, "synced_at": f.synced_at}
        for f in files
    ]})


@api(response=Binary(), query={"replica": Param(int, "the replica (default 0)", ge=0, le=10_000)}, errors=(400, 404, 401, 403, 503))
async def get_file(request: web.Request) -> web.StreamResponse:
    """One synced file's bytes (``replica`` defaults to 0). Paths that climb out ('..', absolute) are 400."""
    task = _task_or_raise(request)
    try:
        path = validate_relative_path(request.match_info["path"], "path")
    except ValidationError as err:
        return _invalid(err)
    replica = _int_query(request, "replica", default=0, maximum=10_000)
    synced = _service(request).store.synced_file(task.id, path, replica)
    if synced is None:
        return json_error(404, "file_not_found", f"Task {task.id} replica {replica} has no synced file {path!r}.")
    blob = request.app[BLOBS].path(synced.sha256)
    if not blob.is_file():
        return json_error(404, "file_not_found", f"The content of {path!r} is missing from the master's store.")
    return web.FileResponse(blob, headers={
        "Content-Type": "application/octet-stream",
        "X-Prime-Sha256": synced.sha256,
    })

