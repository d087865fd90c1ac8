"""Shared aiohttp pieces every role's HTTP service is built from.

- ``make_app``: an ``aiohttp`` application whose every error is JSON
  ``{"error": ..., "detail": ...}`` (an unexpected exception is a logged 500 and the
  service stays up), with ``GET /health`` (liveness of the background loops),
  ``GET /metrics`` (Prometheus text, one registry per app) and ``GET /openapi.json``
  (built from the route table and the handlers' docstrings).
- ``read_json``/``decode``: a request body into a dataclass, with type checks that name
  the offending field (400) and the app's body limit (413).
- ``LoopHealth``/``add_loop``: background loops that tick, back off on errors and show
  up in ``/health``.
- ``serve``: listen on host:port with a one-sentence error if the port is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import inspect
import json
import logging
import random
import time
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypeVar, Union

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from prime.errors import PrimeError

log = logging.getLogger(__name__)

T = TypeVar("T")

APP_NAME = web.AppKey("prime.name", str)
HEALTH = web.AppKey("prime.health", "LoopHealth")
METRICS = web.AppKey("prime.metrics", CollectorRegistry)
DEFAULT_CLIENT_MAX_SIZE = 64 * 1024


# --- JSON errors --------------------------------------------------------------------------


def json_error(status: int, error: str, detail: Any = None, *, headers: Mapping[str, str] | None = None) -> web.Response:
    """The one error shape of every endpoint: ``{"error": error, "detail": detail}``."""
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


class ApiError(Exception):
    """Raise from a handler (or anything it calls) to answer ``json_error(status, error, detail)``."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def _error_name(reason: str) -> str:
    return reason.strip().lower().replace(" ", "_").replace("-", "_").replace("'", "")


def _from_http_exception(exc: web.HTTPException) -> web.StreamResponse:
    if exc.status < 400 or (exc.content_type == "application/json" and exc.body):
        return exc  # redirects, or an error some handler already shaped as JSON
    text = exc.text or ""
    default_text = f"{exc.status}: {exc.reason}"
    detail = None if text in ("", default_text) else text
    keep = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    return json_error(exc.status, _error_name(exc.reason), detail, headers=keep)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every failure becomes JSON; nothing a client sends can take the service down."""
    try:
        return await handler(request)
    except ApiError as exc:
        return json_error(exc.status, exc.error, exc.detail)
    except web.HTTPException as exc:
        return _from_http_exception(exc)
    except json.JSONDecodeError as exc:  # a handler calling request.json() on a bad body
        return json_error(400, "invalid_json", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except asyncio.CancelledError:
        raise  # the client went away or the server is stopping
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal_error", f"{type(exc).__name__}: the server failed on this request; it has been logged")


# --- decoding request bodies into dataclasses ------------------------------------------------


class ValidationError(Exception):
    """A JSON value does not fit the expected type; ``where`` names the field (``a.b[2].c``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where or 'body'}: {message}")
        self.where = where or "body"
        self.message = message


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean (true/false)", type(None): "null"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return "a list"
    if origin in (dict, Mapping) or tp is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(json.dumps(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@functools.lru_cache(maxsize=256)
def _dataclass_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _wrong(where: str, tp: Any, value: Any) -> ValidationError:
    return ValidationError(where, f"must be {_describe(tp)}, not {_kind(value)}")


def _decode(tp: Any, value: Any, where: str) -> Any:
    if tp is Any or tp is object:
        return value
    if tp is type(None) or tp is None:
        if value is not None:
            raise _wrong(where, type(None), value)
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _decode(args[0], value, where)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _wrong(where, tp, value)
        for option in (a for a in args if a is not type(None)):
            try:
                return _decode(option, value, where)
            except ValidationError:
                continue
        raise _wrong(where, tp, value)
    if origin is Literal:
        # `True == 1` in Python: compare types too so 1 does not pass for true.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValidationError(where, f"must be {_describe(tp)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise _wrong(where, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(where, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(where, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _wrong(where, tp, value)
        return value
    if tp in (list, Sequence) or origin in (list, Sequence):
        if not isinstance(value, list):
            raise _wrong(where, tp, value)
        item = args[0] if args else Any
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is tuple or origin is tuple:
        if not isinstance(value, list):
            raise _wrong(where, tp, value)
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            return tuple(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValidationError(where, f"must be a list of {len(args)} items, not {len(value)}")
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp in (dict, Mapping) or origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise _wrong(where, tp, value)
        value_type = args[1] if len(args) == 2 else Any
        return {k: _decode(value_type, v, f"{where}.{k}" if where else k) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _decode_dataclass(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        if isinstance(value, bool):
            raise ValidationError(where, f"must be {_describe(tp)}")
        try:
            return tp(value)
        except ValueError:
            raise ValidationError(where, f"must be {_describe(tp)}") from None
    raise TypeError(f"decode() does not support the type {tp!r} (field {where or 'body'})")


def _decode_dataclass(cls: type[T], value: Any, where: str) -> T:
    if not isinstance(value, dict):
        raise ValidationError(where, f"must be a JSON object, not {_kind(value)}")
    hints = _dataclass_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = f"{where}.{f.name}" if where else f.name
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValidationError(name, "is required")
            continue
        kwargs[f.name] = _decode(hints.get(f.name, Any), value[f.name], name)
    # Unknown fields are ignored: a newer peer may send more than this version knows.
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # checks in __post_init__
        raise ValidationError(where, str(exc)) from None


def decode(cls: type[T], data: Any) -> T:
    """``data`` (parsed JSON) as an instance of ``cls`` (a dataclass or any supported type).

    Supports int (never bool), float, str, bool, None, Any, Optional/Union, Literal, Enum,
    list/tuple/dict, and nested dataclasses. Raises ValidationError naming the field.
    """
    return _decode(cls, data, "")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every request: json.loads with options builds a new one per call.
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


async def read_json(request: web.Request, cls: type[T]) -> T:
    """The request body decoded into ``cls``; 400 (naming the field) or 413 otherwise."""
    body = await request.read()  # raises 413 past the app's client_max_size
    if not body.strip():
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        data = _JSON_DECODER.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", str(exc)) from None
    if cls is dict:  # the common case of handlers that validate the object themselves
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_body", f"body: must be an object, not {_kind(data)}")
        return data  # type: ignore[return-value]
    try:
        return decode(cls, data)
    except ValidationError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None


def to_json(value: Any) -> Any:
    """A dataclass (or nested structure of them, enums, bytes) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


# --- loop liveness ---------------------------------------------------------------------------


@dataclass
class LoopState:
    name: str
    stale_after_s: float
    last_ok: float  # monotonic time of the last successful iteration (registration at first)
    runs: int = 0
    failures: int = 0  # consecutive
    last_error: str | None = None


@dataclass
class LoopHealth:
    """Background loops tick here; a loop silent for longer than its ``stale_after_s`` is stale."""

    clock: Callable[[], float] = time.monotonic
    loops: dict[str, LoopState] = field(default_factory=dict)

    def register(self, name: str, stale_after_s: float) -> None:
        self.loops[name] = LoopState(name, stale_after_s, self.clock())

    def tick(self, name: str) -> None:
        """One successful iteration of loop ``name``."""
        state = self.loops.get(name)
        if state is None:
            raise KeyError(f"loop {name!r} was never registered")
        state.last_ok = self.clock()
        state.runs += 1
        state.failures = 0
        state.last_error = None

    def failed(self, name: str, error: str) -> None:
        state = self.loops[name]
        state.failures += 1
        state.last_error = error

    def unregister(self, name: str) -> None:
        self.loops.pop(name, None)

    def report(self) -> tuple[bool, dict[str, Any]]:
        now = self.clock()
        loops: dict[str, Any] = {}
        healthy = True
        for state in self.loops.values():
            age = now - state.last_ok
            ok = age <= state.stale_after_s
            healthy &= ok
            loops[state.name] = {
                "ok": ok,
                "seconds_since_success": round(age, 3),
                "stale_after_s": state.stale_after_s,
                "runs": state.runs,
                "consecutive_failures": state.failures,
                "last_error": state.last_error,
            }
        return healthy, loops


def add_loop(
    app: web.Application,
    name: str,
    step: Callable[[], Awaitable[Any]],
    *,
    interval_s: float,
    stale_after_s: float | None = None,
    max_backoff_s: float = 60.0,
) -> None:
    """Run ``await step()`` every ``interval_s`` while the app runs; ticks ``/health``.

    A failing step is logged and retried with exponential backoff (plus jitter); it never
    ends the loop. The loop is stale (``/health`` 503) after ``stale_after_s`` without a
    successful step (default: three intervals plus 10 s).
    """
    health = app[HEALTH]
    stale = stale_after_s if stale_after_s is not None else 3 * interval_s + 10.0

    async def run() -> None:
        failures = 0
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                health.failed(name, f"{type(exc).__name__}: {exc}")
                if failures == 1:
                    log.exception("loop %s failed; retrying with backoff", name)
                else:
                    log.warning("loop %s failed again (%d in a row): %s", name, failures, exc)
                delay = min(interval_s * 2 ** min(failures, 16), max(max_backoff_s, interval_s))
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                continue
            failures = 0
            health.tick(name)
            await asyncio.sleep(interval_s)

    async def lifecycle(app: web.Application):  # type: ignore[no-untyped-def]
        health.register(name, stale)
        task = asyncio.create_task(run(), name=f"{app[APP_NAME]}:{name}")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        health.unregister(name)

    app.cleanup_ctx.append(lifecycle)


# --- OpenAPI from the route table -------------------------------------------------------------


def _doc_parts(handler: Any) -> tuple[str, str]:
    doc = inspect.getdoc(handler) or ""
    first, _, rest = doc.partition("\n")
    return first.strip(), rest.strip()


def openapi_document(app: web.Application) -> dict[str, Any]:
    """OpenAPI 3 paths from ``app.router``: summary = the handler docstring's first line."""
    paths: dict[str, dict[str, Any]] = {}
    used_ids: set[str] = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":
            continue  # aiohttp adds HEAD next to every GET
        info = resource.get_info()
        path = info.get("formatter") or info.get("path") or resource.canonical
        pattern = info.get("pattern")
        params = list(pattern.groupindex) if pattern is not None else []
        summary, description = _doc_parts(route.handler)
        base_id = getattr(route.handler, "__name__", "handler").strip("_") or "handler"
        op_id, n = base_id, 2
        while op_id in used_ids:
            op_id, n = f"{base_id}_{n}", n + 1
        used_ids.add(op_id)
        operation: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "responses": {
                "default": {"description": 'JSON; errors are {"error": str, "detail": any}'},
            },
        }
        if description:
            operation["description"] = description
        if params:
            operation["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
        methods = ["get", "post", "put", "delete", "patch", "options"] if route.method == "*" else [route.method.lower()]
        for method in methods:
            paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": f"prime {app[APP_NAME]}", "version": _version()},
        "components": {
            "securitySchemes": {
                "primeSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Prime-Signature",
                    "description": "EIP-191 signature with X-Prime-Address, X-Prime-Timestamp and X-Prime-Nonce; see docs/protocol.md.",
                }
            }
        },
        "paths": paths,
    }


@functools.lru_cache(maxsize=1)
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("prime")
    except Exception:
        return "0"


# --- the app ----------------------------------------------------------------------------------


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


async def _health(request: web.Request) -> web.Response:
    """Liveness of this service and its background loops.

    200 when every registered loop has succeeded recently, 503 when one is stale.
    """
    healthy, loops = request.app[HEALTH].report()
    body = {"status": "ok" if healthy else "stale", "service": request.app[APP_NAME], "loops": loops}
    return web.json_response(body, status=200 if healthy else 503)


async def _metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of this service (text exposition format)."""
    return web.Response(body=generate_latest(request.app[METRICS]), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _openapi(request: web.Request) -> web.Response:
    """This service's HTTP API as an OpenAPI 3 document."""
    return web.json_response(openapi_document(request.app))


def make_app(*, name: str, middlewares: Iterable[Any] = (), client_max_size: int = DEFAULT_CLIENT_MAX_SIZE) -> web.Application:
    """An aiohttp app with JSON errors, /health, /metrics and /openapi.json.

    ``middlewares`` run inside the error handling (so e.g. the signature middleware's
    failures and exceptions are JSON too). Roles register metrics on ``app[METRICS]``.
    """
    registry = CollectorRegistry(auto_describe=True)
    app = web.Application(
        middlewares=[_metrics_middleware(registry), error_middleware, *middlewares],
        client_max_size=client_max_size,
    )
    app[APP_NAME] = name
    app[HEALTH] = LoopHealth()
    app[METRICS] = registry
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/openapi.json", _openapi)
    return app


async def serve(app: web.Application, *, host: str, port: int) -> web.AppRunner:
    """Start listening; a busy port or a bad address is one sentence, not a traceback."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
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
