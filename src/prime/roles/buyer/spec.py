"""Turn `prime buyer task create` options into the master's TaskSpec JSON (pure, no I/O).

The spec is validated here with the master's own parser (``TaskSpec.from_json``), so a typo
is one sentence before anything goes on the wire, and what we send is exactly what the
master accepts.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from prime.errors import PrimeError
from prime.protocol.errors import ValidationError
from prime.protocol.tasks import ENV_NAME_RE, TaskSpec


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` → ``{"K": "V"}``; the value may contain ``=``, the last K wins."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise PrimeError(f"--env {item!r} is not NAME=VALUE; write it like --env LEARNING_RATE=0.1.")
        if not ENV_NAME_RE.match(name):
            raise PrimeError(f"--env {name!r} is not a valid variable name; use letters, digits and '_' (not starting with a digit).")
        env[name] = value
    return env


def parse_gpus(text: str) -> int | str:
    """``--gpus N`` or ``--gpus all`` (every GPU of one node)."""
    value = text.strip().lower()
    if value == "all":
        return "all"
    if value.isdigit():
        return int(value)
    raise PrimeError(f"--gpus {text!r} is not a number of GPUs; pass a whole number such as --gpus 1, or --gpus all.")


def parse_command(cmd: str | None, args: Sequence[str] | None) -> list[str]:
    """The command from ``--cmd "…"`` (split like a shell would) or from the words after ``--``."""
    args = list(args or [])
    if cmd is not None and args:
        raise PrimeError("Give the command either with --cmd \"…\" or after --, not both.")
    if cmd is None:
        return args
    try:
        return shlex.split(cmd)
    except ValueError as exc:
        raise PrimeError(f"--cmd {cmd!r} cannot be split into words ({exc}); check its quotes.") from None


def build_task_spec(
    *,
    image: str,
    command: Sequence[str] = (),
    env: dict[str, str] | None = None,
    gpus: int | str = 0,
    replicas: int = 1,
    persistent: bool = False,
    cpu_limit: float | None = None,
    memory_limit_mib: int | None = None,
    restart: str = "never",
) -> dict[str, Any]:
    """The POST /tasks body; a spec the master would refuse raises one sentence naming the option."""
    body: dict[str, Any] = {
        "image": image,
        "command": list(command),
        "env": dict(env or {}),
        "gpus": gpus,
        "replicas": replicas,
        "persistent": persistent,
        "restart": restart,
    }
    if cpu_limit is not None:
        body["cpu_limit"] = cpu_limit
    if memory_limit_mib is not None:
        body["memory_limit_mib"] = memory_limit_mib
    try:
        return TaskSpec.from_json(body).to_json()
    except ValidationError as exc:
        option = "--" + exc.field.split(".")[0].split("[")[0].replace("_", "-")
        option = {"--command": "the command"}.get(option, option)
        raise PrimeError(f"The task is not valid: {option} {exc.message[0].lower()}{exc.message[1:]}") from None
