"""Storage link: manifest entries and the one relative-path rule."""
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

from prime.protocol.errors import *  # noqa
from prime.protocol.errors import _object, _no_unknown, _required, _join, _int, _optional_int, _number, _optional_number, _bool, _text, _optional_text, _list
MAX_PATH_LENGTH = 4096
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# --- storage sync -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a task's persistent storage as the miner lists it (path relative to /data)."""

    path: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, data: Any, prefix: str = "file") -> ManifestEntry:
        data = _object(data, prefix)
        _no_unknown(data, {"path", "size", "sha256"}, prefix)
        path = validate_relative_path(_required(data, "path", prefix), _join(prefix, "path"))
        size = _int(_required(data, "size", prefix), _join(prefix, "size"), minimum=0)
        digest = _text(_required(data, "sha256", prefix), _join(prefix, "sha256"), max_length=64)
        if not SHA256_RE.match(digest):
            raise ValidationError(_join(prefix, "sha256"), "Must be 64 lowercase hex digits.")
        return cls(path, size, digest)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def validate_relative_path(value: Any, field: str = "path") -> str:
    """A relative POSIX path that cannot climb out of its directory."""
    path = _text(value, field, max_length=MAX_PATH_LENGTH, allow_empty=False)
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise ValidationError(field, f"{path[:200]!r} must be a relative path without '.', '..' or empty parts.")
    return path
