"""Connection hygiene of ``prime.web.serve`` (prime.web.server), over real sockets on 127.0.0.1.

Partial request heads and stalled bodies are ended, idle keep-alive connections closed, a peer
over its connection cap is refused with 503 while the service keeps answering, and aiohttp's
parser errors are JSON 4xx logged at WARNING without a traceback. Short timeouts come from
``ServerSettings``; timings are only asserted as generous upper bounds for "was closed".
The last tests run a real discovery app (in process) and a real ``prime discovery start``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from eth_account import Account

from prime.keys import create_keystore
from prime.web import bound_port, make_app, serve
from prime.web.server import ConnectionGuard, ServerSettings
from tests.fixtures.processes import free_port, prime_command
from tests.web.roles import discovery_app

FAST = ServerSettings(header_timeout=0.5, keepalive_timeout=1.0, body_idle_timeout=0.5, body_timeout=2.0, warn_interval=60.0)
CLOSED_WITHIN = 10.0  # generous bound for "the server closed the connection"
HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
HEALTH_CLOSE = b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"bytes": len(await request.read())})


def tiny_app() -> web.Application:
    app = make_app(name="tiny")
    app.router.add_post("/echo", _echo)
    return app


Start = Callable[..., Awaitable[int]]


@pytest_asyncio.fixture
async def listen() -> AsyncIterator[Start]:
    """``port = await listen(settings, app=None)``: the app served by ``prime.web.serve``; stopped after."""
    runners: list[web.AppRunner] = []

    async def start(settings: ServerSettings = FAST, app: web.Application | None = None) -> int:
        runner = await serve(app or tiny_app(), host="127.0.0.1", port=0, settings=settings)
        runners.append(runner)
        return bound_port(runner)

    yield start
    for runner in runners:
        await runner.cleanup()


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def json(self) -> dict:
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One answer with a Content-Length body (all answers here have one)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSED_WITHIN)
    answer = Answer(head)
    answer.body = await asyncio.wait_for(reader.readexactly(int(answer.headers["content-length"])), CLOSED_WITHIN)
    return answer


async def closed(reader: asyncio.StreamReader) -> bytes:
    """What the server still sends before it closes the connection (fails if it stays open)."""
    return await asyncio.wait_for(reader.read(), CLOSED_WITHIN)


async def exchange(port: int, data: bytes) -> tuple[Answer, bool]:
    """Send ``data``, read one answer; also whether the server closed the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        answer = await read_answer(reader)
        rest = await closed(reader)
        return answer, rest == b""
    finally:
        writer.close()


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a record carries a traceback"
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- timeouts ---------------------------------------------------------------------------------


async def test_a_partial_request_head_is_answered_408_and_closed(listen: Start, caplog) -> None:
    port = await listen()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n")  # no blank line: the head never completes
    answer = Answer(await closed(reader))
    writer.close()
    assert answer.status == 408 and answer.json()["error"] == "request_timeout"
    assert any(r.levelno == logging.WARNING and "request head" in r.getMessage() for r in caplog.records)
    no_tracebacks(caplog)


async def _trickle(writer: asyncio.StreamWriter, piece: bytes, every: float) -> None:
    """Send ``piece`` every ``every`` s until the connection breaks (or the task is cancelled)."""
    try:
        while not writer.is_closing():
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(every)
    except ConnectionError:
        pass


async def test_a_head_trickled_line_by_line_is_still_closed(listen: Start) -> None:
    port = await listen()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\n")
    trickle = asyncio.create_task(_trickle(writer, b"X-Slow: 1\r\n", 0.1))  # bytes keep coming, the head never ends
    try:
        assert Answer(await closed(reader)).status == 408
    finally:
        trickle.cancel()
        writer.close()


async def test_an_idle_keepalive_connection_is_closed(listen: Start) -> None:
    port = await listen()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEALTH)
    assert (await read_answer(reader)).status == 200
    assert await closed(reader) == b""  # keepalive_timeout 1 s, nothing sent: closed
    writer.close()


async def test_a_stalled_body_ends_the_request_with_408(listen: Start, caplog) -> None:
    port = await listen()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
    answer = await read_answer(reader)
    assert answer.status == 408
    body = answer.json()
    assert body["error"] == "request_timeout" and "request body" in body["detail"]
    assert await closed(reader) == b""
    writer.close()
    assert any(r.levelno == logging.WARNING and "ended a request" in r.getMessage() for r in caplog.records)
    no_tracebacks(caplog)


async def test_a_body_too_slow_overall_ends_with_408(listen: Start) -> None:
    port = await listen()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
    # One byte every 0.1 s: never idle for 0.5 s, but not done within body_timeout (2 s).
    trickle = asyncio.create_task(_trickle(writer, b"x", 0.1))
    try:
        answer = await read_answer(reader)
    finally:
        trickle.cancel()
        writer.close()
    assert answer.status == 408 and "not complete within 2 s" in answer.json()["detail"]


async def test_a_complete_body_and_keepalive_still_work(listen: Start) -> None:
    port = await listen()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(3):  # several requests on one connection, bodies sent in pieces
        writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"def")
        answer = await read_answer(reader)
        assert answer.status == 200 and answer.json() == {"bytes": 6}
    writer.close()


# --- per-peer connection cap ------------------------------------------------------------------


async def test_the_connection_over_the_per_peer_cap_is_refused_and_the_rest_keep_working(listen: Start, caplog) -> None:
    cap = 5
    port = await listen(ServerSettings(max_connections_per_peer=cap, keepalive_timeout=30.0))
    held = []
    for _ in range(cap):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTH)
        assert (await read_answer(reader)).status == 200  # admitted (and kept open)
        held.append((reader, writer))

    for _ in range(3):  # (cap+1)th, several times: refused with 503 JSON, one WARNING line
        answer, was_closed = await exchange(port, HEALTH)
        assert answer.status == 503 and answer.json()["error"] == "too_many_connections"
        assert was_closed
    refusals = [r for r in caplog.records if "per-peer cap" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING

    for reader, writer in held:  # the first cap connections still work
        writer.write(HEALTH)
        assert (await read_answer(reader)).status == 200

    reader, writer = held.pop()
    writer.close()
    await writer.wait_closed()
    for _ in range(50):  # the server sees the close shortly after; then a new connection is admitted
        answer, _ = await exchange(port, HEALTH_CLOSE)
        if answer.status == 200:
            break
        await asyncio.sleep(0.1)
    assert answer.status == 200 and answer.json()["status"] == "ok"
    for _, writer in held:
        writer.close()
    no_tracebacks(caplog)


def test_warnings_are_throttled_per_peer_and_kind_and_count_what_was_left_out(caplog) -> None:
    now = [0.0]
    guard = ConnectionGuard(ServerSettings(warn_interval=60.0), clock=lambda: now[0])
    for _ in range(4):
        guard.warn("10.0.0.1", "refused", "refused")
    guard.warn("10.0.0.2", "refused", "refused")
    guard.warn("10.0.0.1", "bad_request", "bad")
    now[0] = 61.0
    guard.warn("10.0.0.1", "refused", "refused")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["10.0.0.1: refused", "10.0.0.2: refused", "10.0.0.1: bad",
                     "10.0.0.1: refused (3 more since the last such line)"]


# --- aiohttp's parser errors ------------------------------------------------------------------

PARSER_ERRORS = {
    "huge header": (b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    "2000 headers": (b"GET /health HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(2000)) + b"\r\n", 431),
    "bad request line": (b"GARBAGE\r\n\r\n", 400),
    "request line too long": (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "bad method": (b"G(T /health HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    "invalid content-length": (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 12a\r\n\r\n", 400),
    "malformed chunked body": (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    "not HTTP at all (TLS hello)": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),
}


@pytest.mark.parametrize("name", list(PARSER_ERRORS))
async def test_parser_errors_are_json_4xx_at_warning_without_traceback(listen: Start, caplog, name: str) -> None:
    data, status = PARSER_ERRORS[name]
    port = await listen()
    caplog.set_level(logging.DEBUG)
    answer, was_closed = await exchange(port, data)
    assert answer.status == status
    body = answer.json()
    assert body["error"] == "bad_request" and isinstance(body["detail"], str) and body["detail"].endswith(".")
    assert "\n" not in body["detail"] and len(body["detail"]) < 300
    assert was_closed
    warnings = [r for r in caplog.records if r.name == "prime.web" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bad request" in warnings[0].getMessage()
    no_tracebacks(caplog)
    answer, _ = await exchange(port, HEALTH_CLOSE)  # and the service answers afterwards
    assert answer.status == 200


async def test_a_malformed_chunk_after_the_head_arrived_is_a_400_too(listen: Start, caplog) -> None:
    port = await listen()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)  # the handler is reading the body by now
    writer.write(b"zz\r\n")
    answer = await read_answer(reader)
    assert answer.status == 400 and answer.json()["error"] == "bad_request"
    assert await closed(reader) == b""
    writer.close()
    no_tracebacks(caplog)


# --- a real role ------------------------------------------------------------------------------


async def test_a_real_discovery_app_gets_the_same_hygiene(listen: Start, tmp_path: Path, caplog) -> None:
    app, close = discovery_app(tmp_path)
    try:
        port = await listen(ServerSettings(header_timeout=0.5, max_connections_per_peer=3), app)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        assert Answer(await closed(reader)).status == 408
        writer.close()

        answer, _ = await exchange(port, PARSER_ERRORS["2000 headers"][0])
        assert answer.status == 431 and answer.json()["error"] == "bad_request"

        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for reader, writer in held:
            writer.write(HEALTH)
            assert (await read_answer(reader)).status == 200
        answer, _ = await exchange(port, HEALTH)
        assert answer.status == 503
        for _, writer in held:
            writer.close()
            await writer.wait_closed()
        for _ in range(50):
            answer, _ = await exchange(port, HEALTH_CLOSE)
            if answer.status == 200:
                break
            await asyncio.sleep(0.1)
        assert answer.status == 200 and answer.json()["service"] == "discovery"
        no_tracebacks(caplog)
    finally:
        close()


def _blocking_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_real_discovery_process_closes_partial_heads_and_answers_parser_errors_as_json(
    anvil, deployment, role_processes, tmp_path: Path
) -> None:
    port = free_port()
    key_file = tmp_path / "discovery-key.json"
    create_keystore(key_file, "pw", Account.create().key.hex(), kdf="pbkdf2", iterations=2)
    proc = role_processes.start(
        "discovery",
        prime_command("discovery", "start", "--host", "127.0.0.1", "--port", str(port), "--rpc-url", anvil.rpc_url,
                      "--deployment", str(deployment.path), "--data-dir", str(tmp_path / "discovery"),
                      "--key-file", str(key_file)),
        port=port,
        env={"PRIME_KEY_PASSWORD": "pw"},
    )
    answer = Answer(_blocking_exchange(port, PARSER_ERRORS["2000 headers"][0]))
    assert answer.status == 431 and answer.json()["error"] == "bad_request"
    answer = Answer(_blocking_exchange(port, PARSER_ERRORS["huge header"][0]))
    assert answer.status == 431 and answer.json()["error"] == "bad_request"

    # The default header timeout (10 s) closes a partial head; 30 s is the generous bound.
    started = time.monotonic()
    answer = Answer(_blocking_exchange(port, b"GET /health HTTP/1.1\r\nHost: t\r\n"))
    assert answer.status == 408 and time.monotonic() - started < 30

    assert Answer(_blocking_exchange(port, HEALTH_CLOSE)).status == 200
    logs = proc.logs(200)
    assert "Traceback" not in logs and " ERROR " not in logs
    assert "WARNING prime.web" in logs
