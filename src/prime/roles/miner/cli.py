"""`prime miner` commands."""

from __future__ import annotations

import typer

from prime.errors import NotBuiltYet

app = typer.Typer(no_args_is_help=True)


@app.command()
def start() -> None:
    """Start the miner service (not built yet)."""
    raise NotBuiltYet("The miner role is not built yet; follow the project's issues for progress.")
