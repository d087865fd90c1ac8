"""Connection hygiene for every role's HTTP server: timeouts, a per-peer connection cap, JSON parser errors.

``prime.web.serve`` listens through ``GuardedSite``, whose connections are ``GuardedHandler``s
(aiohttp's ``RequestHandler`` plus the checks below), configured by ``ServerSettings``:

- header timeout: a request whose head (request line and headers) is not complete within
  ``header_timeout`` s of its first byte is answered 408 (when nothing else is being written on
  the connection) and the connection closed;
- keep-alive: a connection with no request in progress is closed after ``keepalive_timeout`` s
  (aiohttp's own timer, counted from the connection's start or its last answer);
- body timeout: a body that sends no byte for ``body_idle_timeout`` s, or is not complete within
  ``body_timeout`` s of its head, ends the request: the handler's read raises a 408 JSON answer
  and the connection is closed after it;
- per-peer cap: at most ``max_connections_per_peer`` open connections per peer IP address; the
  next one is answered 503 JSON and closed, counted in one WARNING line per peer per
  ``warn_interval`` s;
- parser errors (request line or header too long, too many headers, bad method, bad chunked
  framing, bad Content-Length...) are answered ``{"error": "bad_request", "detail": sentence}``
  (431 for headers too large, else 400) and logged at WARNING without a traceback, once per
  peer per ``warn_interval`` s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from prime.web.errors import ApiError

log = logging.getLogger("prime.web")


@dataclass(frozen=True)
class ServerSettings:
    """Limits of one listening server; the defaults are what every role runs with."""

    header_timeout: float = 10.0
    keepalive_timeout: float = 30.0  # longer than aiohttp clients' 15 s, so the client closes first
    body_idle_timeout: float = 15.0
    body_timeout: float = 60.0
    # Benches and tests open a few hundred connections from 127.0.0.1 (bench/heartbeats.py: 256).
    max_connections_per_peer: int = 512
    max_line_size: int = 8192  # request line
    max_field_size: int = 8190  # one header line (aiohttp's default)
    max_headers: int = 100
    lingering_time: float = 5.0  # reading an unread body after the answer, before closing
    refusal_linger: float = 1.0  # a refused connection is drained this long so the 503 is read, not reset
    warn_interval: float = 60.0


def _peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer) if peer else "unknown"


def _error_json(error: str, detail: str) -> str:
    return json.dumps({"error": error, "detail": detail})


def raw_answer(status: int, error: str, detail: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for when no request object exists."""
    body = _error_json(error, detail).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def describe_parser_error(exc: HttpProcessingError, settings: ServerSettings) -> tuple[int, str]:
    """(status, one sentence) for what aiohttp's parser refused; the raw bytes are not echoed."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == settings.max_line_size and limit != settings.max_field_size:
            return 400, f"The request line is longer than {settings.max_line_size} bytes."
        return 431, f"A header line is longer than {settings.max_field_size} bytes."
    if "Too many headers" in exc.message:
        return 431, f"The request has more than {settings.max_headers} header fields."
    if isinstance(exc, BadHttpMethod):
        if "HTTPS" in exc.message:
            return 400, "This port speaks plain HTTP, not HTTPS."
        return 400, "The request method is not a valid HTTP method."
    if isinstance(exc, BadStatusLine):
        return 400, "The request line is not valid HTTP/1.x."
    if isinstance(exc, InvalidURLError):
        return 400, "The request target is not a valid URL."
    if isinstance(exc, InvalidHeader):
        return 400, "A header field is not valid."
    if isinstance(exc, TransferEncodingError):
        return 400, "The chunked body is malformed."
    if isinstance(exc, ContentLengthError):
        return 400, "The body does not match its Content-Length."
    # llhttp's messages are "<reason>:\n\n  <the bytes>\n  ^"; keep the reason only.
    first = exc.message.strip().splitlines()[0].rstrip(":.").strip() if exc.message.strip() else ""
    first = first.encode("ascii", "backslashreplace").decode()[:200]
    return 400, f"The request is not valid HTTP ({first})." if first else "The request is not valid HTTP."


class ConnectionGuard:
    """Open connections per peer address, and WARNING lines throttled per peer and kind."""

    def __init__(self, settings: ServerSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._open: dict[str, int] = {}
        # (peer, kind) -> (when last logged, events not logged since)
        self._warned: dict[tuple[str, str], tuple[float, int]] = {}
        self._clock = clock

    def admit(self, peer: str) -> bool:
        count = self._open.get(peer, 0)
        if count >= self.settings.max_connections_per_peer:
            return False
        self._open[peer] = count + 1
        return True

    def release(self, peer: str) -> None:
        count = self._open.get(peer, 0) - 1
        if count > 0:
            self._open[peer] = count
        else:
            self._open.pop(peer, None)

    def warn(self, peer: str, kind: str, message: str) -> None:
        """Log ``message`` at WARNING unless this peer had one of this kind within the interval."""
        now = self._clock()
        interval = self.settings.warn_interval
        last, suppressed = self._warned.get((peer, kind), (None, 0))
        if last is not None and now - last < interval:
            self._warned[(peer, kind)] = (last, suppressed + 1)
            return
        if len(self._warned) > 4096:  # forget peers that have been quiet for an interval
            self._warned = {k: v for k, v in self._warned.items() if now - v[0] < interval}
        self._warned[(peer, kind)] = (now, 0)
        more = f" ({suppressed} more since the last such line)" if suppressed else ""
        log.warning("%s: %s%s", peer, message, more)


class GuardedHandler(RequestHandler):
    """aiohttp's connection protocol with header/body timeouts, the per-peer cap and JSON parser errors.

    It reads a few of ``RequestHandler``'s attributes (``_request_count``, ``_messages``,
    ``_waiter``, ``_upgraded``, ``_reading_paused``) to see when a request head is complete;
    tests/web/test_connections.py pins the behaviour against the installed aiohttp.
    """

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        settings = guard.settings
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=settings.keepalive_timeout,
            max_line_size=settings.max_line_size,
            max_field_size=settings.max_field_size,
            max_headers=settings.max_headers,
            lingering_time=settings.lingering_time,
            **kwargs,
        )
        self._guard = guard
        self._settings = settings
        self._peer: str | None = None
        self._refused: asyncio.BaseTransport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_progress = 0.0

    # --- the connection's life ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = _peer_of(transport)
        if not self._guard.admit(peer):
            self._refuse(peer, transport)
            return
        self._peer = peer
        super().connection_made(transport)

    def _refuse(self, peer: str, transport: asyncio.BaseTransport) -> None:
        cap = self._settings.max_connections_per_peer
        self._refused = transport
        assert isinstance(transport, asyncio.Transport)
        transport.write(raw_answer(503, "too_many_connections", f"This address already has {cap} open connections; close some and retry."))
        # Half-close and drain what the client sends: closing with unread input would reset the
        # connection and the client could lose the 503 before reading it.
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(self._settings.refusal_linger, transport.close)
        self._guard.warn(peer, "refused", f"connection refused, already {cap} open from this address (the per-peer cap)")

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        self._stop_body_watch()
        if self._refused is not None:
            self._refused = None
            return
        if self._peer is not None:
            self._guard.release(self._peer)
            self._peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return  # drained and dropped
        before = self._request_count
        body = self._body
        receiving = body is not None and not body.is_eof()
        super().data_received(data)
        if self.transport is None or self._upgraded:
            return
        self._watch(self._request_count - before, receiving)

    # --- header and body timeouts ---------------------------------------------------------

    def _watch(self, parsed: int, receiving: bool) -> None:
        """After ``data_received``: ``parsed`` heads completed; ``receiving``: a body was arriving before."""
        now = self._loop.time()
        body = self._body
        if parsed and self._messages:
            self._stop_head_timer()
            message, payload = self._messages[-1]
            if not isinstance(message, RawRequestMessage):
                # A parser error; a body that was still arriving ends with the same 400.
                if body is not None and not body.is_eof():
                    exc = message.exc
                    status, detail = describe_parser_error(exc, self._settings) if isinstance(exc, HttpProcessingError) else (400, "The request is not valid HTTP.")
                    self._end_body(body, ApiError(status, "bad_request", detail), detail)
                return
            if payload.is_eof():
                self._stop_body_watch()
            else:
                self._start_body_watch(payload, now)
        elif receiving and body is not None:
            self._body_progress = now
            if body.is_eof():
                self._stop_body_watch()  # what followed it, if anything, waits for the next bytes
        else:
            self._stop_body_watch()
            if self._head_timer is None:
                self._head_timer = self._loop.call_at(now + self._settings.header_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._force_close:
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._messages:  # nothing else is being written
            transport.write(raw_answer(408, "request_timeout", f"The request head was not complete within {self._settings.header_timeout:g} s."))
        self._guard.warn(self._peer or "unknown", "header_timeout", f"closed a connection whose request head was not complete within {self._settings.header_timeout:g} s")
        self.force_close()

    def _start_body_watch(self, payload: StreamReader, now: float) -> None:
        self._stop_body_watch()
        self._body = payload
        self._body_started = self._body_progress = now
        self._body_timer = self._loop.call_at(self._body_deadline(), self._body_check)

    def _body_deadline(self) -> float:
        return min(self._body_progress + self._settings.body_idle_timeout, self._body_started + self._settings.body_timeout)

    def _body_check(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or self.transport is None:
            return
        now = self._loop.time()
        if self._reading_paused and now < self._body_started + self._settings.body_timeout:
            self._body_progress = now  # we stopped reading (the handler is not consuming), not the client
        deadline = self._body_deadline()
        if now < deadline:
            self._body_timer = self._loop.call_at(deadline, self._body_check)
            return
        s = self._settings
        if now >= self._body_started + s.body_timeout:
            detail = f"The request body was not complete within {s.body_timeout:g} s."
        else:
            detail = f"No byte of the request body arrived for {s.body_idle_timeout:g} s."
        self._end_body(body, ApiError(408, "request_timeout", detail), detail)

    def _end_body(self, body: StreamReader, answer: ApiError, detail: str) -> None:
        """The handler's read raises ``answer`` (JSON by the app's error middleware); nothing more is
        read and the connection closes after the answer."""
        self._stop_body_watch()
        body.set_exception(answer)
        body.feed_eof()  # so aiohttp does not linger reading it after the answer
        self.close()
        self._guard.warn(self._peer or "unknown", "body", f"ended a request: {detail}")

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _stop_body_watch(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body = None

    async def finish_response(self, request: BaseRequest, resp: StreamResponse, start_time: float | None) -> tuple[StreamResponse, bool]:
        # Answered: an unread rest of its body is aiohttp's lingering read, bounded by lingering_time.
        if self._body is request.content:
            self._stop_body_watch()
        return await super().finish_response(request, resp, start_time)

    # --- parser errors and other protocol-level answers -----------------------------------

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None) -> StreamResponse:
        if isinstance(exc, HttpProcessingError):
            status, detail = describe_parser_error(exc, self._settings)
            self._guard.warn(self._peer or "unknown", "bad_request", f"bad request answered {status}: {detail}")
            error = "bad_request"
        else:
            # A handler failing outside the app's error middleware (a bug): aiohttp's traceback at ERROR.
            if status >= 500:
                self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error = "gateway_timeout" if status == 504 else "internal_error"
            detail = "The server failed on this request; it has been logged."
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        resp = web.Response(status=status, text=_error_json(error, detail), content_type="application/json")
        resp.force_close()
        return resp


class GuardedSite(web.BaseSite):
    """A TCP site whose connections are ``GuardedHandler``s sharing one ``ConnectionGuard``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, settings: ServerSettings | None = None) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self.guard = ConnectionGuard(settings or ServerSettings())

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def connection() -> GuardedHandler:
            return GuardedHandler(server, guard=self.guard, loop=loop)

        self._server = await loop.create_server(connection, self._host, self._port, backlog=self._backlog)
