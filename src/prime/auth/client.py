"""The client side of signed requests: ``SignedClient``.

Each attempt is signed afresh (new timestamp and nonce) over the request target exactly as it
will be put on the wire: the URL (with ``params`` merged) is built once as a ``yarl.URL`` and
that same object is sent, so its ``raw_path_qs`` is what the server sees in
``request.raw_path``. Redirects are not followed (a signature covers one path).

The wire itself is a transport (``prime.auth.transport``): ``AiohttpTransport`` by default,
``InProcessTransport(app)`` in tests to reach an aiohttp app's real routes. Signing, retries,
reply limits and error mapping are here, the same for every transport. A transport passed in
is the caller's to close; the default one is closed with the client.

Connection errors, timeouts and 5xx answers are retried with exponential backoff and
jitter; 4xx answers are final. Failures are ``PeerError`` carrying the status and the
peer's JSON error.

Each request is addressed: ``audience`` is the address of the service the caller means to
reach, and ``domain`` (chain id and registry) the network; both are in the signature, so the
request is good for that service only. Every 2xx answer read by ``request()`` must be signed
by that same address, for this request's nonce (``prime.auth.signing.verify_answer``): an
answer that is not is a ``PeerError``, never read as instructions. ``identify(url)`` asks a
service's public ``/health`` whom it claims to be, for callers that know only a URL (an
operator's CLI); every answer after that must still be signed by that key.

Every body the client reads itself is bounded: ``request()`` reads at most
``max_response_bytes`` (a client setting, ``DEFAULT_MAX_RESPONSE_BYTES`` unless given, and a
per-call override); a longer answer is a ``PeerError`` naming the peer, refused from its
Content-Length before any of it is read, or as soon as the limit is passed. Error answers are
read up to ``ERROR_BODY_BYTES``. ``stream()`` leaves the body to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import random
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

import aiohttp
from yarl import URL

from prime.auth.signing import HEADER_NONCE, AuthError, Domain, new_nonce, sign_headers, verify_answer
from prime.auth.transport import (
    AiohttpTransport,
    Response,
    Timeout,
    Transport,
    TransportError,
)
from prime.errors import PeerError
from prime.protocol.codec import parse
from prime.protocol.errors import ValidationError

_UNSET: Any = object()
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
ERROR_BODY_BYTES = 64 * 1024
_READ_ERRORS = (TimeoutError, aiohttp.ClientError, OSError, TransportError)


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
        parsed = parse(body) if body else None  # bounded in depth, no lone surrogates: safe to print
    except ValidationError:
        text = body[:300].decode("utf-8", "replace").strip()
        return text, text or "no details"
    if isinstance(parsed, dict) and "error" in parsed:
        detail = parsed.get("detail")
        text = str(parsed["error"]) + (f": {detail}" if detail not in (None, "") else "")
        return parsed, text
    return parsed, jsonlib.dumps(parsed)[:300]


def _parse_identity(raw: bytes) -> PeerIdentity | None:
    try:
        parsed = parse(raw) if raw else None
        identity = parsed.get("identity") if isinstance(parsed, dict) else None
        if not isinstance(identity, dict):
            return None
        address = identity["address"]
        if not isinstance(address, str) or not re.fullmatch(r"0x[0-9a-fA-F]{40}", address):
            return None
        return PeerIdentity(address, Domain(identity["chain_id"], identity["registry"]))
    except (ValidationError, ValueError, KeyError, TypeError):
        return None


class AnswerTooLarge(PeerError):
    """A peer's answer was longer than the caller's bound; none of the rest was read."""

    def __init__(self, message: str, *, limit: int, status: int | None = None) -> None:
        super().__init__(message, status=status)
        self.limit = limit


class ReplyTooLarge(Exception):
    def __init__(self, limit: int, declared: int | None = None) -> None:
        super().__init__(limit)
        self.limit = limit
        self.declared = declared


async def read_bounded(response: Response, limit: int) -> bytes:
    """The whole body of ``response``, or ``ReplyTooLarge`` once it is longer than ``limit`` bytes."""
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ReplyTooLarge(limit, int(declared))
    content = response.content
    chunks: list[bytes] = []
    received = 0
    while True:
        chunk = await content.read(min(256 * 1024, limit + 1 - received))
        if not chunk:
            return b"".join(chunks)
        received += len(chunk)
        if received > limit:
            raise ReplyTooLarge(limit)
        chunks.append(chunk)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


@dataclass(frozen=True)
class PeerIdentity:
    """Whom a service says it is in its ``/health``: its signing address and its network."""

    address: str
    domain: Domain


class SignedClient:
    """Signed, retried HTTP calls to other prime services. Use as ``async with SignedClient(acct, domain=d) as c``.

    ``domain`` may be left out by a caller that learns it from its first peer (``identify``).
    """

    def __init__(
        self,
        account: Any,
        *,
        domain: Domain | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        transport: Transport | None = None,
    ) -> None:
        self.account = account
        self.domain = domain
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_response_bytes = max_response_bytes
        self._owns_transport = transport is None
        self.transport: Transport = transport if transport is not None else AiohttpTransport()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the default transport (one passed in stays open: its owner closes it)."""
        if self._owns_transport:
            await self.transport.close()

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        delay: float = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        if retry_after and retry_after.isdigit():
            delay = min(self.max_backoff_s, max(delay, float(retry_after)))
        return delay * random.uniform(0.5, 1.0)  # jitter: callers that failed together do not retry together

    def _domain(self) -> Domain:
        if self.domain is None:
            raise PeerError("This client knows no chain id and registry to sign for; give it a domain or call identify() first.")
        return self.domain

    async def identify(self, url: str | URL) -> PeerIdentity:
        """Whom the service at ``url`` claims to be (its public ``/health``); adopts its domain when
        this client has none, and refuses a service on another chain or registry."""
        u = build_url(url).with_path("/health").with_query(None)
        nonce = new_nonce()
        try:
            response = await self.transport.send("GET", u, {HEADER_NONCE: nonce}, b"", Timeout(total=self.timeout_s))
        except TransportError as exc:
            raise PeerError(f"Could not reach {_peer_name(u)} to learn its identity ({exc.reason}); check that it is running and reachable.") from None
        try:
            raw = await read_bounded(response, ERROR_BODY_BYTES)
        except (ReplyTooLarge, *_READ_ERRORS):
            raw = b""
        finally:
            response.release()
        identity = _parse_identity(raw)
        if identity is None:
            raise PeerError(f"{_peer_name(u)} did not say who it is in /health (no identity); check that the URL points at a prime service.")
        try:  # it must hold the key it names: the answer is signed for our nonce
            verify_answer(response.headers, nonce, response.status, raw, expected=identity.address, domain=identity.domain)
        except AuthError as exc:
            raise PeerError(f"{_peer_name(u)} names {identity.address} in /health, but {exc.reason}.") from None
        if self.domain is None:
            self.domain = identity.domain
        elif identity.domain != self.domain:
            raise PeerError(
                f"{_peer_name(u)} belongs to chain {identity.domain.chain_id}, registry {identity.domain.registry}, "
                f"not to this client's chain {self.domain.chain_id}, registry {self.domain.registry}; check the URL and the deployment."
            )
        return identity

    async def _send(
        self, method: str, u: URL, body: bytes, content_type: str | None, timeout: Timeout, audience: str
    ) -> tuple[Response, str]:
        """The response of the first attempt that is not a connection error or a 5xx (or the last
        one), and the nonce that attempt was signed with (its answer must be signed for it)."""
        method = method.upper()
        domain = self._domain()
        attempts = self.retries + 1
        for attempt in range(attempts):
            headers = sign_headers(self.account, method, u.raw_path_qs, body, audience=audience, domain=domain)
            if content_type:
                headers["Content-Type"] = content_type
            try:
                response = await self.transport.send(method, u, headers, body, timeout)
            except TransportError as exc:
                if not exc.retryable:
                    raise PeerError(f"Cannot request {u}: {exc.reason}.") from None
                if attempt + 1 >= attempts:
                    raise PeerError(
                        f"Could not reach {_peer_name(u)} for {method} {u.path} after {attempts} attempts ({exc.reason}); check that it is running and reachable."
                    ) from None
                await asyncio.sleep(self._delay(attempt))
                continue
            if response.status >= 500 and attempt + 1 < attempts:
                retry_after = response.headers.get("Retry-After")
                with contextlib.suppress(*_READ_ERRORS, ReplyTooLarge):
                    await read_bounded(response, ERROR_BODY_BYTES)
                response.release()
                await asyncio.sleep(self._delay(attempt, retry_after))
                continue
            return response, headers[HEADER_NONCE]
        raise AssertionError("unreachable")

    @staticmethod
    def _encode(json: Any, data: bytes | None) -> tuple[bytes, str | None]:
        if json is not None and data is not None:
            raise ValueError("pass json or data, not both")
        if json is not None:
            return jsonlib.dumps(json, separators=(",", ":")).encode(), "application/json"
        return (data or b""), ("application/octet-stream" if data else None)

    async def _raise_for(self, method: str, u: URL, response: Response) -> None:
        if 200 <= response.status < 300:
            return
        try:
            body = await read_bounded(response, ERROR_BODY_BYTES)
        except ReplyTooLarge:
            body = b""  # an error answer that long describes nothing useful
        except _READ_ERRORS:
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
        audience: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        max_response_bytes: int | None = None,
    ) -> Any:
        """Send one signed request to the service whose address is ``audience``; the parsed JSON
        answer (None for an empty body), after checking that ``audience`` signed it.

        Raises PeerError (with ``status`` and the peer's JSON error as ``body``) on a non-2xx
        answer, an answer that is not signed by ``audience``, is not JSON or is longer than
        ``max_response_bytes`` (default: the client's setting), or when the peer stays unreachable.
        """
        raw = await self.request_bytes(
            method, url, audience=audience, json=json, params=params, data=data, max_response_bytes=max_response_bytes
        )
        if not raw.strip():
            return None
        try:
            return parse(raw)
        except ValidationError:
            u = build_url(url, params)
            raise PeerError(
                f"{_peer_name(u)} answered {method.upper()} {u.path} with something that is not JSON (or nested too deep).", status=200, body=raw[:300]
            ) from None

    async def request_bytes(
        self,
        method: str,
        url: str | URL,
        *,
        audience: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        max_response_bytes: int | None = None,
    ) -> bytes:
        """Like ``request``, but the answer's bytes (signed by ``audience``, at most ``max_response_bytes``),
        for callers that decode it into a typed message themselves."""
        u = build_url(url, params)
        body, content_type = self._encode(json, data)
        limit = self.max_response_bytes if max_response_bytes is None else max_response_bytes
        response, nonce = await self._send(method, u, body, content_type, Timeout(total=self.timeout_s), audience)
        try:
            await self._raise_for(method, u, response)
            try:
                raw = await read_bounded(response, limit)
            except ReplyTooLarge as exc:
                size = f" ({_size(exc.declared)})" if exc.declared is not None else ""
                raise AnswerTooLarge(
                    f"{_peer_name(u)} answered {method.upper()} {u.path} with more than {_size(exc.limit)}{size}; "
                    "it was not read (a peer that is not a prime service, or a reply limit too low for it).",
                    limit=exc.limit,
                    status=response.status,
                ) from None
            except _READ_ERRORS as exc:
                raise PeerError(f"{_peer_name(u)} broke off its answer to {method.upper()} {u.path} ({type(exc).__name__}).", status=response.status) from None
            try:
                verify_answer(response.headers, nonce, response.status, raw, expected=audience, domain=self._domain())
            except AuthError as exc:
                raise PeerError(
                    f"{_peer_name(u)} answered {method.upper()} {u.path}, but {exc.reason}; the answer was not used "
                    "(a peer that is not the service meant, or something on the path changed it).",
                    status=response.status,
                ) from None
            return raw
        finally:
            response.release()

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str | URL,
        *,
        audience: str,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        read_timeout_s: float | None = _UNSET,
    ) -> AsyncIterator[Response]:
        """The raw response of a signed request, for large or open-ended bodies (logs, blobs).

        Connecting is retried like ``request``; the body is the caller's to read (and bound):
        ``resp.content``. ``read_timeout_s`` bounds each read (default ``timeout_s``;
        None waits forever, e.g. for ``follow=1`` logs). Non-2xx answers raise PeerError.
        """
        u = build_url(url, params)
        body, content_type = self._encode(json, None)
        sock_read = self.timeout_s if read_timeout_s is _UNSET else read_timeout_s
        timeout = Timeout(total=None, connect=self.timeout_s, read=sock_read)
        response, _ = await self._send(method, u, body, content_type, timeout, audience)
        try:
            await self._raise_for(method, u, response)
            yield response
        finally:
            response.release()
