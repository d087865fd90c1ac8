"""A small real HTTP server speaking the master's owner API (wave-2 wire), for the buyer CLI tests.

Real signatures: every request goes through prime's own signed-request middleware, and only
the run owner's address passes the permission check (403 otherwise), like the real master.
Task specs are validated with the master's own models, so a 400 carries the real detail.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from prime.auth.middleware import require, signed_request_middleware, signer_of
from prime.chain.types import Specs
from prime.protocol.errors import ValidationError
from prime.protocol.nodes import NodeRecord, NodeState
from prime.protocol.storage import validate_relative_path
from prime.protocol.tasks import ReplicaState, Task, TaskSpec, is_task_id
from prime.web import ApiError, bound_port, json_error, make_app, serve


@dataclass
class FakeMaster:
    owner: str
    tasks: dict[str, Task] = field(default_factory=dict)
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    late_logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sent only when following
    files: dict[str, dict[tuple[int, str], bytes]] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)  # paths served with other bytes than listed
    nodes: list[NodeRecord] = field(default_factory=list)
    max_gpus: int = 8  # like the real master's placement check: more GPUs than any node has is a 400
    signers: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, signer)
    runner: web.AppRunner | None = None
    url: str = ""

    # -- fixtures' helpers

    def add_task(self, spec: dict[str, Any], *, replica_states: list[str] | None = None, node: str | None = None) -> Task:
        task = Task.new(TaskSpec.from_json(spec), time.time() - 30)
        for replica, state in zip(task.replicas, replica_states or [], strict=False):
            replica.state = ReplicaState(state)
            replica.node = node
        self.tasks[task.id] = task
        return task

    def add_file(self, task_id: str, path: str, content: bytes, replica: int = 0) -> None:
        self.files.setdefault(task_id, {})[(replica, path)] = content

    # -- the app

    async def start(self) -> FakeMaster:
        async def is_owner(_request: web.Request, signer: str) -> bool:
            return signer.lower() == self.owner.lower()

        owner_only = require(is_owner)

        @web.middleware
        async def record(request: web.Request, handler):
            response = await handler(request)
            if "signer" in request:
                self.signers.append((request.method, request.path, signer_of(request)))
            return response

        app = make_app(name="fake-master", middlewares=[signed_request_middleware(), record])
        app.router.add_post("/tasks", owner_only(self.create_task))
        app.router.add_get("/tasks", owner_only(self.list_tasks))
        app.router.add_get("/tasks/{id}", owner_only(self.get_task))
        app.router.add_delete("/tasks/{id}", owner_only(self.stop_task))
        app.router.add_get("/tasks/{id}/logs", owner_only(self.task_logs))
        app.router.add_get("/tasks/{id}/files", owner_only(self.task_files))
        app.router.add_get("/tasks/{id}/files/{path:.+}", owner_only(self.file_content))
        app.router.add_get("/nodes", owner_only(self.list_nodes))
        self.runner = await serve(app, host="127.0.0.1", port=0)
        self.url = f"http://127.0.0.1:{bound_port(self.runner)}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _task(self, request: web.Request) -> Task:
        task_id = request.match_info["id"]
        if not is_task_id(task_id):
            raise ApiError(400, "invalid_task_id", task_id)
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiError(404, "unknown_task", f"no task {task_id}")
        return task

    async def create_task(self, request: web.Request) -> web.Response:
        try:
            spec = TaskSpec.from_json(await request.json())
            if isinstance(spec.gpus, int) and spec.gpus > self.max_gpus:
                raise ValidationError("gpus", f"No node has {spec.gpus} GPUs; the largest has {self.max_gpus}.")
        except ValidationError as exc:
            return json_error(400, "invalid_request", exc.detail)
        task = Task.new(spec, time.time())
        self.tasks[task.id] = task
        return web.json_response(task.to_json(), status=201)

    async def list_tasks(self, request: web.Request) -> web.Response:
        return web.json_response({"tasks": [t.to_json() for t in self.tasks.values()]})

    async def get_task(self, request: web.Request) -> web.Response:
        return web.json_response(self._task(request).to_json())

    async def stop_task(self, request: web.Request) -> web.Response:
        task = self._task(request)
        task.stop_requested = True
        for replica in task.replicas:
            if not replica.is_final:
                replica.state = ReplicaState.STOPPED
        return web.json_response(task.to_json())

    async def task_logs(self, request: web.Request) -> web.StreamResponse:
        task = self._task(request)
        follow = request.query.get("follow") in ("1", "true")
        tail = request.query.get("tail")
        entries = list(self.logs.get(task.id, []))
        if tail is not None:
            entries = entries[-int(tail):] if int(tail) else []
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for entry in entries:
            await response.write(json.dumps(entry).encode() + b"\n")
        if follow:
            for entry in self.late_logs.get(task.id, []):
                await asyncio.sleep(0.05)  # a line that arrives while the client is following
                await response.write(json.dumps(entry).encode() + b"\n")
        await response.write_eof()
        return response

    async def task_files(self, request: web.Request) -> web.Response:
        task = self._task(request)
        listing = [
            {"replica": replica, "path": path, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(), "synced_at": time.time() - 5}
            for (replica, path), content in sorted(self.files.get(task.id, {}).items())
        ]
        return web.json_response({"files": listing})

    async def file_content(self, request: web.Request) -> web.Response:
        task = self._task(request)
        try:
            path = validate_relative_path(request.match_info["path"])
        except ValidationError as exc:
            return json_error(400, "invalid_path", exc.detail)
        replica = int(request.query.get("replica", "0"))
        content = self.files.get(task.id, {}).get((replica, path))
        if content is None:
            return json_error(404, "unknown_file", f"{path} (replica {replica}) was not synced")
        if path in self.corrupt:
            content = content[:-1] + bytes([content[-1] ^ 1])
        return web.Response(body=content, content_type="application/octet-stream")

    async def list_nodes(self, request: web.Request) -> web.Response:
        return web.json_response({"nodes": [n.to_json() for n in self.nodes]})


def sample_node(address: str, *, state: NodeState = NodeState.HEALTHY) -> NodeRecord:
    now = time.time()
    return NodeRecord(
        address=address,
        state=state,
        hardware=Specs(2, "NVIDIA H100 80GB HBM3", 81_559, 32, 262_144, 2_000),
        url="http://127.0.0.1:9999",
        last_heartbeat=now - 3,
        member_since=now - 100,
    )


