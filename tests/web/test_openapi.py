"""/openapi.json: every route listed; what @api declares becomes request and response schemas."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal

import msgspec
import pytest
from aiohttp import web

from prime.auth.middleware import require
from prime.web import FLAG, NDJSON, Binary, Param, api, endpoint_of, make_app, openapi_document
from tests.web.openapi_check import check_document, operation, validate_answer
from tests.web.support import build_app, fetch


async def test_openapi_lists_routes_with_summaries(serve) -> None:
    server = await serve(build_app())
    status, doc, _ = await fetch(server, "GET", "/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"
    op = doc["paths"]["/heartbeat"]["post"]
    assert op["summary"] == "Accept a heartbeat."
    assert op["description"] == "The node reports its tasks and GPUs."
    assert "head" not in doc["paths"]["/tasks/{task_id}"]
    params = doc["paths"]["/tasks/{task_id}/files/{path}"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["task_id", "path"]
    assert doc["paths"]["/health"]["get"]["summary"].startswith("Liveness")
    assert "requestBody" not in op  # nobody annotated it: today's output, a default error answer
    assert list(op["responses"]) == ["default"]


# --- what @api declares ---------------------------------------------------------------------------


class Beat(msgspec.Struct):
    node: str
    load: Annotated[float, msgspec.Meta(ge=0)]
    gpus: list[int] = []


class BeatAnswer(msgspec.Struct):
    interval_s: float
    desired: list[str]


class Shade(Enum):
    DARK = "dark"
    LIGHT = "light"


@dataclass
class Paint:  # a dataclass works as well as a Struct (the protocol may still hold some)
    shade: Shade
    litres: int = 1


class Line(msgspec.Struct):
    stream: Literal["stdout", "stderr"]
    line: str


@api(request=Beat, response=BeatAnswer, errors=(401, 403))
async def beat(request: web.Request) -> web.Response:
    """Take a heartbeat."""
    body = msgspec.json.decode(await request.read(), type=Beat)
    return web.json_response({"interval_s": 5.0, "desired": [body.node]})


@api(request=Paint, response=Paint, status=201, errors=(409,))
async def paint(request: web.Request) -> web.Response:
    """Paint something (a dataclass in and out)."""
    return web.json_response(await request.json(), status=201)


@api(response=NDJSON(Line), query={"follow": FLAG, "tail": Param(int, "last N lines", ge=0)},
     path={"task_id": Param(Annotated[str, msgspec.Meta(pattern="^[a-z0-9]{1,8}$")], "the task")}, errors=(404,))
async def logs(request: web.Request) -> web.StreamResponse:
    """A task's log lines."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    await response.write(b'{"stream": "stdout", "line": "hi"}\n{"stream": "stderr", "line": "ho"}\n')
    await response.write_eof()
    return response


@api(response=BeatAnswer)
async def wrong(request: web.Request) -> web.Response:
    """Answers something else than it declares."""
    return web.json_response({"interval_s": "soon"})


class Files:
    @api(response=Binary(), errors=(404,))
    async def blob(self, request: web.Request) -> web.Response:
        """One file's bytes."""
        return web.Response(body=b"\x00\x01", content_type="application/octet-stream")

    async def listing(self, request: web.Request) -> web.Response:
        """Every file."""
        return web.json_response({"interval_s": 1, "desired": []})


async def everyone(request: web.Request, signer: str) -> bool:
    return True


def described_app() -> web.Application:
    app = make_app(name="described")
    files = Files()
    app.router.add_post("/beat", require(everyone)(beat))  # the guard (functools.wraps) carries the declaration
    app.router.add_post("/paint", paint)
    app.router.add_get("/tasks/{task_id}/logs", logs)
    app.router.add_get("/wrong", wrong)
    app.router.add_get("/blob", require(everyone)(files.blob))  # declared on the method
    app.router.add_get("/files", api(response=BeatAnswer)(files.listing))  # a bound method, declared when mounted
    return app


async def test_declared_routes_carry_request_and_response_schemas(serve) -> None:
    server = await serve(described_app())
    status, doc, _ = await fetch(server, "GET", "/openapi.json")
    assert status == 200
    check_document(doc)
    schemas = doc["components"]["schemas"]
    assert {"Beat", "BeatAnswer", "Paint", "Shade", "Line", "ErrorBody", "HealthAnswer", "LoopReport"} <= set(schemas)
    assert schemas["ErrorBody"]["required"] == ["error"] and set(schemas["ErrorBody"]["properties"]) == {"error", "detail"}
    assert schemas["Beat"]["properties"]["load"] == {"type": "number", "minimum": 0}

    op = operation(doc, "POST", "/beat")
    assert op["summary"] == "Take a heartbeat."
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Beat"}
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/BeatAnswer"}
    assert set(op["responses"]) == {"200", "400", "401", "403", "413", "500"}
    for code in ("400", "401", "403", "413", "500"):
        assert op["responses"][code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert op["security"] == [{"primeSignature": []}]

    op = operation(doc, "POST", "/paint")
    assert set(op["responses"]) == {"201", "400", "409", "413", "500"} and "security" not in op
    assert schemas["Paint"]["properties"]["shade"] == {"$ref": "#/components/schemas/Shade"}

    op = operation(doc, "GET", "/tasks/{task_id}/logs")
    assert "requestBody" not in op
    params = {p["name"]: p for p in op["parameters"]}
    assert params["task_id"]["in"] == "path" and params["task_id"]["schema"]["pattern"] == "^[a-z0-9]{1,8}$"
    assert params["follow"] == {"name": "follow", "in": "query", "required": False, "schema": {"type": "boolean"},
                                "description": FLAG.description}
    assert params["tail"]["schema"] == {"type": "integer", "minimum": 0}
    assert op["responses"]["200"]["content"]["application/x-ndjson"]["schema"] == {"$ref": "#/components/schemas/Line"}

    blob = operation(doc, "GET", "/blob")
    assert blob["summary"] == "One file's bytes."
    assert blob["responses"]["200"]["content"] == {"application/octet-stream": {
        "schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}
    listing = operation(doc, "GET", "/files")
    assert listing["summary"] == "Every file." and listing["operationId"] == "listing"


async def test_the_shared_routes_are_documented(serve) -> None:
    server = await serve(described_app())
    _, doc, _ = await fetch(server, "GET", "/openapi.json")
    health = operation(doc, "GET", "/health")
    for code in ("200", "503"):
        assert health["responses"][code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/HealthAnswer"}
    assert list(operation(doc, "GET", "/metrics")["responses"]["200"]["content"]) == ["text/plain"]
    assert operation(doc, "GET", "/openapi.json")["responses"]["200"]["content"]["application/json"]["schema"]["type"] == "object"
    status, body, _ = await fetch(server, "GET", "/health")
    validate_answer(doc, "GET", "/health", status, body)


async def test_real_answers_are_checked_against_their_schemas(serve) -> None:
    server = await serve(described_app())
    _, doc, _ = await fetch(server, "GET", "/openapi.json")
    status, body, _ = await fetch(server, "POST", "/paint", json={"shade": "dark", "litres": 2})
    validate_answer(doc, "POST", "/paint", status, body)
    status, text, _ = await fetch(server, "GET", "/tasks/abc/logs")
    validate_answer(doc, "GET", "/tasks/{task_id}/logs", status, [json.loads(line) for line in text.splitlines()],
                    media="application/x-ndjson")
    status, body, _ = await fetch(server, "POST", "/beat", json={"node": "n1", "load": 0.5})
    validate_answer(doc, "POST", "/beat", status, body)  # 401: unsigned, the error shape
    assert status == 401
    status, body, _ = await fetch(server, "GET", "/wrong")
    with pytest.raises(AssertionError, match="interval_s"):
        validate_answer(doc, "GET", "/wrong", status, body)
    with pytest.raises(AssertionError, match="does not declare status 418"):
        validate_answer(doc, "GET", "/wrong", 418, body)


def test_a_type_msgspec_cannot_describe_leaves_that_schema_empty_and_the_rest_intact() -> None:
    class NotJson:
        pass

    async def odd(request: web.Request) -> web.Response:
        """Declares a type with no JSON schema."""
        return web.json_response({})

    app = described_app()
    app.router.add_get("/odd", api(response=NotJson)(odd))
    doc = openapi_document(app)
    assert operation(doc, "GET", "/odd")["responses"]["200"]["content"]["application/json"]["schema"] == {}
    assert "Beat" in doc["components"]["schemas"]


def test_endpoint_of_looks_through_wrappers() -> None:
    guarded = require(everyone)(require(everyone)(beat))
    found = endpoint_of(guarded)
    assert found is not None and found.request is Beat and found.success == [200]
    assert endpoint_of(Files().listing) is None
