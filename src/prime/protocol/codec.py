"""Decoding and encoding of wire messages (msgspec), and the one validation error.

Every message is a ``msgspec.Struct`` whose annotations (types plus ``Meta`` constraints) are
at once its validation and its JSON schema. ``decode`` takes raw bytes (one cached decoder per
type: the fast path of every route) or already-parsed JSON (``msgspec.convert``), and turns
msgspec's errors into ``ValidationError`` naming the field (``tasks[0].id``), so the HTTP layer
can answer ``400 {"error": "invalid_request", "detail": err.detail}``.

Why msgspec: decoding a typical heartbeat is ~10x faster than the hand-written readers it
replaced, it refuses unknown fields, wrong types, out-of-range and non-finite numbers and
over-long strings and lists while parsing, and it generates the OpenAPI schemas.

Bounds (every body read from a peer, server or client side, goes through here):

- Bytes: the caller bounds the body before it gets here (the app's ``client_max_size`` on
  servers, 413; ``SignedClient``'s ``max_response_bytes`` or ``read_bounded`` on clients).
- Nesting depth: a typed decode (``decode``) can only nest as deep as its type does (a
  message's structs, lists and dicts), so it refuses a deeper body at its first wrong token,
  without recursing. An untyped parse (``parse``: JSON of unknown shape, e.g. a log line) is
  refused past ``MAX_DEPTH`` levels before it is parsed, by ``deeper_than``: a C-speed scan
  (escapes and strings dropped, brackets kept, innermost pairs removed ``MAX_DEPTH`` times).
  prime/__init__.py also undoes py_ecc's recursion limit of 100,000, with which deep JSON
  overflows the C stack (SIGSEGV) instead of raising; a ``RecursionError`` still left is a
  ``ValidationError`` here.
- Numbers: every numeric field of the protocol has ``Meta(ge=, le=)`` bounds (floats finite),
  so a 401-digit integer in a float field or a 5,000-digit one in an int field is "Is out of
  range", never an ``OverflowError``.
- Text: msgspec refuses invalid UTF-8 and lone UTF-16 surrogates (``"\\ud800"``) while parsing;
  already-parsed data (``decode`` of Python values, e.g. from ``json.loads``) is encoded once
  after it is converted, so a str holding a lone surrogate (which SQLite, Docker and every
  UTF-8 writer refuse) is refused here too.

Every failure is one ``ValidationError`` (``InvalidJson`` for bytes that are not JSON at all).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from prime.protocol.errors import InvalidJson, ValidationError

__all__ = ["MAX_DEPTH", "NO_NUL", "Answer", "InvalidJson", "Message", "ValidationError", "decode", "decoder",
           "deeper_than", "encode", "from_msgspec", "parse", "to_builtins"]

T = TypeVar("T")

# A string with no NUL character: every text field of the protocol carries this pattern.
NO_NUL = r"^[^\x00]*$"

# How deep an untyped parse (``parse``) may nest arrays and objects; no message of the
# protocol nests deeper than about 8.
MAX_DEPTH = 64

_ESCAPE = re.compile(rb"\\.", re.S)
_STRING = re.compile(rb'"[^"]*"')
_BRACKETS = bytes.maketrans(b"[]{}", b"()()")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def deeper_than(data: bytes | bytearray | memoryview, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON ``data`` nests arrays/objects more than ``limit`` levels deep.

    Cheap and without recursion: escapes, then strings, are dropped, the brackets left are
    the structure, and each pass removes every innermost pair (one level); a structure still
    there after ``limit`` passes is deeper. Malformed bytes are left to the parser to refuse.
    """
    raw = bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    shape = _STRING.sub(b"", _ESCAPE.sub(b"", raw)).translate(_BRACKETS, _NOT_BRACKET)
    if b"(" * (limit + 1) in shape:
        return True
    for _ in range(limit):
        fewer = shape.replace(b"()", b"")
        if len(fewer) == len(shape):
            return False
        shape = fewer
    return b"()" in shape


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?:key in )?(?P<path>[^`]*)`)?$", re.S)
_KEY_AT = re.compile(r"^(?P<msg>.*?) - at `key` in `(?P<path>[^`]*)`$", re.S)
_CHECK_AT = re.compile(r"^(?P<msg>.*) \(at (?P<name>[^()]*)\)$", re.S)
_NAMED = re.compile(r"^Object (?:missing required|contains unknown) field `(?P<name>[^`]*)`$")


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if not name:
        return prefix
    return f"{prefix}{name}" if name.startswith("[") else f"{prefix}.{name}"


_KINDS = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false",
          "array": "a list", "object": "an object", "null": "null"}
_PLAIN: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [  # msgspec's phrasing -> one plain sentence
    (re.compile(r"^Expected `str` of length >= 1$"), lambda m: "Must not be empty"),
    (re.compile(r"^Expected `str` of length <= (\d+)$"), lambda m: f"Must be at most {m[1]} characters long"),
    (re.compile(r"^Expected `array` of length <= (\d+)$"), lambda m: f"Must have at most {m[1]} items"),
    (re.compile(r"^Expected `object` of length <= (\d+)$"), lambda m: f"Must have at most {m[1]} entries"),
    (re.compile(r"^Expected `\w+` >= (\S+)$"), lambda m: f"Must be at least {m[1]}"),
    (re.compile(r"^Expected `\w+` <= (\S+)$"), lambda m: f"Must be at most {m[1]}"),
    (re.compile(r"^Expected `\w+` > (\S+)$"), lambda m: f"Must be more than {m[1]}"),
    (re.compile(r"^Expected `\w+` < (\S+)$"), lambda m: f"Must be less than {m[1]}"),
    (re.compile(r"^Expected `str` matching regex '\^\[\^\\\\x00\]\*\$'$"), lambda m: "Must not contain NUL characters"),
    (re.compile(r"^Expected `([\w |]+)`, got `(\w+)`$"),
     lambda m: f"Must be {' or '.join(_KINDS.get(k.strip(), k.strip()) for k in m[1].split('|'))}, not {_KINDS.get(m[2], m[2])}"),
    (re.compile(r"^Invalid enum value (.*)$"), lambda m: f"{m[1]} is not one of the allowed values"),
    (re.compile(r"^(?:Integer value|Number) out of range$"), lambda m: "Is out of range"),
]


def _sentence(text: str) -> str:
    text = text.strip()
    for pattern, plain in _PLAIN:
        match = pattern.match(text)
        if match:
            text = plain(match)
            break
    text = text.replace("`", "'")
    if not text:
        return "Is not valid."
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def from_msgspec(exc: Exception, prefix: str = "") -> ValidationError:
    """msgspec's ``Expected `int`, got `str` - at `$.tasks[0].replica``` as field + sentence."""
    text = str(exc)
    match = _KEY_AT.match(text) or _AT.match(text)
    assert match is not None  # the pattern matches any text
    message = match.group("msg")
    path = (match.group("path") or "$").removeprefix("$").removeprefix(".").replace("[...]", "")
    field = _join(prefix, path)
    named = _NAMED.match(message)
    if named:
        field = _join(field, named.group("name"))
        message = "Is required." if "missing" in message else "Is not a known field; check its spelling."
    at = _CHECK_AT.match(message)
    if at:  # a __post_init__ check naming its field: "... (at command)"
        field, message = _join(path and field or prefix, at.group("name")), at.group("msg")
    return ValidationError(field or "body", _sentence(message))


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def decoder(tp: type[T]) -> msgspec.json.Decoder[T]:
    """The one JSON decoder of ``tp`` (building one costs more than decoding a small message)."""
    found = _decoders.get(tp)
    if found is None:
        found = _decoders[tp] = msgspec.json.Decoder(tp)
    return found


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _not_json(exc: msgspec.DecodeError, data: Any, prefix: str) -> InvalidJson:
    text = str(exc)
    if ("truncated" in text or "surrogate" in text) and isinstance(data, (bytes, bytearray, memoryview)) \
            and _SURROGATE_ESCAPE.search(data):
        # msgspec calls a lone "\ud800" "truncated": say what it is
        return InvalidJson(prefix or "body", "Is not valid JSON (a string holds a lone UTF-16 surrogate, which is no character).")
    return InvalidJson(prefix or "body", f"Is not valid JSON ({text}).")


def _too_deep(prefix: str) -> ValidationError:
    return ValidationError(prefix or "body", f"Is nested too deeply (at most {MAX_DEPTH} levels of arrays and objects).")


def decode(data: Any, tp: type[T], prefix: str = "") -> T:
    """``data`` as a ``tp``: raw JSON bytes/str, or JSON already parsed into Python values.

    Parsed values are converted (``msgspec.convert``, strict), then encoded once to refuse a
    str holding a lone surrogate, which convert lets through and no UTF-8 writer takes."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview, str)):
            return decoder(tp).decode(data)
        value = msgspec.convert(data, tp, strict=True)
        try:
            _encoder.encode(value)
        except UnicodeEncodeError:
            raise ValidationError(prefix or "body", "Must not hold a lone UTF-16 surrogate (no character).") from None
        return value
    except msgspec.ValidationError as exc:
        raise from_msgspec(exc, prefix) from None
    except msgspec.DecodeError as exc:
        raise _not_json(exc, data, prefix) from None
    except RecursionError:
        raise _too_deep(prefix) from None
    except UnicodeEncodeError:  # a check of a converted str (a pattern, a length in bytes)
        raise ValidationError(prefix or "body", "Must not hold a lone UTF-16 surrogate (no character).") from None


def parse(data: bytes | bytearray | memoryview | str, prefix: str = "") -> Any:
    """JSON of no particular shape (dicts, lists, str, int, float, bool, None) from a peer's
    bytes: refused past ``MAX_DEPTH`` levels before it is parsed, and like ``decode`` for the
    rest (invalid UTF-8, lone surrogates, NaN). ``InvalidJson`` / ``ValidationError`` otherwise."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if deeper_than(raw):
        raise _too_deep(prefix)
    try:
        return _plain.decode(raw)
    except msgspec.DecodeError as exc:
        raise _not_json(exc, raw, prefix) from None
    except RecursionError:
        raise _too_deep(prefix) from None


_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    """A message (or plain data holding messages) as compact JSON bytes."""
    return _encoder.encode(value)


_plain = msgspec.json.Decoder()


def to_builtins(value: Any) -> Any:
    """A message as plain JSON data (dicts, lists, str, int, float, bool, None: never tuples)."""
    return _plain.decode(_encoder.encode(value))


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of the protocol's immutable messages: ``from_json`` decodes strictly, ``to_json`` encodes."""

    @classmethod
    def from_json(cls: type[T], data: Any, prefix: str = "") -> T:
        return decode(data, cls, prefix)

    def to_json(self) -> dict[str, Any]:
        return to_builtins(self)  # type: ignore[no-any-return]


class Answer(msgspec.Struct, frozen=True):
    """Base of answers a client reads from a peer: like ``Message``, but fields a newer peer adds
    are ignored, so an older client can still read it."""

    @classmethod
    def from_json(cls: type[T], data: Any, prefix: str = "") -> T:
        return decode(data, cls, prefix)

    def to_json(self) -> dict[str, Any]:
        return to_builtins(self)  # type: ignore[no-any-return]
