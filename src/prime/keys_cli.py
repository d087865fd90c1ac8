"""`prime keys new|show|import`: encrypted key files, never a raw key on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from prime.config import DEFAULT_PASSWORD_ENV, PasswordEnv, default_key_dir
from prime.errors import KeyError_

# prime.keys pulls in eth-account (over a second to import); load it only when a
# keys command actually runs so `prime --help` and every other command stay quick.

app = typer.Typer(no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True, highlight=False)

OutPath = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Where to write the key file (a file, or a directory for <address>.json). Default: ~/.config/prime/keys/<address>.json."),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of text.")]
KeyPath = Annotated[Path, typer.Argument(help="The key file.", show_default=False)]


def _target(out: Path | None) -> Path:
    """The path given, or the default key directory (created 0700) for ``<address>.json``."""
    from prime.keys import ensure_private_dir

    if out is not None:
        return out.expanduser()
    directory = default_key_dir()
    ensure_private_dir(directory)
    return directory


def _report(address: str, target: Path, json_output: bool = False) -> None:
    from prime.keys import key_file_path

    saved = key_file_path(target, address)
    if json_output:
        typer.echo(json.dumps({"address": address, "file": str(saved)}, indent=2))
        return
    typer.echo(f"address: {address}")
    typer.echo(f"file:    {saved}")


@app.command()
def new(out: OutPath = None, password_env: PasswordEnv = DEFAULT_PASSWORD_ENV, json_output: JsonOutput = False) -> None:
    """Create a new key and save it encrypted (mode 0600); prints its address."""
    from prime.keys import create_keystore, resolve_password

    password = resolve_password(None, password_env, confirm=True, what="new key file")
    target = _target(out)
    address = create_keystore(target, password)
    _report(address, target, json_output)


@app.command()
def show(
    path: KeyPath,
    private: Annotated[bool, typer.Option("--private", help="Also print the private key (needs the password).")] = False,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Print a key file's address (no password needed)."""
    from prime.keys import (
        decrypt_keystore,
        keystore_address,
        permission_warning,
        read_keystore,
        resolve_password,
    )

    keystore = read_keystore(path)
    warning = permission_warning(path)
    if warning:
        err.print(f"[yellow]Warning:[/] {warning}")
    address = keystore_address(keystore)
    if private:
        account = decrypt_keystore(keystore, resolve_password(None, password_env), path=path, password_env=password_env)
        err.print("[yellow]Warning:[/] the private key below controls this account's funds; do not paste it anywhere or keep it in shell history.")
        if json_output:
            typer.echo(json.dumps({"address": account.address, "file": str(path), "private_key": f"0x{bytes(account.key).hex()}"}, indent=2))
            return
        typer.echo(f"address: {account.address}")
        typer.echo(f"private key: 0x{bytes(account.key).hex()}")
        return
    if address is None:
        raise KeyError_(f"Key file {path} does not store its address in clear; run `prime keys show --private {path}` to see it.")
    if json_output:
        typer.echo(json.dumps({"address": address, "file": str(path)}, indent=2))
        return
    typer.echo(f"address: {address}")


@app.command("import")
def import_(
    path: Annotated[Path | None, typer.Argument(help="Where to write the key file. Default: ~/.config/prime/keys/<address>.json.", show_default=False)] = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Encrypt an existing private key into a key file; the key is read from a hidden prompt or stdin."""
    from prime.keys import create_keystore, normalize_private_key, resolve_password

    if sys.stdin is not None and not sys.stdin.isatty():
        # Piped in (`pass show node | prime keys import node.json`): never from argv.
        raw = sys.stdin.readline()
        if not raw.strip():
            raise KeyError_("No private key arrived on stdin; pipe the hex key in or run the command in a terminal.")
    else:
        try:
            raw = typer.prompt("Private key (hex)", hide_input=True)
        except typer.Abort:
            raise KeyError_("No private key was entered; type it at the prompt or pipe it on stdin.") from None
    key = normalize_private_key(raw)
    password = resolve_password(None, password_env, confirm=True, what="new key file")
    target = _target(path)
    address = create_keystore(target, password, private_key="0x" + key.hex())
    _report(address, target, json_output)
