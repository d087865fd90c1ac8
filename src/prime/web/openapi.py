"""``/openapi.json`` from the route table and what each handler declares with ``@api``.

A handler declares its request body type, its query and path parameters and its answer
per status; the schemas are generated from those types (msgspec Structs, dataclasses,
enums, ``Annotated[..., msgspec.Meta(...)]``) by ``msgspec.json.schema_components`` into
``components/schemas``. Every 4xx/5xx refers to the one error shape (``ErrorBody``).

    @api(request=HeartbeatRequest, response=HeartbeatResponse, errors=(401, 403, 503))
    async def heartbeat(request: web.Request) -> web.Response: ...

    @api(response=NDJSON(LogLine), query={"follow": FLAG, "tail": Param(int, "last N lines")})
    async def logs(request: web.Request) -> web.StreamResponse: ...

``@api`` stores an ``Endpoint`` on the handler (``__prime_api__``); guards built with
``functools.wraps`` (``prime.auth.middleware.require``) carry it along, and a bound method
(which takes no attributes) is wrapped once. A route nobody annotated is still listed,
with its docstring and a ``default`` error answer, as before.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, TypeVar

import msgspec
from aiohttp import web

from prime.web.errors import ErrorBody
from prime.web.keys import APP_NAME

log = logging.getLogger("prime.web")

F = TypeVar("F", bound=Callable[..., Any])

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{name}"
ATTRIBUTE = "__prime_api__"
JSON = "application/json"
_METHODS = ("get", "post", "put", "delete", "patch", "options")


# --- what a handler declares ------------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    """A body that is not one JSON value of a type: NDJSON lines, raw bytes, text.

    ``schema`` is a type (its schema is generated) or None; ``raw_schema`` a ready JSON schema.
    """

    media_type: str
    schema: Any = None
    raw_schema: Mapping[str, Any] | None = None
    description: str = ""


def NDJSON(line: Any, description: str = "") -> Content:  # noqa: N802 - reads like a type
    """A stream of JSON objects, one ``line`` per line (``application/x-ndjson``)."""
    return Content("application/x-ndjson", line, None, description or "one JSON object per line (the schema is one line's)")


def Binary(media_type: str = "application/octet-stream", description: str = "") -> Content:  # noqa: N802
    """Raw bytes."""
    return Content(media_type, None, {"type": "string", "contentMediaType": media_type}, description or "raw bytes")


def Text(media_type: str = "text/plain", description: str = "") -> Content:  # noqa: N802
    """Text that is not JSON (e.g. Prometheus metrics)."""
    return Content(media_type, None, {"type": "string"}, description or "text")


@dataclass(frozen=True)
class Param:
    """A query or path parameter: its type (as it reads once parsed), a description, required or
    not, and for numbers the bounds ``ge``/``le`` (``Annotated[int, Meta(...)]`` works as well)."""

    type: Any = str
    description: str = ""
    required: bool = False
    ge: float | None = None
    le: float | None = None

    @property
    def schema_type(self) -> Any:
        if self.ge is None and self.le is None:
            return self.type
        return Annotated[self.type, msgspec.Meta(ge=self.ge, le=self.le)]


# A 0/1 switch in a query string (the handlers also accept true/false/yes/no).
FLAG = Param(bool, "0 or 1 (also true/false, yes/no)")

MAX_INT_DIGITS = 20  # more digits than any bound a query parameter has (int() of 5,000 digits is slow, then refused)


def ascii_int(raw: str, *, minimum: int = 0, maximum: int) -> int | None:
    """``raw`` (a query or path parameter) as a whole number from ``minimum`` to ``maximum``, or None.

    ASCII digits only: ``str.isdigit`` also takes "²" (which ``int`` refuses: a 500) and "١٢"
    (which ``int`` reads as 12); no sign, no spaces, at most ``MAX_INT_DIGITS`` digits.
    """
    if not raw or len(raw) > MAX_INT_DIGITS or not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if minimum <= value <= maximum else None


@dataclass(frozen=True)
class Endpoint:
    """What ``@api`` stored on a handler."""

    request: Any = None
    request_media_type: str = JSON
    responses: Mapping[int, Any] = field(default_factory=dict)  # status -> type | Content | None (no body)
    errors: tuple[int, ...] = ()
    query: Mapping[str, Param] = field(default_factory=dict)
    path: Mapping[str, Param] = field(default_factory=dict)
    summary: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def success(self) -> list[int]:
        return sorted(s for s in self.responses if s < 400)


def _param(value: Any) -> Param:
    return value if isinstance(value, Param) else Param(value)


def api(
    *,
    request: Any = None,
    response: Any = None,
    status: int = 200,
    responses: Mapping[int, Any] | None = None,
    errors: Iterable[int] = (),
    query: Mapping[str, Any] | None = None,
    path: Mapping[str, Any] | None = None,
    request_media_type: str = JSON,
    summary: str | None = None,
    description: str | None = None,
    tags: Iterable[str] = (),
) -> Callable[[F], F]:
    """Declare a handler's request body, parameters and answers for ``/openapi.json``.

    - ``request``: the JSON body's type (None: the route takes no body).
    - ``response``/``status``: the answer on success (a type, a ``Content`` such as
      ``NDJSON(Line)``/``Binary()``/``Text()``, or None for no body), 200 unless ``status``.
    - ``responses``: further statuses, each with its type (e.g. ``{503: HealthAnswer}``).
    - ``errors``: the 4xx/5xx statuses the handler answers, each with the ``ErrorBody`` shape
      (500 is always listed; 400 and 413 too when there is a body; 401 marks the route signed).
    - ``query``/``path``: parameter name -> type or ``Param`` (path parameters not named are
      strings, taken from the route).
    Nothing changes at run time: the handler is returned as it is (a bound method, which
    takes no attributes, is wrapped once).
    """
    table: dict[int, Any] = {}
    if response is not None or not responses:
        table[status] = response
    table.update(responses or {})
    endpoint = Endpoint(
        request=request,
        request_media_type=request_media_type,
        responses=table,
        errors=tuple(sorted(set(errors))),
        query={k: _param(v) for k, v in (query or {}).items()},
        path={k: _param(v) for k, v in (path or {}).items()},
        summary=summary,
        description=description,
        tags=tuple(tags),
    )

    def decorate(handler: F) -> F:
        try:
            setattr(handler, ATTRIBUTE, endpoint)
            return handler
        except AttributeError:  # a bound method
            pass

        @functools.wraps(handler)
        async def described(req: web.Request) -> web.StreamResponse:
            return await handler(req)

        setattr(described, ATTRIBUTE, endpoint)
        return described  # type: ignore[return-value]

    return decorate


def endpoint_of(handler: Any) -> Endpoint | None:
    """The ``Endpoint`` declared on a handler, looking through ``functools.wraps`` wrappers."""
    seen: set[int] = set()
    while handler is not None and id(handler) not in seen:
        seen.add(id(handler))
        found = getattr(handler, ATTRIBUTE, None)
        if isinstance(found, Endpoint):
            return found
        handler = getattr(handler, "__wrapped__", None)
    return None


# --- schemas ---------------------------------------------------------------------------------


class _Schemas:
    """Collects the types of every route, then generates their schemas in one go."""

    def __init__(self) -> None:
        self._types: list[Any] = [ErrorBody]
        self._done: list[dict[str, Any]] | None = None
        self.components: dict[str, Any] = {}

    def add(self, tp: Any) -> int:
        for i, known in enumerate(self._types):
            if known is tp or _same(known, tp):
                return i
        self._types.append(tp)
        return len(self._types) - 1

    def generate(self) -> None:
        try:
            schemas, components = msgspec.json.schema_components(self._types, ref_template=REF_TEMPLATE)
            self._done, self.components = [dict(s) for s in schemas], dict(components)
            return
        except Exception as exc:  # one unsupported type must not lose every schema
            log.debug("schema generation of all types at once failed (%s); one by one", exc)
        self._done = []
        for tp in self._types:
            try:
                (schema,), components = msgspec.json.schema_components([tp], ref_template=REF_TEMPLATE)
            except Exception as exc:
                log.warning("no JSON schema for %r: %s", tp, exc)
                schema, components = {}, {}
            self._done.append(dict(schema))
            self.components.update(components)

    def __getitem__(self, index: int) -> dict[str, Any]:
        assert self._done is not None, "generate() first"
        return self._done[index]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _media(schemas: _Schemas, body: Any, index: dict[int, int]) -> dict[str, Any]:
    """The ``content`` map of one body declaration (a type or a ``Content``)."""
    if isinstance(body, Content):
        entry: dict[str, Any] = {}
        if body.raw_schema is not None:
            entry["schema"] = dict(body.raw_schema)
        elif body.schema is not None:
            entry["schema"] = schemas[index[id(body)]]
        return {body.media_type: entry}
    return {JSON: {"schema": schemas[index[id(body)]]}}


def _collect(schemas: _Schemas, body: Any, index: dict[int, int]) -> None:
    if body is None:
        return
    if isinstance(body, Content):
        if body.raw_schema is None and body.schema is not None:
            index[id(body)] = schemas.add(body.schema)
        return
    index[id(body)] = schemas.add(body)


# --- the document ----------------------------------------------------------------------------


def _doc_parts(handler: Any) -> tuple[str, str]:
    doc = inspect.getdoc(handler) or ""
    first, _, rest = doc.partition("\n")
    return first.strip(), rest.strip()


def _error_answer(status: int) -> dict[str, Any]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return {"description": phrase, "content": {JSON: {"schema": {"$ref": REF_TEMPLATE.format(name="ErrorBody")}}}}


def _success_description(status: int, body: Any) -> str:
    if isinstance(body, Content) and body.description:
        return body.description
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Success"


@dataclass
class _Route:
    path: str
    methods: list[str]
    handler: Any
    params: list[str]
    endpoint: Endpoint | None


def _routes(app: web.Application) -> list[_Route]:
    found: list[_Route] = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method == "HEAD":
            continue  # aiohttp adds HEAD next to every GET
        info = resource.get_info()
        path = info.get("formatter") or info.get("path") or resource.canonical
        pattern = info.get("pattern")
        params = list(pattern.groupindex) if pattern is not None else []
        methods = list(_METHODS) if route.method == "*" else [route.method.lower()]
        found.append(_Route(path, methods, route.handler, params, endpoint_of(route.handler)))
    return found


# What the path segments of that name must look like wherever a route uses them (the handlers
# check the same rules: prime.protocol's ADDRESS_RE, TASK_ID_RE, SHA256_RE, discovery's run id).
PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "address": {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
    "run_id": {"type": "string", "pattern": "^[0-9]{1,19}$"},
    "task_id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
    "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}


def _operation(route: _Route, op_id: str, schemas: _Schemas, index: dict[int, int]) -> dict[str, Any]:
    summary, description = _doc_parts(route.handler)
    ep = route.endpoint
    if ep is not None:
        summary = ep.summary if ep.summary is not None else summary
        description = ep.description if ep.description is not None else description
    operation: dict[str, Any] = {"operationId": op_id, "summary": summary}
    if description:
        operation["description"] = description
    parameters: list[dict[str, Any]] = []
    for name in route.params:
        declared = ep.path.get(name) if ep is not None else None
        schema = schemas[index[id(declared)]] if declared is not None else dict(PATH_SCHEMAS.get(name, {"type": "string"}))
        param: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": schema}
        if declared is not None and declared.description:
            param["description"] = declared.description
        parameters.append(param)
    if ep is None:
        if parameters:
            operation["parameters"] = parameters
        operation["responses"] = {"default": {
            "description": 'JSON; errors are {"error": str, "detail": any}',
            "content": {JSON: {"schema": {"$ref": REF_TEMPLATE.format(name="ErrorBody")}}},
        }}
        return operation
    if ep.tags:
        operation["tags"] = list(ep.tags)
    for name, declared in ep.query.items():
        param = {"name": name, "in": "query", "required": declared.required, "schema": schemas[index[id(declared)]]}
        if declared.description:
            param["description"] = declared.description
        parameters.append(param)
    if parameters:
        operation["parameters"] = parameters
    if ep.request is not None:
        content = _media(schemas, ep.request, index)
        if not isinstance(ep.request, Content):
            content = {ep.request_media_type: content[JSON]}
        operation["requestBody"] = {"required": True, "content": content}
    responses: dict[str, Any] = {}
    for status in sorted(ep.responses):
        body = ep.responses[status]
        answer: dict[str, Any] = {"description": _success_description(status, body)}
        if body is not None:
            answer["content"] = _media(schemas, body, index)
        responses[str(status)] = answer
    errors = set(ep.errors) | {500}
    if ep.request is not None:
        errors |= {400, 413}
    for status in sorted(errors - set(ep.responses)):
        responses[str(status)] = _error_answer(status)
    operation["responses"] = responses
    if 401 in errors:
        operation["security"] = [{"primeSignature": []}]
    return operation


def openapi_document(app: web.Application) -> dict[str, Any]:
    """OpenAPI 3.1 of ``app``: every route, with request and response schemas where declared."""
    routes = _routes(app)
    schemas = _Schemas()
    index: dict[int, int] = {}
    for route in routes:
        ep = route.endpoint
        if ep is None:
            continue
        _collect(schemas, ep.request, index)
        for body in ep.responses.values():
            _collect(schemas, body, index)
        for declared in (*ep.query.values(), *ep.path.values()):
            index[id(declared)] = schemas.add(declared.schema_type)
    schemas.generate()

    paths: dict[str, dict[str, Any]] = {}
    used_ids: set[str] = set()
    for route in routes:
        base_id = getattr(route.handler, "__name__", "handler").strip("_") or "handler"
        op_id, n = base_id, 2
        while op_id in used_ids:
            op_id, n = f"{base_id}_{n}", n + 1
        used_ids.add(op_id)
        operation = _operation(route, op_id, schemas, index)
        for method in route.methods:
            paths.setdefault(route.path, {})[method] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": f"prime {app[APP_NAME]}", "version": _version()},
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                "primeSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Prime-Signature",
                    "description": "EIP-191 signature with X-Prime-Address, X-Prime-Timestamp and X-Prime-Nonce; see docs/protocol.md.",
                }
            },
        },
        "paths": paths,
    }


def openapi_json(app: web.Application) -> bytes:
    """The document as JSON bytes (defaults of any type msgspec knows are encoded too)."""
    return msgspec.json.encode(openapi_document(app))


@functools.lru_cache(maxsize=1)
def _version() -> str:
    try:
        from importlib.metadata import version

        return version("prime")
    except Exception:
        return "0"
