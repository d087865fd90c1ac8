"""The signature middleware and @require on a real aiohttp server, with real signatures."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account
from yarl import URL

from prime.auth.middleware import any_of, require, signed_request_middleware
from prime.auth.replay import ReplayCache
from prime.auth.signing import (
    HEADER_ADDRESS,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    AuthError,
    Domain,
    sign_headers,
)
from prime.errors import ChainError
from prime.web import make_app
from tests.support.signing import DOMAIN

SERVER = Account.create()  # the service under test: the audience of every request, the signer of its answers


def build_app(owner_address: str, *, client_max_size: int = 64 * 1024, replay_cache: ReplayCache | None = None) -> web.Application:
    middleware = signed_request_middleware(SERVER, DOMAIN, replay_cache=replay_cache)
    app = make_app(name="test", middlewares=[middleware], client_max_size=client_max_size)

    async def echo(request: web.Request) -> web.Response:
        """Echo the signer, the query and the body."""
        body = await request.read()
        return web.json_response({"signer": request["signer"], "query": dict(request.query), "body": body.decode()})

    async def is_owner(request: web.Request, signer: str) -> bool:
        return signer == owner_address

    async def chain_down(request: web.Request, signer: str) -> bool:
        raise ChainError("the RPC endpoint is unreachable")

    async def never(request: web.Request, signer: str) -> bool:
        return False

    @require(is_owner)
    async def owner_only(request: web.Request) -> web.Response:
        """Only the owner may call this."""
        return web.json_response({"ok": True})

    @require(chain_down)
    async def needs_chain(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @require(any_of(never, is_owner))
    async def either(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/owner", owner_only)
    app.router.add_get("/chain", needs_chain)
    app.router.add_get("/either", either)
    return app


async def send(server, account, method: str, path: str, body: bytes = b"", *, sign_path: str | None = None,
               sign_body: bytes | None = None, headers: dict | None = None, drop: str | None = None,
               timestamp: int | None = None, audience: str | None = None, domain: Domain = DOMAIN):
    """Sign (optionally something other than what is sent), send raw, return (status, json)."""
    url = server.make_url(path)
    signed = sign_headers(account, method, sign_path if sign_path is not None else url.raw_path_qs,
                          body if sign_body is None else sign_body, timestamp=timestamp,
                          audience=audience or SERVER.address, domain=domain)
    signed.update(headers or {})
    if drop:
        del signed[drop]
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=body or None, headers=signed) as resp:
            return resp.status, await resp.json()


async def test_valid_request_sets_signer(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "POST", "/echo/a?x=1&y=%C3%BC", b'{"k": "v"}')
    assert status == 200
    assert data == {"signer": alice.address, "query": {"x": "1", "y": "ü"}, "body": '{"k": "v"}'}


async def test_tampered_body_is_401(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "POST", "/echo/a", b'{"amount": 1000}', sign_body=b'{"amount": 1}')
    assert status == 401 and data["error"] == "unauthorized" and "does not match" in data["detail"]


async def test_tampered_path_is_401(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "GET", "/echo/admin", sign_path="/echo/public")
    assert status == 401 and "does not match" in data["detail"]


async def test_tampered_query_is_401(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "GET", "/echo/a?limit=1000", sign_path="/echo/a?limit=1")
    assert status == 401 and "does not match" in data["detail"]


async def test_someone_elses_address_is_401(serve, alice, mallory) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, mallory, "GET", "/echo/a", headers={HEADER_ADDRESS: alice.address})
    assert status == 401 and "does not match" in data["detail"]


async def test_expired_timestamp_is_401(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "GET", "/echo/a", timestamp=int(time.time()) - 120)
    assert status == 401 and "behind" in data["detail"]


async def test_future_timestamp_is_401(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "GET", "/echo/a", timestamp=int(time.time()) + 120)
    assert status == 401 and "ahead of" in data["detail"]


async def test_timestamp_inside_window_is_accepted(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, _ = await send(server, alice, "GET", "/echo/a", timestamp=int(time.time()) - 30)
    assert status == 200


async def test_replayed_request_is_401(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    url = server.make_url("/echo/a")
    headers = sign_headers(alice, "POST", url.raw_path_qs, b"x", audience=SERVER.address, domain=DOMAIN)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"x", headers=headers) as first:
            assert first.status == 200
        async with session.post(url, data=b"x", headers=headers) as again:
            assert again.status == 401
            assert "already used" in (await again.json())["detail"]


@pytest.mark.parametrize("missing", [HEADER_ADDRESS, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE])
async def test_each_missing_header_is_401(serve, alice, missing: str) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "GET", "/echo/a", drop=missing)
    assert status == 401 and data["detail"] == f"missing header {missing}"


async def test_malformed_signature_is_401(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "GET", "/echo/a", headers={HEADER_SIGNATURE: "0xdeadbeef"})
    assert status == 401 and HEADER_SIGNATURE in data["detail"]


async def test_unsigned_request_is_401_and_public_paths_are_open(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/echo/a")) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        for public in ("/health", "/metrics", "/openapi.json"):
            async with session.get(server.make_url(public)) as resp:
                assert resp.status == 200, public


async def test_require_allows_the_right_signer_and_403s_others(serve, alice, mallory) -> None:
    server = await serve(build_app(alice.address))
    assert (await send(server, alice, "GET", "/owner"))[0] == 200
    status, data = await send(server, mallory, "GET", "/owner")
    assert status == 403 and data["error"] == "forbidden" and mallory.address in data["detail"]
    assert (await send(server, alice, "GET", "/either"))[0] == 200
    assert (await send(server, mallory, "GET", "/either"))[0] == 403


async def test_chain_failure_in_a_check_is_503_not_403(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    status, data = await send(server, alice, "GET", "/chain")
    assert status == 503 and data["error"] == "chain_unavailable"


async def test_body_over_the_limit_is_413_json(serve, alice) -> None:
    server = await serve(build_app(alice.address, client_max_size=1024))
    status, data = await send(server, alice, "POST", "/echo/a", b"x" * 4096)
    assert status == 413 and data["error"] == "request_entity_too_large"


async def test_odd_paths_verify_exactly_as_sent(serve, alice) -> None:
    """Percent-encoding, '+' and unicode: the client signs yarl's raw_path_qs, the server checks raw_path."""
    server = await serve(build_app(alice.address))
    url = server.make_url("/echo/a b/ü").extend_query({"q": "a+b c", "s": "x/&y"})
    headers = sign_headers(alice, "GET", url.raw_path_qs, b"", audience=SERVER.address, domain=DOMAIN)
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["query"] == {"q": "a+b c", "s": "x/&y"}
    # And an encoded URL given as text is sent as-is, so signing its raw form works too.
    raw = URL(str(server.make_url("/echo/%7Efoo?x=%2F")), encoded=True)
    status, _ = await send(server, alice, "GET", str(raw.relative()))
    assert status == 200


async def test_error_bodies_are_json(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/echo/a"), headers={HEADER_SIGNATURE: "x"}) as resp:
            assert resp.content_type == "application/json"
            assert set(json.loads(await resp.text())) == {"error", "detail"}


# -- audience, domain, signed answers, replay across restarts ----------------------------------


async def test_a_request_addressed_to_another_service_or_network_is_refused(serve, alice) -> None:
    server = await serve(build_app(alice.address))
    assert (await send(server, alice, "GET", "/owner"))[0] == 200
    for kwargs in ({"audience": Account.create().address},
                   {"domain": Domain(DOMAIN.chain_id + 1, DOMAIN.registry)},
                   {"domain": Domain(DOMAIN.chain_id, "0x" + "12" * 20)}):
        status, data = await send(server, alice, "GET", "/owner", **kwargs)
        assert status == 401 and data["error"] == "unauthorized", kwargs


async def test_every_whole_answer_is_signed_for_the_requests_nonce(serve, alice, mallory) -> None:
    from prime.auth.signing import verify_answer

    server = await serve(build_app(alice.address))
    url = server.make_url("/owner")
    for account, expected in ((alice, 200), (mallory, 403)):
        headers = sign_headers(account, "GET", url.raw_path_qs, b"", audience=SERVER.address, domain=DOMAIN)
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
            body = await resp.read()
            assert resp.status == expected
            assert verify_answer(resp.headers, headers[HEADER_NONCE], resp.status, body, expected=SERVER.address, domain=DOMAIN) == SERVER.address
            with pytest.raises(AuthError):  # bound to this request: another nonce does not verify
                verify_answer(resp.headers, "x" * 24, resp.status, body, expected=SERVER.address, domain=DOMAIN)
            with pytest.raises(AuthError):  # and to this body
                verify_answer(resp.headers, headers[HEADER_NONCE], resp.status, body + b" ", expected=SERVER.address, domain=DOMAIN)
    # a public route signs its answer only when asked (a nonce header), e.g. for identify()
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/health")) as resp:
            assert HEADER_SIGNATURE not in resp.headers
        async with session.get(server.make_url("/health"), headers={HEADER_NONCE: "n" * 24}) as resp:
            assert verify_answer(resp.headers, "n" * 24, resp.status, await resp.read(), expected=SERVER.address, domain=DOMAIN)


async def test_a_nonce_stays_used_after_the_server_restarts(serve, alice, tmp_path) -> None:
    first = await serve(build_app(alice.address, replay_cache=ReplayCache.persistent(tmp_path / "nonces")))
    url = first.make_url("/owner")
    headers = sign_headers(alice, "GET", url.raw_path_qs, b"", audience=SERVER.address, domain=DOMAIN)
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        assert resp.status == 200
    # a new process: a new app and cache over the same data directory
    second = await serve(build_app(alice.address, replay_cache=ReplayCache.persistent(tmp_path / "nonces")))
    async with aiohttp.ClientSession() as session, session.get(second.make_url("/owner"), headers=headers) as resp:
        assert resp.status == 401 and "already used" in (await resp.json())["detail"]
    # a cache in memory only would have let it through
    third = await serve(build_app(alice.address))
    async with aiohttp.ClientSession() as session, session.get(third.make_url("/owner"), headers=headers) as resp:
        assert resp.status == 200
