"""The ``prime`` command line.

Each role owns its own Typer sub-app in ``prime/roles/<role>/cli.py`` (and the
chain, keys and devnet tools likewise); this module only mounts them and turns
every ``PrimeError`` into one printed sentence and a non-zero exit.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from prime.config import ConfigPath, apply_config
from prime.errors import PrimeError

# soft_wrap: an error stays one line in logs and pipes instead of being cut at 80 columns.
err_console = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="prime",
    help="prime: one coordinated, verifiable compute pool out of GPUs owned by strangers.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.callback()
def root(ctx: typer.Context, config: ConfigPath = None) -> None:
    """prime: one coordinated, verifiable compute pool out of GPUs owned by strangers."""
    # The TOML file becomes click's default_map here, before any subcommand parses its
    # options, so every command sees flags > PRIME_* env > TOML > default.
    _path, warnings = apply_config(ctx, config)
    for warning in warnings:
        err_console.print(f"[yellow]Warning:[/] {warning}", highlight=False)


def _mount() -> None:
    from prime.chain.cli import app as chain_app
    from prime.devnet.cli import app as devnet_app
    from prime.keys_cli import app as keys_app
    from prime.roles.buyer.cli import app as buyer_app
    from prime.roles.discovery.cli import app as discovery_app
    from prime.roles.master.cli import app as master_app
    from prime.roles.miner.cli import app as miner_app
    from prime.roles.validator.cli import app as validator_app

    app.add_typer(buyer_app, name="buyer", help="Put a training run on chain, create tasks, read their status, logs and files.")
    app.add_typer(discovery_app, name="discovery", help="Run the discovery service where nodes announce their address.")
    app.add_typer(miner_app, name="miner", help="Run a compute provider's node: probe GPUs, register, run tasks.")
    app.add_typer(validator_app, name="validator", help="Challenge new nodes with a proof of compute and approve or reject them on chain.")
    app.add_typer(master_app, name="master", help="Coordinate one run: invite nodes, track heartbeats, schedule tasks.")
    app.add_typer(keys_app, name="keys", help="Create, show and import encrypted key files.")
    app.add_typer(chain_app, name="chain", help="Deploy the contracts and start a local anvil chain.")
    app.add_typer(devnet_app, name="devnet", help="Bring a whole local network up or down in one command.")


_mount()


def main() -> None:
    """Entry point: run the app, print a ``PrimeError`` as one sentence."""
    try:
        app(standalone_mode=False)
    except PrimeError as exc:
        # escaped: a sentence may hold brackets ("pipx install 'prime[gpu]'", "[::1]:8093"), never markup
        err_console.print(f"[bold red]Error:[/] {escape(exc.message)}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        sys.exit(130)
    except SystemExit:
        raise
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("Aborted.")
        sys.exit(1)
    except typer.TyperException as exc:
        # Typer vendors click: usage errors (unknown option, missing argument, bare group
        # showing its help) arrive here and know how to print themselves.
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            err_console.print(f"[bold red]Error:[/] {exc.message}", highlight=False)
        sys.exit(exc.exit_code)
    except Exception as exc:  # anything unexpected
        err_console.print(f"[bold red]Error:[/] unexpected failure ({type(exc).__name__}: {exc}); run with PRIME_DEBUG=1 for details and report it.")
        if os.environ.get("PRIME_DEBUG"):
            raise
        sys.exit(1)


if __name__ == "__main__":
    main()
