"""A request body into a dataclass: ``read_json``/``decode`` with type checks that name the
offending field (400) and the app's body limit (413); ``to_json`` for the way back."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Literal, TypeVar, Union

from aiohttp import web

from prime.web.errors import ApiError

T = TypeVar("T")


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


def _decode_dataclass(cls: Any, value: Any, where: str) -> Any:
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
