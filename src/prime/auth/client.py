"""The client side of signed requests: ``SignedClient``.

Each attempt is signed afresh (new timestamp and nonce) over the request target exactly as
aiohttp will put it on the wire: the URL (with ``params`` merged) is built once as a
``yarl.URL`` and that same object is sent, so its ``raw_path_qs`` is what the server sees
in ``request.raw_path``. Redirects are not followed (a signature covers one path).

Connection errors, timeouts and 5xx answers are retried with exponential backoff and
jitter; 4xx answers are final. Failures are ``PeerError`` carrying the status and the
peer's JSON error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from yarl import URL

from prime.auth.signing import sign_headers
from prime.errors import PeerError

_UNSET: Any = object()
_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


def build_url(url: str | URL, params: Mapping[str, Any] | None = None) -> URL:
    """The exact URL that will be requested (and signed)."""
    u = url if isinstance(url, URL) else URL(url)
    if params:
        u = u.extend_query({k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()})
    return u.with_fragment(None)


def _peer_name(u: URL) -> str:
    return f"{u.host}:{u.port}" if u.host else str(u)


def _describe_error(body: bytes) -> tuple[Any, str]:
    """(parsed body, short text) of an error answer."""
    try:
        parsed = jsonlib.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        text = body[:300].decode("utf-8", "replace").strip()
        return text, text or "no details"
    if isinstance(parsed, dict) and "error" in parsed:
        detail = parsed.get("detail")
        text = str(parsed["error"]) + (f": {detail}" if detail not in (None, "") else "")
        return parsed, text
    return parsed, jsonlib.dumps(parsed)[:300]


class SignedClient:
    """Signed, retried HTTP calls to other prime services. Use as ``async with SignedClient(acct) as c``."""

    def __init__(
        self,
        account: Any,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.account = account
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SignedClient:
        self._ensure_session()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        if retry_after and retry_after.isdigit():
            delay = min(self.max_backoff_s, max(delay, float(retry_after)))
        return delay * random.uniform(0.5, 1.0)  # jitter: callers that failed together do not retry together

    async def _send(
        self, method: str, u: URL, body: bytes, content_type: str | None, timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """The response of the first attempt that is not a connection error or a 5xx (or the last one)."""
        session = self._ensure_session()
        method = method.upper()
        attempts = self.retries + 1
        for attempt in range(attempts):
            headers = sign_headers(self.account, method, u.raw_path_qs, body)
            if content_type:
                headers["Content-Type"] = content_type
            try:
                response = await session.request(
                    method, u, data=body or None, headers=headers, timeout=timeout, allow_redirects=False
                )
            except _RETRYABLE as exc:
                if attempt + 1 >= attempts:
                    reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
                    raise PeerError(
                        f"Could not reach {_peer_name(u)} for {method} {u.path} after {attempts} attempts ({reason}); check that it is running and reachable."
                    ) from None
                await asyncio.sleep(self._delay(attempt))
                continue
            except (aiohttp.InvalidURL, ValueError) as exc:
                raise PeerError(f"Cannot request {u}: the URL is invalid ({exc}).") from None
            if response.status >= 500 and attempt + 1 < attempts:
                retry_after = response.headers.get("Retry-After")
                await response.read()
                response.release()
                await asyncio.sleep(self._delay(attempt, retry_after))
                continue
            return response
        raise AssertionError("unreachable")

    @staticmethod
    def _encode(json: Any, data: bytes | None) -> tuple[bytes, str | None]:
        if json is not None and data is not None:
            raise ValueError("pass json or data, not both")
        if json is not None:
            return jsonlib.dumps(json, separators=(",", ":")).encode(), "application/json"
        return (data or b""), ("application/octet-stream" if data else None)

    async def _raise_for(self, method: str, u: URL, response: aiohttp.ClientResponse) -> None:
        if 200 <= response.status < 300:
            return
        try:
            body = await response.read()
        except aiohttp.ClientError:
            body = b""
        parsed, text = _describe_error(body)
        raise PeerError(
            f"{_peer_name(u)} answered {response.status} to {method.upper()} {u.path}: {text}.",
            status=response.status,
            body=parsed,
        )

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        data: bytes | None = None,
    ) -> Any:
        """Send one signed request; the parsed JSON answer (None for an empty body).

        Raises PeerError (with ``status`` and the peer's JSON error as ``body``) on a non-2xx
        answer, an answer that is not JSON, or when the peer stays unreachable.
        """
        u = build_url(url, params)
        body, content_type = self._encode(json, data)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        response = await self._send(method, u, body, content_type, timeout)
        async with response:
            await self._raise_for(method, u, response)
            try:
                raw = await response.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise PeerError(f"{_peer_name(u)} broke off its answer to {method.upper()} {u.path} ({type(exc).__name__}).", status=response.status) from None
        if not raw.strip():
            return None
        try:
            return jsonlib.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise PeerError(
                f"{_peer_name(u)} answered {method.upper()} {u.path} with something that is not JSON.", status=response.status, body=raw[:300]
            ) from None

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str | URL,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        read_timeout_s: float | None = _UNSET,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The raw response of a signed request, for large or open-ended bodies (logs, blobs).

        Connecting is retried like ``request``; the body is the caller's to read
        (``resp.content``). ``read_timeout_s`` bounds each read (default ``timeout_s``;
        None waits forever, e.g. for ``follow=1`` logs). Non-2xx answers raise PeerError.
        """
        u = build_url(url, params)
        body, content_type = self._encode(json, None)
        sock_read = self.timeout_s if read_timeout_s is _UNSET else read_timeout_s
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=sock_read)
        response = await self._send(method, u, body, content_type, timeout)
        try:
            await self._raise_for(method, u, response)
            yield response
        finally:
            response.release()
