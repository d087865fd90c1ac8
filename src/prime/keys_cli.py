"""`prime keys` commands."""

from __future__ import annotations

import typer

from prime.errors import NotBuiltYet

app = typer.Typer(no_args_is_help=True)


@app.command()
def new() -> None:
    """Create a key (not built yet)."""
    raise NotBuiltYet("prime keys new is not built yet.")
