"""Every failure is JSON {"error", "detail"}; an unexpected exception is a logged 500 and the service stays up."""

from __future__ import annotations

import json

import pytest

from prime.web import json_error
from tests.web.support import build_app, fetch


async def test_handler_calling_request_json_on_garbage_is_400(serve) -> None:
    server = await serve(build_app())
    status, body, _ = await fetch(server, "POST", "/raw", data=b"{oops")
    assert status == 400 and body["error"] == "invalid_json"


async def test_unexpected_exception_is_500_json_and_the_service_stays_up(serve, caplog) -> None:
    server = await serve(build_app())
    status, body, _ = await fetch(server, "GET", "/boom")
    assert status == 500 and body["error"] == "internal_error"
    assert "kaboom" not in body["detail"]  # internals stay in the log, not the answer
    assert any("kaboom" in (r.exc_text or str(r.exc_info)) for r in caplog.records)
    status, _, _ = await fetch(server, "GET", "/health")
    assert status == 200


async def test_not_found_method_not_allowed_and_api_error_are_json(serve) -> None:
    server = await serve(build_app())
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


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"load": NaN}', b"\xff\xfe"])
async def test_malformed_bodies_are_400_json(serve, raw: bytes) -> None:
    server = await serve(build_app())
    status, body, _ = await fetch(server, "POST", "/heartbeat", data=raw, headers={"Content-Type": "application/json"})
    assert status == 400
    assert body["error"] in ("invalid_json", "invalid_body") and body["detail"]


async def test_body_over_the_limit_is_413_json(serve) -> None:
    server = await serve(build_app(client_max_size=1024))
    status, body, _ = await fetch(server, "POST", "/heartbeat", data=b"{" + b" " * 5000 + b"}")
    assert status == 413 and body["error"] == "request_entity_too_large"
