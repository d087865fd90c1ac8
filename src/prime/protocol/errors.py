"""Validation errors of wire messages (and, until msgspec replaces them, the strict readers)."""
from __future__ import annotations

import math
import re
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from prime.chain.types import NodeStatus, Specs
from prime.errors import PrimeError

class ValidationError(PrimeError):
    """Bad input: ``field`` names what is wrong (dotted/indexed path), ``message`` is one sentence."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    @property
    def detail(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


# --- small strict readers (JSON values come in as Any) ---------------------------------------


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(field, "Must be a JSON object.")
    for key in value:
        if not isinstance(key, str):
            raise ValidationError(field, "Object keys must be strings.")
    return value


def _no_unknown(data: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    for key in data:
        if key not in allowed:
            name = f"{prefix}.{key}" if prefix else key
            raise ValidationError(name, "Is not a known field; check its spelling.")


def _required(data: Mapping[str, Any], key: str, prefix: str) -> Any:
    if key not in data:
        raise ValidationError(_join(prefix, key), "Is required.")
    return data[key]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _int(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    # bool is an int in Python; JSON true is never a number here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, "Must be a whole number.")
    if minimum is not None and value < minimum:
        raise ValidationError(field, f"Must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValidationError(field, f"Must be at most {maximum}, got {value}.")
    return value


def _optional_int(value: Any, field: str, **bounds: int) -> int | None:
    return None if value is None else _int(value, field, **bounds)


def _number(value: Any, field: str, *, minimum: float | None = None, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(field, "Must be a number.")
    if not math.isfinite(value):
        raise ValidationError(field, "Must be a finite number.")
    if minimum is not None and value < minimum:
        raise ValidationError(field, f"Must be at least {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValidationError(field, f"Must be at most {maximum}, got {value}.")
    return float(value)


def _optional_number(value: Any, field: str, **bounds: float) -> float | None:
    return None if value is None else _number(value, field, **bounds)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, "Must be true or false.")
    return value


def _text(value: Any, field: str, *, max_length: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "Must be a string.")
    if not allow_empty and not value:
        raise ValidationError(field, "Must not be empty.")
    if len(value) > max_length:
        raise ValidationError(field, f"Must be at most {max_length} characters long.")
    if "\x00" in value:
        raise ValidationError(field, "Must not contain NUL characters.")
    return value


def _optional_text(value: Any, field: str, *, max_length: int) -> str | None:
    return None if value is None else _text(value, field, max_length=max_length)


def _list(value: Any, field: str, *, max_items: int) -> list[Any]:
    if not isinstance(value, list):
        raise ValidationError(field, "Must be a JSON list.")
    if len(value) > max_items:
        raise ValidationError(field, f"Must have at most {max_items} items.")
    return value
