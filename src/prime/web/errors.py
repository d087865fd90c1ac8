"""The one error shape of every endpoint, ``{"error": str, "detail": any}``, and the middleware
that turns every failure (ApiError, aiohttp's HTTP exceptions, bad JSON, any exception) into it."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web

from prime.protocol.errors import InvalidJson, ValidationError

log = logging.getLogger("prime.web")


class ErrorBody(msgspec.Struct):
    """Every 4xx/5xx answer: a machine-readable ``error`` name and a ``detail`` (a sentence, an object or null)."""

    error: str
    detail: Any = None


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
    except ValidationError as exc:  # a message the handler decoded (prime.protocol.codec) and did not answer itself
        return json_error(400, "invalid_json" if isinstance(exc, InvalidJson) else "invalid_request", exc.detail)
    except RecursionError:  # JSON nested deeper than the interpreter goes (no handler parses untyped JSON any more)
        log.warning("%s %s: a body nested too deeply", request.method, request.path)
        return json_error(400, "invalid_json", "the body is nested too deeply")
    except asyncio.CancelledError:
        raise  # the client went away or the server is stopping
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal_error", f"{type(exc).__name__}: the server failed on this request; it has been logged")
