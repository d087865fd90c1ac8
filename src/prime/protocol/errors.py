"""The one validation error of wire messages (raised by ``prime.protocol.codec.decode``)."""

from __future__ import annotations

from prime.errors import PrimeError


class ValidationError(PrimeError, ValueError):
    """Bad input (also a ValueError): ``field`` names what is wrong (dotted/indexed path), ``message`` is one sentence."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    @property
    def detail(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class InvalidJson(ValidationError):
    """The bytes are not JSON at all (answered as ``invalid_json``, not ``invalid_request``)."""

