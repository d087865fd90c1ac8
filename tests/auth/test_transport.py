"""SignedClient over its two transports, and the bound on every reply it reads.

The same signed request through ``AiohttpTransport`` (a real socket to a server) and through
``InProcessTransport`` (the app's real routes, no server of the test's own) reaches the route
with a signature the real middleware verified; replies longer than ``max_response_bytes`` are
a PeerError naming the peer, refused before the body is read into memory.
"""

from __future__ import annotations

import tracemalloc

import pytest
from aiohttp import web
from eth_account import Account

from prime.auth.client import DEFAULT_MAX_RESPONSE_BYTES, SignedClient
from prime.auth.middleware import signed_request_middleware
from prime.auth.transport import AiohttpTransport, InProcessTransport, Transport
from prime.errors import PeerError
from prime.web import json_error, make_app
from tests.support.signing import DOMAIN, peer_client

TEN_MIB = 10 * 1024 * 1024
CHUNK = b"x" * 65536

PEER = Account.create()  # the service every test talks to


def peer_app() -> web.Application:
    app = make_app(name="peer", middlewares=[signed_request_middleware(PEER, DOMAIN)])

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({
            "signer": request["signer"], "raw_path": request.raw_path, "query": dict(request.query),
            "body": (await request.read()).decode() or None,
        })

    async def refuse(request: web.Request) -> web.Response:
        return json_error(400, "invalid_body", "gpus: must be an integer")

    async def huge(request: web.Request) -> web.StreamResponse:
        """10 MiB, written 64 KiB at a time (so the server holds none of it): with a
        Content-Length, or chunked when ``?chunked=1``."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if request.query.get("chunked") != "1":
            response.content_length = TEN_MIB
        await response.prepare(request)
        try:
            for _ in range(TEN_MIB // len(CHUNK)):
                await response.write(CHUNK)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client gave up reading, as it should
        return response

    async def lines(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for i in range(3):
            await response.write(b'{"line": %d}\n' % i)
        await response.write_eof()
        return response

    app.router.add_route("*", "/whoami/{tail:.*}", whoami)
    app.router.add_post("/refuse", refuse)
    app.router.add_get("/huge", huge)
    app.router.add_get("/lines", lines)
    return app


async def test_the_same_request_through_both_transports_reaches_the_route_signed(serve, alice) -> None:
    server = await serve(peer_app())
    over_socket = await _ask(peer_client(alice, to=PEER.address), str(server.make_url("/whoami/a b")))
    in_process = InProcessTransport(peer_app())
    try:
        assert isinstance(in_process, Transport) and isinstance(AiohttpTransport(), Transport)
        answer = await _ask(peer_client(alice, to=PEER.address, transport=in_process), "http://peer.test/whoami/a b")
    finally:
        await in_process.close()
    # The middleware recovered alice from the signed headers both times, over the same target.
    assert answer == over_socket
    assert answer["signer"] == alice.address
    assert answer["raw_path"] == "/whoami/a%20b?follow=true&q=a%2Bb+%C3%BC/%26"
    assert answer["body"] == '{"x":[1,2]}'


async def _ask(client: SignedClient, url: str) -> dict:
    async with client:
        return await client.request("POST", url, json={"x": [1, 2]}, params={"follow": True, "q": "a+b ü/&"})


async def test_in_process_errors_map_like_real_ones(alice, mallory) -> None:
    apps = {"peer.test": peer_app(), "10.0.0.5:8093": peer_app()}
    transport = InProcessTransport(apps)
    try:
        async with peer_client(alice, to=PEER.address, transport=transport, retries=1, backoff_s=0.01) as client:
            with pytest.raises(PeerError) as refused:
                await client.request("POST", "http://peer.test/refuse", json={})
            assert refused.value.status == 400 and refused.value.body["detail"] == "gpus: must be an integer"
            # picked by host:port; an authority no app serves is like a refused connection
            assert (await client.request("GET", "http://10.0.0.5:8093/whoami/x"))["signer"] == alice.address
            with pytest.raises(PeerError) as absent:
                await client.request("GET", "http://nobody.test:1/x")
            assert absent.value.status is None and "nobody.test:1" in absent.value.message
            assert "after 2 attempts" in absent.value.message
        # closing this client leaves the shared transport open for the next one
        async with peer_client(mallory, to=PEER.address, transport=transport) as other:
            assert (await other.request("GET", "http://peer.test/whoami/y"))["signer"] == mallory.address
    finally:
        await transport.close()


async def test_stream_through_the_in_process_transport(alice) -> None:
    transport = InProcessTransport(peer_app())
    try:
        async with peer_client(alice, to=PEER.address, transport=transport) as client, client.stream("GET", "http://peer.test/lines") as response:
            got = [await response.content.readline() for _ in range(4)]
    finally:
        await transport.close()
    assert got == [b'{"line": 0}\n', b'{"line": 1}\n', b'{"line": 2}\n', b""]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_10_mib_reply_is_a_peer_error_and_is_not_read_into_memory(serve, alice, chunked) -> None:
    server = await serve(peer_app())
    url = server.make_url("/huge")
    limit = 1024 * 1024  # per-call override; the default is a few MiB
    assert TEN_MIB > DEFAULT_MAX_RESPONSE_BYTES > limit
    async with peer_client(alice, to=PEER.address, retries=0) as client:
        tracemalloc.start()
        try:
            with pytest.raises(PeerError) as too_long:
                await client.request("GET", url, params={"chunked": int(chunked)}, max_response_bytes=limit)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert f"127.0.0.1:{server.port}" in too_long.value.message and "more than 1.0 MiB" in too_long.value.message
        assert too_long.value.status == 200
        assert peak < 3 * limit, f"{peak} bytes were allocated to refuse the reply"
        # With the client's own default, too: still refused, never a MemoryError.
        with pytest.raises(PeerError, match="more than 8.0 MiB"):
            await client.request("GET", url, params={"chunked": int(chunked)})
        # And the client still works afterwards.
        assert (await client.request("GET", server.make_url("/whoami/z")))["signer"] == alice.address


async def test_the_client_setting_bounds_every_call(serve, alice) -> None:
    server = await serve(peer_app())
    async with peer_client(alice, to=PEER.address, max_response_bytes=100) as client:
        with pytest.raises(PeerError, match="more than 100 bytes"):
            await client.request("GET", server.make_url("/whoami/" + "a" * 200))
        assert (await client.request("GET", server.make_url("/whoami/a"), max_response_bytes=10_000))["raw_path"] == "/whoami/a"
