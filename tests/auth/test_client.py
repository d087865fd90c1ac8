"""SignedClient against a real server that verifies every signature."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web
from eth_account import Account

from prime.auth.middleware import signed_request_middleware
from prime.errors import PeerError
from prime.web import json_error, make_app
from tests.support.signing import DOMAIN, peer_client

BLOB = bytes(range(256)) * 8192  # 2 MiB

PEER = Account.create()  # the service every test talks to


def build_app() -> tuple[web.Application, dict[str, int]]:
    hits = {"flaky": 0, "bad": 0, "down": 0}
    app = make_app(name="peer", middlewares=[signed_request_middleware(PEER, DOMAIN)])

    async def whoami(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"signer": request["signer"], "query": dict(request.query), "body": body.decode() or None})

    async def flaky(request: web.Request) -> web.Response:
        hits["flaky"] += 1
        if hits["flaky"] <= 2:
            return json_error(503, "warming_up", "try again")
        return web.json_response({"attempt": hits["flaky"], "json": await request.json()})

    async def bad(request: web.Request) -> web.Response:
        hits["bad"] += 1
        return json_error(400, "invalid_body", "gpus: must be an integer")

    async def down(request: web.Request) -> web.Response:
        hits["down"] += 1
        return json_error(503, "unavailable", "still down")

    async def blob(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for i in range(0, len(BLOB), 65536):
            await response.write(BLOB[i : i + 65536])
        await response.write_eof()
        return response

    async def not_json(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app.router.add_route("*", "/whoami/{tail:.*}", whoami)
    app.router.add_post("/flaky", flaky)
    app.router.add_post("/bad", bad)
    app.router.add_get("/down", down)
    app.router.add_get("/blob", blob)
    app.router.add_get("/text", not_json)
    async def hostile(request: web.Request) -> web.Response:
        deep = b"[" * 30_000 + b"]" * 30_000
        bodies = {
            "deep-error": (400, b'{"error": "x", "detail": ' + deep + b"}"),
            "deep-answer": (200, deep),
            "surrogate-error": (400, b'{"error": "x", "detail": "\\ud800 lone"}'),
            "nan-answer": (200, b'{"value": NaN}'),
        }
        status, body = bodies[request.match_info["kind"]]
        return web.Response(status=status, body=body, content_type="application/json")

    app.router.add_delete("/empty", empty)
    app.router.add_get("/hostile/{kind}", hostile)
    return app, hits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_signed_json_request_with_params(serve, alice) -> None:
    app, _ = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address) as client:
        answer = await client.request(
            "POST", server.make_url("/whoami/a b"), json={"x": [1, 2]}, params={"follow": True, "q": "a+b ü/&"}
        )
    assert answer == {"signer": alice.address, "query": {"follow": "true", "q": "a+b ü/&"}, "body": '{"x":[1,2]}'}


async def test_url_given_as_text_with_query(serve, alice) -> None:
    app, _ = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address) as client:
        answer = await client.request("GET", str(server.make_url("/whoami/x")) + "?tail=10&a=%2F")
    assert answer["query"] == {"tail": "10", "a": "/"}


async def test_retries_503_then_succeeds_with_fresh_signatures(serve, alice) -> None:
    app, hits = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address, retries=3, backoff_s=0.01) as client:
        answer = await client.request("POST", server.make_url("/flaky"), json={"n": 1})
    # The third attempt got through: each retry was re-signed (a reused nonce would be a 401).
    assert answer == {"attempt": 3, "json": {"n": 1}}
    assert hits["flaky"] == 3


async def test_no_retry_on_400_and_peer_error_carries_the_json(serve, alice) -> None:
    app, hits = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address, retries=3, backoff_s=0.01) as client:
        with pytest.raises(PeerError) as caught:
            await client.request("POST", server.make_url("/bad"), json={})
    assert hits["bad"] == 1
    assert caught.value.status == 400
    assert caught.value.body == {"error": "invalid_body", "detail": "gpus: must be an integer"}
    assert "gpus: must be an integer" in caught.value.message


async def test_gives_up_after_retries_on_persistent_5xx(serve, alice) -> None:
    app, hits = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address, retries=2, backoff_s=0.01) as client:
        with pytest.raises(PeerError) as caught:
            await client.request("GET", server.make_url("/down"))
    assert hits["down"] == 3
    assert caught.value.status == 503 and caught.value.body["error"] == "unavailable"


async def test_401_from_a_verifying_peer_is_reported(serve, alice) -> None:
    app, _ = build_app()
    server = await serve(app)

    class Impostor:
        """Signs with alice's key but claims another address."""

        address = "0x" + "11" * 20

        def sign_message(self, message):  # type: ignore[no-untyped-def]
            return alice.sign_message(message)

    async with peer_client(Impostor(), to=PEER.address, backoff_s=0.01) as client:
        with pytest.raises(PeerError) as caught:
            await client.request("GET", server.make_url("/whoami/x"))
    assert caught.value.status == 401


async def test_unreachable_peer_is_one_sentence_after_retries(alice) -> None:
    port = free_port()
    async with peer_client(alice, to=PEER.address, retries=2, backoff_s=0.01, timeout_s=2) as client:
        with pytest.raises(PeerError) as caught:
            await client.request("GET", f"http://127.0.0.1:{port}/x")
    assert caught.value.status is None
    assert f"127.0.0.1:{port}" in caught.value.message and "after 3 attempts" in caught.value.message


async def test_non_json_answer_and_empty_answer(serve, alice) -> None:
    app, _ = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address) as client:
        with pytest.raises(PeerError, match="not JSON"):
            await client.request("GET", server.make_url("/text"))
        assert await client.request("DELETE", server.make_url("/empty")) is None


async def test_invalid_url_is_a_peer_error(alice) -> None:
    async with peer_client(alice, to=PEER.address) as client:
        with pytest.raises(PeerError, match="invalid"):
            await client.request("GET", "not-a-url")


async def test_stream_reads_a_large_body(serve, alice) -> None:
    app, _ = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address) as client:
        async with client.stream("GET", server.make_url("/blob")) as response:
            received = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                received += chunk
    assert bytes(received) == BLOB


async def test_stream_raises_on_error_status(serve, alice) -> None:
    app, hits = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address, retries=1, backoff_s=0.01) as client:
        with pytest.raises(PeerError) as caught:
            async with client.stream("GET", server.make_url("/down")):
                pytest.fail("an error answer must not be yielded")
    assert caught.value.status == 503 and hits["down"] == 2


async def test_hostile_answers_are_one_peer_error_each(serve, alice) -> None:
    """A peer's answer nested 30,000 deep, NaN, or an error with a lone surrogate: a PeerError whose
    message can be printed, never a RecursionError or a crash of the caller."""
    app, _ = build_app()
    server = await serve(app)
    async with peer_client(alice, to=PEER.address, retries=0) as client:
        for kind in ("deep-error", "deep-answer", "surrogate-error", "nan-answer"):
            with pytest.raises(PeerError) as failed:
                await client.request("GET", server.make_url(f"/hostile/{kind}"))
            str(failed.value).encode("utf-8")  # printable as it is (no lone surrogate in it)
        # and the client still works afterwards
        assert (await client.request("GET", server.make_url("/whoami/x")))["signer"] == alice.address
