"""A fake master for the buyer's group-task commands: the master's bare signed app (``new_app``:
real signatures, signed answers, /health) with canned owner routes, served on 127.0.0.1.

The real master does not serve groups yet (another engineer wires it), so these routes answer
with TaskViews built from the protocol's own types (``Task.to_json``, checked against
``TaskView``) and record what the CLI sent: POST /tasks bodies and the logs' query parameters.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from prime.protocol.groups import GroupPhase, GroupRequest, GroupView, MemberView
from prime.protocol.tasks import Replica, ReplicaState, Task, TaskSpec, TaskView
from tests.support.signing import signed_service
from tests.web.roles import MASTER

GROUP_TASK_ID = "grp0123abcd"
NODE_A = "0x" + "a1" * 20
NODE_B = "0x" + "b2" * 20


def group_task_json(now: float | None = None) -> dict[str, Any]:
    """A group task of 2 to 3 nodes in its second attempt (one restart): ranks 0 and 1 running on
    two nodes, the third replica unused (the group shrank to 2)."""
    now = time.time() if now is None else now
    spec = TaskSpec(
        image="registry.example/train:1", command=("torchrun", "train.py"), gpus=8, persistent=True,
        group=GroupRequest(nodes=2, max_nodes=3, same_gpu_model=True, start_timeout_s=600.0, max_restarts=5),
    )
    task = Task.new(spec, now - 120, task_id=GROUP_TASK_ID)
    task.replicas = [
        Replica(GROUP_TASK_ID, 0, node=NODE_A, state=ReplicaState.RUNNING, gpu_indices=tuple(range(8)), attempt=1, started_at=now - 30),
        Replica(GROUP_TASK_ID, 1, node=NODE_B, state=ReplicaState.PULLING, gpu_indices=tuple(range(8)), attempt=1),
        Replica(GROUP_TASK_ID, 2, state=ReplicaState.PENDING),
    ]
    task.group = GroupView(
        phase=GroupPhase.STARTING, attempt=1, restarts=1, reason="rank 2 exited with code 1; restarting with 2 nodes",
        members=(MemberView(0, NODE_A, "10.0.0.1", 29500, 29501), MemberView(1, NODE_B, "10.0.0.2", 30100, 30101)),
    )
    data = task.to_json()
    TaskView.from_json(data)  # what a master serves: the buyer reads exactly this shape
    return data


@dataclass
class FakeMaster:
    server: TestServer
    tasks: dict[str, dict[str, Any]]
    created: list[Any] = field(default_factory=list)  # POST /tasks bodies, parsed
    log_queries: list[dict[str, str]] = field(default_factory=list)
    log_lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def close(self) -> None:
        await self.server.close()


async def start_fake_master() -> FakeMaster:
    from prime.roles.master.app import new_app

    app = new_app(signed_service(MASTER))
    fake = FakeMaster(server=TestServer(app, host="127.0.0.1"), tasks={GROUP_TASK_ID: group_task_json()})

    async def create(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        fake.created.append(body)
        task = Task.new(TaskSpec.from_json(body), time.time())
        fake.tasks[task.id] = task.to_json()
        return web.json_response(task.to_json(), status=201)

    async def listed(request: web.Request) -> web.Response:
        return web.json_response({"tasks": list(fake.tasks.values())})

    async def one(request: web.Request) -> web.Response:
        task_id = request.match_info["task_id"]
        if task_id not in fake.tasks:
            return web.json_response({"error": "not_found", "detail": f"no task {task_id}"}, status=404)
        return web.json_response(fake.tasks[task_id])

    async def nodes(request: web.Request) -> web.Response:
        return web.json_response({"nodes": []})

    async def logs(request: web.Request) -> web.StreamResponse:
        fake.log_queries.append(dict(request.query))
        replica = request.query.get("replica")
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for line in fake.log_lines:
            if replica is None or str(line.get("replica")) == replica:
                await response.write(json.dumps(line).encode() + b"\n")
        await response.write_eof()
        return response

    app.router.add_post("/tasks", create)
    app.router.add_get("/tasks", listed)
    app.router.add_get("/tasks/{task_id}", one)
    app.router.add_get("/tasks/{task_id}/logs", logs)
    app.router.add_get("/nodes", nodes)
    await fake.server.start_server()
    return fake
