"""The server side of signed requests: who is calling (401) and may they (403), and signed answers.

``signed_request_middleware(account, domain)`` verifies every request except the public
paths — signed for this service (its address is the audience), this chain and registry,
fresh, and never seen before (``ReplayCache``, persisted by the roles) — and puts the
signer's checksum address in ``request["signer"]``; ``@require(check)`` then asks an async
predicate (usually a ``ChainPermissions`` method) whether that signer may call the handler.
Failures are JSON ``{"error", "detail"}`` like every other error.

Every answer it can sign (a whole body, not a stream) is signed back by ``account``, bound to
the request's nonce (``prime.auth.signing.sign_answer``), so callers can check who answered.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from prime.auth.replay import ReplayCache, ReplayCacheFull
from prime.auth.signing import (
    HEADER_NONCE,
    NONCE_PATTERN,
    AuthError,
    Domain,
    parse_headers,
    sign_answer,
    verify_parsed,
)
from prime.errors import ChainError
from prime.web import json_error
from prime.web.errors import ApiError
from prime.web.health import Identity

log = logging.getLogger(__name__)

SIGNER = "signer"  # request[SIGNER]: checksum address of the verified signer
DEFAULT_PUBLIC_PATHS = ("/health", "/metrics", "/openapi.json")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Check = Callable[[web.Request, str], Awaitable[bool]]


_signer_key_used = False


def _set_signer(request: web.Request, signer: str) -> None:
    """``request["signer"] = signer``: the agreed plain-string key every role reads.

    aiohttp warns once per string key (it prefers RequestKey objects); that one warning is
    noise here, so the first store happens with it silenced and aiohttp stays quiet after.
    """
    global _signer_key_used
    if _signer_key_used:
        request[SIGNER] = signer
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", web.NotAppKeyWarning)
        request[SIGNER] = signer
    _signer_key_used = True


def _unauthorized(reason: str) -> web.Response:
    return json_error(401, "unauthorized", reason)


def request_path_qs(request: web.Request) -> str:
    """The request target exactly as the client sent it (what the client signed)."""
    return request.raw_path


def signed_request_middleware(
    account: Any,
    domain: Domain,
    *,
    public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS,
    window_s: int = 60,
    replay_cache: ReplayCache | None = None,
    clock: Callable[[], float] = time.time,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """aiohttp middleware: 401 JSON unless the request is correctly signed for ``account``
    in ``domain``, fresh and new; the answer signed by ``account``.

    Checks, cheapest first: the four headers are present and well-formed; the timestamp is
    within ±``window_s`` of this server's clock; the body (read in full, so the app's
    ``client_max_size`` applies: 413), the path+query, this service's address, the chain id
    and the registry match the signature; the nonce was not used by this signer inside the
    window (across restarts when ``replay_cache`` is persistent).
    """
    public = frozenset(public_paths)
    replay = replay_cache if replay_cache is not None else ReplayCache(window_s, clock=clock)
    audience = account.address

    def signed(response: web.StreamResponse, nonce: str) -> web.StreamResponse:
        # A whole body can be signed; a stream (logs, blobs) is already on the wire. Blobs are
        # content-addressed, and no stream carries instructions.
        if isinstance(response, web.Response) and not response.prepared:
            body = b"" if response.body is None else response.body
            if isinstance(body, bytes):
                response.headers.update(sign_answer(account, nonce, response.status, body, domain))
        return response

    @web.middleware
    async def signed_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public:
            response = await handler(request)
            nonce = request.headers.get(HEADER_NONCE, "")
            # A caller that sends a nonce (identify) gets the answer signed for it: proof that
            # the service holds the key it names.
            return signed(response, nonce) if NONCE_PATTERN.match(nonce) else response
        try:
            parsed = parse_headers(request.headers)
        except AuthError as exc:
            return _unauthorized(exc.reason)
        now = clock()
        skew = parsed.timestamp - now
        if abs(skew) > window_s:
            direction = "ahead of" if skew > 0 else "behind"
            return _unauthorized(
                f"the request timestamp is {abs(skew):.0f} s {direction} the server clock (allowed ±{window_s} s); check the caller's clock"
            )
        body = await request.read()
        try:
            signer = verify_parsed(parsed, request.method, request_path_qs(request), body, audience=audience, domain=domain)
        except AuthError as exc:
            return _unauthorized(exc.reason)
        try:
            fresh = replay.remember(signer, parsed.nonce, parsed.timestamp, now=now)
        except ReplayCacheFull as exc:
            return json_error(503, "busy", f"too many signed requests in flight ({exc})")
        if not fresh:
            return signed(_unauthorized("this nonce was already used; sign each request with a new nonce"), parsed.nonce)
        _set_signer(request, signer)
        try:
            response = await handler(request)
        except ApiError as exc:  # answered here, so the error is signed like any answer
            response = json_error(exc.status, exc.error, exc.detail)
        return signed(response, parsed.nonce)

    return signed_request


@dataclass(frozen=True)
class SignedService:
    """What a service that takes signed requests needs: its key (the audience requests must be
    addressed to, and the signer of its answers), its network, and where its nonces are kept
    (``ReplayCache.persistent`` in the role's data directory; None keeps them in memory, for tests)."""

    account: Any
    domain: Domain
    replay: ReplayCache | None = None

    @property
    def address(self) -> str:
        return str(self.account.address)

    def middleware(self) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        return signed_request_middleware(self.account, self.domain, replay_cache=self.replay)

    def identity(self) -> Identity:
        """What ``/health`` publishes (see ``SignedClient.identify``)."""
        return Identity(self.address, self.domain.chain_id, self.domain.registry)


def require(check: Check) -> Callable[[Handler], Handler]:
    """Handler decorator: 403 JSON unless ``await check(request, signer)`` is true.

    A chain outage while checking is a 503 (the caller may retry), not a 403.
    """

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            signer = request.get(SIGNER)
            if signer is None:
                return _unauthorized("this endpoint needs a signed request")
            try:
                allowed = await check(request, signer)
            except ChainError as exc:
                log.warning("permission check for %s %s failed: %s", request.method, request.path, exc)
                return json_error(503, "chain_unavailable", f"could not check permissions on chain: {exc}")
            if not allowed:
                return json_error(403, "forbidden", f"{signer} is not allowed to {request.method} {request.path}")
            return await handler(request)

        return guarded

    return decorate


def any_of(*checks: Check) -> Check:
    """A check that passes if any of ``checks`` passes (evaluated in order, lazily)."""

    async def check(request: web.Request, signer: str) -> bool:
        for one in checks:
            if await one(request, signer):
                return True
        return False

    return check


def signer_of(request: web.Request) -> str:
    """The verified signer of ``request`` (after the middleware); KeyError if unsigned."""
    return request[SIGNER]


__all__: list[Any] = ["SIGNER", "SignedService", "any_of", "request_path_qs", "require", "signed_request_middleware", "signer_of"]
