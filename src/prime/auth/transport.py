"""How ``SignedClient`` puts a request on the wire: a small, swappable transport (like httpx's).

``SignedClient`` builds, signs, retries and maps errors; a transport only sends one already
signed request and hands back the response with its body still unread::

    class Transport(Protocol):
        async def send(self, method: str, url: URL, headers: Mapping[str, str], body: bytes,
                       timeout: Timeout) -> Response: ...
        async def close(self) -> None: ...

    class Response(Protocol):          # aiohttp.ClientResponse satisfies it
        status: int
        headers: Mapping[str, str]     # case-insensitive
        content: BodyReader            # read(n), readline(), readany(), iter_chunked(n), iter_any()
        def release(self) -> None: ...

A transport raises ``TransportError`` when no response came (``retryable`` for connection
errors and timeouts, not for an invalid URL); reading ``content`` may raise
``TimeoutError``, ``OSError`` or an ``aiohttp.ClientError`` (the client maps those too).

Two transports:

- ``AiohttpTransport`` (the default): one ``aiohttp.ClientSession``, redirects not followed.
- ``InProcessTransport(app)`` or ``InProcessTransport({"host:port": app, ...})``: the real
  routes and middlewares of aiohttp apps in this process (signature checks included, so a
  test sees real signed headers). aiohttp has no in-memory client, so each app is served by
  ``aiohttp.test_utils.TestServer`` on a loopback port started on first use, and the URL's
  scheme, host and port are replaced by that server's; the path and query, which are all the
  signature covers, are sent unchanged. An authority no app is mapped to fails like a
  refused connection (retryable).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp
from aiohttp import web
from yarl import URL

_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


@dataclass(frozen=True)
class Timeout:
    """Seconds: ``total`` for the whole exchange, ``connect`` and ``read`` (each read) apart; None = no limit."""

    total: float | None = None
    connect: float | None = None
    read: float | None = None


class TransportError(Exception):
    """No response: ``reason`` is a few words for the one-sentence error; ``retryable`` says whether to try again."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class BodyReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...
    async def readline(self) -> bytes: ...
    async def readany(self) -> bytes: ...
    def iter_chunked(self, n: int) -> AsyncIterator[bytes]: ...
    def iter_any(self) -> AsyncIterator[bytes]: ...


class Response(Protocol):
    status: int

    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> Any: ...  # a BodyReader (aiohttp.StreamReader)
    def release(self) -> Any: ...


@runtime_checkable
class Transport(Protocol):
    async def send(self, method: str, url: URL, headers: Mapping[str, str], body: bytes, timeout: Timeout) -> Response: ...
    async def close(self) -> None: ...


def _aiohttp_timeout(timeout: Timeout) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=timeout.total, sock_connect=timeout.connect, sock_read=timeout.read)


class AiohttpTransport:
    """Requests over real sockets with one ``aiohttp.ClientSession`` (opened on first use)."""

    def __init__(self, **session_kwargs: Any) -> None:
        self._session_kwargs = session_kwargs
        self._session: aiohttp.ClientSession | None = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(**self._session_kwargs)
        return self._session

    async def send(self, method: str, url: URL, headers: Mapping[str, str], body: bytes, timeout: Timeout) -> Response:
        try:
            return await self._ensure_session().request(
                method, url, data=body or None, headers=dict(headers), timeout=_aiohttp_timeout(timeout),
                allow_redirects=False,
            )
        except _RETRYABLE as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
            raise TransportError(reason, retryable=True) from exc
        except (aiohttp.InvalidURL, ValueError) as exc:
            raise TransportError(f"the URL is invalid ({exc})", retryable=False) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _authority(url: URL) -> str:
    return f"{url.host}:{url.port}" if url.port is not None else str(url.host)


class InProcessTransport:
    """The real routes of in-process aiohttp apps, reached through a loopback ``TestServer`` each.

    ``InProcessTransport(app)`` sends every request to ``app``, whatever its URL's host;
    ``InProcessTransport({"master.test": app, "10.0.0.5:8093": miner_app})`` picks the app by the
    URL's ``host`` or ``host:port``. The servers start on first use and stop on ``close()`` (their
    apps' startup and cleanup hooks run then).
    """

    def __init__(self, apps: web.Application | Mapping[str, web.Application]) -> None:
        self._default = apps if isinstance(apps, web.Application) else None
        self._apps: dict[str, web.Application] = {} if isinstance(apps, web.Application) else dict(apps)
        self._servers: dict[int, Any] = {}
        self._lock = asyncio.Lock()
        self._inner = AiohttpTransport()

    def _app_for(self, url: URL) -> web.Application | None:
        if self._default is not None:
            return self._default
        return self._apps.get(_authority(url)) or self._apps.get(str(url.host))

    async def _server_for(self, app: web.Application) -> Any:
        from aiohttp.test_utils import TestServer

        async with self._lock:
            server = self._servers.get(id(app))
            if server is None:
                server = TestServer(app, host="127.0.0.1")
                await server.start_server()
                self._servers[id(app)] = server
            return server

    async def send(self, method: str, url: URL, headers: Mapping[str, str], body: bytes, timeout: Timeout) -> Response:
        if not url.is_absolute() or url.host is None:
            raise TransportError(f"the URL is invalid ({url} is not absolute)", retryable=False)
        app = self._app_for(url)
        if app is None:
            raise TransportError(f"no in-process app serves {_authority(url)}", retryable=True)
        server = await self._server_for(app)
        target = url.with_scheme("http").with_host("127.0.0.1").with_port(server.port)
        return await self._inner.send(method, target, headers, body, timeout)

    async def close(self) -> None:
        await self._inner.close()
        servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            await server.close()
