"""What the buyer's commands share: their common options, output helpers and the master call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

MasterUrl = Annotated[
    Optional[str],
    typer.Option("--master-url", envvar="PRIME_MASTER_URL", help="URL of a master of the run, e.g. http://127.0.0.1:8092.", show_default=False),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]
TaskId = Annotated[str, typer.Argument(help="The task's id (see `prime buyer tasks`).")]


def console() -> Console:
    out = Console()
    # Piped into a file or grep: no 80-column wrapping.
    return out if out.is_terminal else Console(width=200)


def echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


def account(key_file: Path | None, password_env: str) -> Any:
    from prime.keys import load_account

    return load_account(key_file, password_env=password_env)


def with_master(master_url: str | None, key_file: Path | None, password_env: str, action: Callable[[Any], Awaitable[Any]], *,
                timeout_s: float = 10.0) -> Any:
    """``action(master)`` on a MasterClient of ``master_url``, signed with the owner key."""
    from prime.roles.buyer.master_client import MasterClient, normalize_master_url

    url = normalize_master_url(master_url)  # checked before asking for a password
    owner = account(key_file, password_env)

    async def run() -> Any:
        async with MasterClient.open(owner, url, timeout_s=timeout_s) as master:
            return await action(master)

    return asyncio.run(run())
