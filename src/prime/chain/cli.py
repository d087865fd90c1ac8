"""`prime chain` commands."""

from __future__ import annotations

import typer

from prime.errors import NotBuiltYet

app = typer.Typer(no_args_is_help=True)


@app.command()
def deploy() -> None:
    """Deploy the contracts (not built yet)."""
    raise NotBuiltYet("prime chain deploy is not built yet.")
