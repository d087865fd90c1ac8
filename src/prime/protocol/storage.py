"""Storage link: a task's /data as manifest entries, and the one relative-path rule."""

from __future__ import annotations

import re
from typing import Annotated, Any

from msgspec import Meta

from prime.protocol.codec import NO_NUL, Message, ValidationError

MAX_PATH_LENGTH = 4096
SHA256_RE = re.compile(r"^[0-9a-f]{64}$(?!\n)")  # $(?!\n): no trailing newline


def relative_path_problem(path: str) -> str | None:
    """Why ``path`` is not a relative POSIX path that stays inside its directory (None: it is)."""
    if not path:
        return "must not be empty"
    if len(path) > MAX_PATH_LENGTH:
        return f"must be at most {MAX_PATH_LENGTH} characters long"
    if "\x00" in path:
        return "must not contain NUL characters"
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        return f"{path[:200]!r} must be a relative path without '.', '..' or empty parts"
    return None


def validate_relative_path(value: Any, field: str = "path") -> str:
    """A relative POSIX path that cannot climb out of its directory; ValidationError otherwise."""
    if not isinstance(value, str):
        raise ValidationError(field, "Must be a string.")
    problem = relative_path_problem(value)
    if problem is not None:
        raise ValidationError(field, problem[0].upper() + problem[1:] + ".")
    return value


RelativePath = Annotated[str, Meta(min_length=1, max_length=MAX_PATH_LENGTH, pattern=NO_NUL)]


class ManifestEntry(Message, frozen=True):
    """One file of a task's persistent storage as the miner lists it (path relative to /data)."""

    path: RelativePath
    size: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    sha256: Annotated[str, Meta(pattern=SHA256_RE.pattern)]

    def __post_init__(self) -> None:
        problem = relative_path_problem(self.path)
        if problem is not None:
            raise ValueError(f"{problem} (at path)")

    @classmethod
    def from_json(cls, data: Any, prefix: str = "file") -> ManifestEntry:
        entry: ManifestEntry = super().from_json(data, prefix)
        return entry
