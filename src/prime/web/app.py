"""``make_app`` (JSON errors, /health, /metrics, /openapi.json, request metrics) and ``serve`` (through prime.web.server)."""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from prime.errors import PrimeError
from prime.web.errors import error_middleware
from prime.web.health import HealthAnswer, Identity, LoopHealth
from prime.web.keys import APP_NAME, DEFAULT_CLIENT_MAX_SIZE, HEALTH, IDENTITY, METRICS
from prime.web.openapi import Text, api, openapi_json
from prime.web.server import GuardedSite, ServerSettings

# Methods are labels: anything else a client invents is counted as OTHER, so it cannot grow the series.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _metrics_middleware(registry: CollectorRegistry) -> Callable[..., Awaitable[web.StreamResponse]]:
    requests = Counter("prime_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=registry)
    latency = Histogram("prime_http_request_seconds", "Time to answer HTTP requests", ["method", "route"], registry=registry)

    # labels() takes a lock and builds a key each call; a busy master answers thousands of
    # heartbeats a second, so the labelled children are looked up once and kept.
    counted: dict[tuple[str, str, int], Any] = {}
    timed: dict[tuple[str, str], Any] = {}

    @web.middleware
    async def metrics_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        # Label by route template, not the raw path, so /tasks/{id} is one series.
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            method = request.method if request.method in _KNOWN_METHODS else "OTHER"
            counter = counted.get((method, route, status))
            if counter is None:
                counter = counted[(method, route, status)] = requests.labels(method, route, str(status))
            timer = timed.get((method, route))
            if timer is None:
                timer = timed[(method, route)] = latency.labels(method, route)
            counter.inc()
            timer.observe(time.perf_counter() - started)

    return metrics_middleware


@api(response=HealthAnswer, responses={503: HealthAnswer})
async def _health(request: web.Request) -> web.Response:
    """Liveness of this service, its background loops and its dependencies.

    200 when every registered loop has succeeded recently, 503 when one is stale.
    ``dependencies`` names each dependency (the chain RPC) and whether it answers now.
    """
    health = request.app[HEALTH]
    healthy, loops = health.report()
    body: dict[str, Any] = {"status": "ok" if healthy else "stale", "service": request.app[APP_NAME], "loops": loops,
                            "dependencies": health.dependency_report()}
    identity = request.app.get(IDENTITY)
    if identity is not None:
        body["identity"] = {"address": identity.address, "chain_id": identity.chain_id, "registry": identity.registry}
    return web.json_response(body, status=200 if healthy else 503)


@api(response=Text(CONTENT_TYPE_LATEST.split(";")[0], "Prometheus text exposition format"))
async def _metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of this service (text exposition format)."""
    return web.Response(body=generate_latest(request.app[METRICS]), headers={"Content-Type": CONTENT_TYPE_LATEST})


@api(response=dict[str, Any])
async def _openapi(request: web.Request) -> web.Response:
    """This service's HTTP API as an OpenAPI 3.1 document, with request and response schemas."""
    return web.Response(body=openapi_json(request.app), content_type="application/json")


def make_app(
    *,
    name: str,
    middlewares: Iterable[Any] = (),
    client_max_size: int = DEFAULT_CLIENT_MAX_SIZE,
    identity: Identity | None = None,
) -> web.Application:
    """An aiohttp app with JSON errors, /health, /metrics and /openapi.json.

    ``middlewares`` run inside the error handling (so e.g. the signature middleware's
    failures and exceptions are JSON too). Roles register metrics on ``app[METRICS]``.
    ``identity`` (a service that takes signed requests) is published in ``/health``.
    """
    registry = CollectorRegistry(auto_describe=True)
    app = web.Application(
        middlewares=[_metrics_middleware(registry), error_middleware, *middlewares],
        client_max_size=client_max_size,
    )
    app[APP_NAME] = name
    app[HEALTH] = LoopHealth()
    app[METRICS] = registry
    if identity is not None:
        app[IDENTITY] = identity
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    return app


async def serve(app: web.Application, *, host: str, port: int, settings: ServerSettings | None = None) -> web.AppRunner:
    """Start listening; a busy port or a bad address is one sentence, not a traceback.

    Connections get the timeouts, per-peer cap and JSON parser errors of ``settings``
    (``ServerSettings()`` by default; see prime.web.server).
    """
    runner = web.AppRunner(app)
    await runner.setup()
    site = GuardedSite(runner, host, port, settings)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise PrimeError(f"Port {port} on {host} is already in use; stop the other process or choose another port with --port.") from None
        raise PrimeError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); check --host and --port.") from None
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port a started runner listens on (useful after ``port=0``)."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            return server.sockets[0].getsockname()[1]
    raise RuntimeError("the runner has no listening site")
