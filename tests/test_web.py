"""prime.web: JSON errors, /health with loop liveness, /metrics, /openapi.json, read_json."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Optional

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest

from prime.errors import PrimeError
from prime.web import (
    HEALTH,
    METRICS,
    ApiError,
    LoopHealth,
    ValidationError,
    add_loop,
    bound_port,
    decode,
    json_error,
    make_app,
    read_json,
    serve,
    to_json,
)


@pytest_asyncio.fixture(loop_scope="session")
async def start():
    servers: list[TestServer] = []

    async def run(app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield run
    for server in servers:
        await server.close()


async def fetch(server: TestServer, method: str, path: str, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.make_url(path), **kwargs) as resp:
            text = await resp.text()
            try:
                body: Any = json.loads(text)
            except ValueError:
                body = text
            return resp.status, body, resp


# --- messages used by read_json tests ---------------------------------------------------------


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


# --- the app ---------------------------------------------------------------------------------


def build_app(client_max_size: int = 1024) -> web.Application:
    app = make_app(name="unit", client_max_size=client_max_size)

    async def heartbeat(request: web.Request) -> web.Response:
        """Accept a heartbeat.

        The node reports its tasks and GPUs.
        """
        beat = await read_json(request, Heartbeat)
        return web.json_response(to_json(beat))

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


async def test_read_json_decodes_nested_dataclasses(start) -> None:
    server = await start(build_app())
    status, body, _ = await fetch(server, "POST", "/heartbeat", json=GOOD_BEAT)
    assert status == 200, body
    assert body["tasks"][1] == {"id": "t2", "state": "exited", "exit_code": 3}
    assert body["gpus"][1] == {"util": 1.0, "mem_used": 0}
    assert body["color"] == "red" and body["note"] is None and body["labels"] == {"zone": "a"}


@pytest.mark.parametrize(
    "change, field_name, words",
    [
        ({"load": True}, "load", "a number"),
        ({"load": "1"}, "load", "a number"),
        ({"gpus": [{"util": 0.5, "mem_used": True}]}, "gpus[0].mem_used", "an integer"),
        ({"gpus": [{"util": 0.5, "mem_used": 1.5}]}, "gpus[0].mem_used", "an integer"),
        ({"tasks": [{"id": 5, "state": "running"}]}, "tasks[0].id", "a string"),
        ({"tasks": [{"id": "t", "state": "paused"}]}, "tasks[0].state", "one of"),
        ({"tasks": [{"id": "t", "state": "exited", "exit_code": "0"}]}, "tasks[0].exit_code", "an integer or null"),
        ({"tasks": {"id": "t"}}, "tasks", "a list"),
        ({"labels": ["a"]}, "labels", "an object"),
        ({"labels": {"zone": 1}}, "labels.zone", "a string"),
        ({"note": 3}, "note", "a string or null"),
        ({"verbose": 1}, "verbose", "a boolean"),
        ({"color": "green"}, "color", "one of"),
        ({"gpus": [{"util": 0.5}]}, "gpus[0].mem_used", "required"),
        ({"load": -1}, "body", "negative"),
    ],
)
async def test_read_json_names_the_bad_field(start, change: dict, field_name: str, words: str) -> None:
    server = await start(build_app())
    status, body, _ = await fetch(server, "POST", "/heartbeat", json={**GOOD_BEAT, **change})
    assert status == 400
    assert body["error"] == "invalid_body"
    assert body["detail"].startswith(f"{field_name}:") and words in body["detail"]


async def test_missing_top_level_field(start) -> None:
    server = await start(build_app())
    beat = dict(GOOD_BEAT)
    del beat["load"]
    status, body, _ = await fetch(server, "POST", "/heartbeat", json=beat)
    assert (status, body["detail"]) == (400, "load: is required")


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"load": NaN}', b"\xff\xfe"])
async def test_malformed_bodies_are_400_json(start, raw: bytes) -> None:
    server = await start(build_app())
    status, body, _ = await fetch(server, "POST", "/heartbeat", data=raw, headers={"Content-Type": "application/json"})
    assert status == 400
    assert body["error"] in ("invalid_json", "invalid_body") and body["detail"]


async def test_body_over_the_limit_is_413_json(start) -> None:
    server = await start(build_app(client_max_size=1024))
    status, body, _ = await fetch(server, "POST", "/heartbeat", data=b"{" + b" " * 5000 + b"}")
    assert status == 413 and body["error"] == "request_entity_too_large"


async def test_handler_calling_request_json_on_garbage_is_400(start) -> None:
    server = await start(build_app())
    status, body, _ = await fetch(server, "POST", "/raw", data=b"{oops")
    assert status == 400 and body["error"] == "invalid_json"


async def test_unexpected_exception_is_500_json_and_the_service_stays_up(start, caplog) -> None:
    server = await start(build_app())
    status, body, _ = await fetch(server, "GET", "/boom")
    assert status == 500 and body["error"] == "internal_error"
    assert "kaboom" not in body["detail"]  # internals stay in the log, not the answer
    assert any("kaboom" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    status, _, _ = await fetch(server, "GET", "/health")
    assert status == 200


async def test_not_found_method_not_allowed_and_api_error_are_json(start) -> None:
    server = await start(build_app())
    status, body, _ = await fetch(server, "GET", "/nope")
    assert (status, body["error"]) == (404, "not_found")
    status, body, resp = await fetch(server, "DELETE", "/heartbeat")
    assert (status, body["error"]) == (405, "method_not_allowed")
    assert "POST" in resp.headers["Allow"]
    status, body, _ = await fetch(server, "GET", "/teapot")
    assert (status, body) == (418, {"error": "teapot", "detail": {"why": "short and stout"}})


async def test_json_error_shape() -> None:
    response = json_error(409, "conflict", "task exists")
    assert response.status == 409 and json.loads(response.text) == {"error": "conflict", "detail": "task exists"}


# --- /health ----------------------------------------------------------------------------------


def test_loop_health_goes_stale_and_recovers() -> None:
    now = [0.0]
    health = LoopHealth(clock=lambda: now[0])
    health.register("chain", stale_after_s=10)
    assert health.report()[0]
    now[0] = 11
    ok, loops = health.report()
    assert not ok and not loops["chain"]["ok"]
    health.failed("chain", "RPC down")
    assert health.report()[1]["chain"]["last_error"] == "RPC down"
    health.tick("chain")
    ok, loops = health.report()
    assert ok and loops["chain"]["runs"] == 1 and loops["chain"]["last_error"] is None


async def test_health_is_503_when_a_loop_is_stale(start) -> None:
    app = build_app()
    now = [0.0]
    app[HEALTH].clock = lambda: now[0]
    app[HEALTH].register("heartbeats", stale_after_s=30)
    server = await start(app)
    status, body, _ = await fetch(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["service"] == "unit"
    now[0] = 31
    status, body, _ = await fetch(server, "GET", "/health")
    assert status == 503 and body["status"] == "stale" and body["loops"]["heartbeats"]["ok"] is False


async def test_add_loop_runs_ticks_and_survives_failures(start) -> None:
    app = build_app()
    calls = {"good": 0, "bad": 0}

    async def good() -> None:
        calls["good"] += 1

    async def bad() -> None:
        calls["bad"] += 1
        raise ConnectionError("peer down")

    add_loop(app, "good", good, interval_s=0.01)
    add_loop(app, "bad", bad, interval_s=0.01, stale_after_s=0.05, max_backoff_s=0.02)
    server = await start(app)
    await asyncio.sleep(0.3)
    assert calls["good"] >= 3 and calls["bad"] >= 2  # the failing loop keeps retrying
    status, body, _ = await fetch(server, "GET", "/health")
    assert status == 503
    assert body["loops"]["good"]["ok"] and body["loops"]["good"]["runs"] >= 3
    assert not body["loops"]["bad"]["ok"]
    assert body["loops"]["bad"]["last_error"] == "ConnectionError: peer down"
    assert body["loops"]["bad"]["consecutive_failures"] >= 2


# --- /metrics and /openapi.json -----------------------------------------------------------------


async def test_metrics_count_requests_per_route_and_apps_are_independent(start) -> None:
    first, second = build_app(), build_app()  # two apps in one process must not clash
    server = await start(first)
    await start(second)
    for _ in range(3):
        await fetch(server, "GET", "/tasks/abc")
    await fetch(server, "GET", "/boom")
    status, text, resp = await fetch(server, "GET", "/metrics")
    assert status == 200 and resp.content_type == "text/plain"
    assert 'prime_http_requests_total{method="GET",route="/tasks/{task_id}",status="200"} 3.0' in text
    assert 'route="/boom",status="500"' in text
    second_text = generate_latest(second[METRICS]).decode()
    assert "/tasks/{task_id}" not in second_text


async def test_openapi_lists_routes_with_summaries(start) -> None:
    server = await start(build_app())
    status, doc, _ = await fetch(server, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    op = doc["paths"]["/heartbeat"]["post"]
    assert op["summary"] == "Accept a heartbeat."
    assert op["description"] == "The node reports its tasks and GPUs."
    assert "head" not in doc["paths"]["/tasks/{task_id}"]
    params = doc["paths"]["/tasks/{task_id}/files/{path}"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["task_id", "path"]
    assert doc["paths"]["/health"]["get"]["summary"].startswith("Liveness")


# --- decode without HTTP ------------------------------------------------------------------------


def test_decode_plain_types() -> None:
    assert decode(list[int], [1, 2]) == [1, 2]
    assert decode(tuple[int, str], [1, "a"]) == (1, "a")
    assert decode(dict[str, float], {"a": 1}) == {"a": 1.0}
    assert decode(Optional[Gpu], None) is None
    assert decode(Any, {"x": object}) == {"x": object}
    with pytest.raises(ValidationError) as caught:
        decode(list[int], [1, False])
    assert caught.value.where == "[1]"


# --- serve ---------------------------------------------------------------------------------------


async def test_serve_reports_a_busy_port_in_one_sentence() -> None:
    runner = await serve(build_app(), host="127.0.0.1", port=0)
    try:
        port = bound_port(runner)
        with pytest.raises(PrimeError, match=f"Port {port} on 127.0.0.1 is already in use"):
            await serve(build_app(), host="127.0.0.1", port=port)
    finally:
        await runner.cleanup()
