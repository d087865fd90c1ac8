"""Errors that reach a person.

Every error a user can cause or fix is a ``PrimeError`` whose message is one
plain sentence saying what is wrong and what to do. The CLI prints it and exits
non-zero; it never shows a traceback for one of these.
"""

from __future__ import annotations


class PrimeError(Exception):
    """An error with a one-sentence, user-facing message."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PrimeError):
    """Missing or invalid configuration (flags, environment, TOML file)."""


class KeyError_(PrimeError):
    """A keystore could not be created, read or decrypted."""


class ChainError(PrimeError):
    """A chain call failed: RPC unreachable, transaction reverted, ..."""


class PeerError(PrimeError):
    """Another prime service answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None, body: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class NotBuiltYet(PrimeError):
    """A command whose role is not implemented yet."""
