"""`prime devnet` commands."""

from __future__ import annotations

import typer

from prime.errors import NotBuiltYet

app = typer.Typer(no_args_is_help=True)


@app.command()
def up() -> None:
    """Bring the local network up (not built yet)."""
    raise NotBuiltYet("prime devnet up is not built yet.")
