"""A small app over prime.web (messages, routes that fail in every way) and a plain HTTP fetch."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from prime.protocol.codec import decode, encode
from prime.protocol.errors import ValidationError
from prime.web import ApiError, make_app


async def fetch(server: TestServer, method: str, path: str, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.make_url(path), **kwargs) as resp:
            text = await resp.text()
            try:
                body: Any = json.loads(text)
            except ValueError:
                body = text
            return resp.status, body, resp


class Color(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Gpu:
    util: float
    mem_used: int


@dataclass
class Task:
    id: str
    state: Literal["running", "exited"]
    exit_code: int | None = None


@dataclass
class Heartbeat:
    tasks: list[Task]
    gpus: list[Gpu]
    load: float
    labels: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    verbose: bool = False
    color: Color = Color.RED

    def __post_init__(self) -> None:
        if self.load < 0:
            raise ValueError("load must not be negative")


def build_app(client_max_size: int = 1024) -> web.Application:
    app = make_app(name="unit", client_max_size=client_max_size)

    async def heartbeat(request: web.Request) -> web.Response:
        """Accept a heartbeat.

        The node reports its tasks and GPUs.
        """
        try:
            beat = decode(await request.read(), Heartbeat)  # 413 past the app's body limit
        except ValidationError as exc:
            raise ApiError(400, "invalid_body", exc.detail) from None
        return web.Response(body=encode(beat), content_type="application/json")

    async def boom(request: web.Request) -> web.Response:
        """Fail unexpectedly."""
        raise RuntimeError("kaboom")

    async def teapot(request: web.Request) -> web.Response:
        raise ApiError(418, "teapot", {"why": "short and stout"})

    async def raw_json(request: web.Request) -> web.Response:
        return web.json_response(await request.json())

    async def get_task(request: web.Request) -> web.Response:
        """Read one task."""
        return web.json_response({"id": request.match_info["task_id"]})

    app.router.add_post("/heartbeat", heartbeat)
    app.router.add_get("/boom", boom)
    app.router.add_get("/teapot", teapot)
    app.router.add_post("/raw", raw_json)
    app.router.add_get("/tasks/{task_id}", get_task)
    app.router.add_get("/tasks/{task_id}/files/{path:.*}", get_task)
    return app


GOOD_BEAT = {
    "tasks": [{"id": "t1", "state": "running"}, {"id": "t2", "state": "exited", "exit_code": 3}],
    "gpus": [{"util": 0.5, "mem_used": 1024}, {"util": 1, "mem_used": 0}],
    "load": 1.25,
    "labels": {"zone": "a"},
    "unknown_field": "ignored",
}
