"""Settings: command-line flags > ``PRIME_*`` environment > TOML file > built-in default.

Every option declares its ``PRIME_<NAME>`` environment variable (click reads it
before the default map), and the TOML file becomes click's ``default_map``, so
click itself enforces the precedence. The file looks like::

    [defaults]                 # applies to every command that has the option
    rpc_url = "http://127.0.0.1:8545"
    key_file = "~/.config/prime/keys/node.json"

    [miner]                    # applies to every ``prime miner ...`` command
    data_dir = "/var/lib/prime/miner"

    [miner.start]              # applies to ``prime miner start`` only
    port = 8000

More specific tables win over less specific ones. Keys may use dashes or
underscores (``rpc-url`` = ``rpc_url``). Relative paths in the file are taken
relative to the file's own directory.

The file is ``--config PATH``, else ``$PRIME_CONFIG``, else
``$PRIME_HOME/config.toml`` (``~/.config/prime/config.toml``) when it exists.
"""

from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from prime.errors import ConfigError

DEFAULT_RPC_URL = "http://127.0.0.1:8545"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PASSWORD_ENV = "PRIME_KEY_PASSWORD"
DEFAULTS_TABLE = "defaults"

# One default port per role, so every role can run on one machine without flags (the devnet uses
# the same ones). The buyer only makes calls and has none.
DISCOVERY_PORT = 8090
VALIDATOR_PORT = 8091
MASTER_PORT = 8092
MINER_PORT = 8093
DEFAULT_PORTS = {"discovery": DISCOVERY_PORT, "validator": VALIDATOR_PORT, "master": MASTER_PORT, "miner": MINER_PORT}


def prime_home() -> Path:
    """Where prime keeps its own files: ``$PRIME_HOME`` or ``~/.config/prime``."""
    home = os.environ.get("PRIME_HOME")
    return Path(home).expanduser() if home else Path("~/.config/prime").expanduser()


def default_config_path() -> Path:
    return prime_home() / "config.toml"


def default_key_dir() -> Path:
    return prime_home() / "keys"


# --- reusable option types (use as ``rpc_url: RpcUrl = DEFAULT_RPC_URL``) ---------------

ConfigPath = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="PRIME_CONFIG",
        help="TOML settings file (default: ~/.config/prime/config.toml when it exists).",
        show_default=False,
    ),
]
RpcUrl = Annotated[str, typer.Option("--rpc-url", envvar="PRIME_RPC_URL", help="JSON-RPC URL of the chain.")]
DeploymentPath = Annotated[
    Path | None,
    typer.Option("--deployment", envvar="PRIME_DEPLOYMENT", help="Deployment file written by `prime chain deploy`."),
]
KeyFile = Annotated[
    Path | None,
    typer.Option("--key-file", envvar="PRIME_KEY_FILE", help="Encrypted key file (see `prime keys new`)."),
]
PasswordEnv = Annotated[
    str,
    typer.Option("--password-env", help="Name of the environment variable holding the key file's password."),
]
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="PRIME_DATA_DIR", help="Directory for this service's state.")]
Host = Annotated[str, typer.Option("--host", envvar="PRIME_HOST", help="Address to listen on.")]
Port = Annotated[int, typer.Option("--port", envvar="PRIME_PORT", min=1, max=65535, help="TCP port to listen on.")]

# The names the brief uses for the same types.
rpc_url_option = RpcUrl
deployment_option = DeploymentPath
key_file_option = KeyFile
data_dir_option = DataDir
password_env_option = PasswordEnv
host_option = Host
port_option = Port


# --- reading the file ---------------------------------------------------------------------


def load_toml(path: Path) -> dict[str, Any]:
    """Parse one TOML file; any problem becomes one sentence naming the file (and line)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist; create it or point --config / PRIME_CONFIG elsewhere.") from None
    except IsADirectoryError:
        raise ConfigError(f"Config path {path} is a directory; point --config / PRIME_CONFIG at a TOML file.") from None
    except PermissionError:
        raise ConfigError(f"Config file {path} is not readable; check its permissions.") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line N, column M)".
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}; fix that line.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file {path} is not UTF-8 text; save it as UTF-8 TOML.") from None


def find_config(explicit: Path | None) -> Path | None:
    """The config file to use: the one named (must exist) or the default one if present."""
    if explicit is not None:
        return explicit.expanduser()
    default = default_config_path()
    return default if default.is_file() else None


# --- turning it into click's default_map ---------------------------------------------------


def _norm(key: str) -> str:
    return key.replace("-", "_")


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", None) == "option"


def _is_path_param(param: Any) -> bool:
    """True for options typed ``Path`` / ``Optional[Path]`` (their TOML values are file-relative)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:
        return False
    candidates = [annotation, *typing.get_args(annotation)]
    return any(isinstance(c, type) and issubclass(c, Path) for c in candidates)


def _convert(param: Any, value: Any, base_dir: Path) -> Any:
    if _is_path_param(param) and isinstance(value, str):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base_dir / path)
    return value


def _subtree_option_names(command: Any) -> set[str]:
    names = {p.name for p in getattr(command, "params", ()) if _is_option(p)}
    for sub in getattr(command, "commands", {}).values():
        names |= _subtree_option_names(sub)
    return names


def build_default_map(
    command: Any, settings: Mapping[str, Any], *, base_dir: Path, warnings: list[str] | None = None
) -> dict[str, Any]:
    """Nested click ``default_map`` for ``command`` (a click group/command tree) from parsed TOML.

    Pure: walks the command tree, so a ``[defaults]`` key lands on every command that has that
    option. Keys that match nothing are reported in ``warnings`` (typos should not pass silently).
    """
    warnings = warnings if warnings is not None else []
    table = {k: v for k, v in settings.items() if k != DEFAULTS_TABLE}
    defaults = settings.get(DEFAULTS_TABLE, {})
    if not isinstance(defaults, dict):
        raise ConfigError("The [defaults] entry of the config file must be a table; write it as [defaults].")
    defaults = {_norm(k): v for k, v in defaults.items()}
    known = _subtree_option_names(command)
    for key in defaults:
        if key not in known:
            warnings.append(f"[defaults] {key} matches no option of any prime command; it is ignored.")
    return _build(command, table, defaults, [], base_dir, warnings)


def _build(
    command: Any,
    table: Mapping[str, Any],
    inherited: Mapping[str, Any],
    where: list[str],
    base_dir: Path,
    warnings: list[str],
) -> dict[str, Any]:
    subcommands: dict[str, Any] = dict(getattr(command, "commands", {}) or {})
    # Typer names commands with dashes (create-run), options with underscores (rpc_url);
    # the file may use either spelling for both.
    by_norm_name = {_norm(name): name for name in subcommands}
    own_options = {p.name: p for p in getattr(command, "params", ()) if _is_option(p)}
    subtree_options = _subtree_option_names(command)
    scalars: dict[str, Any] = {}
    sub_tables: dict[str, Mapping[str, Any]] = {}
    for raw_key, value in table.items():
        key = _norm(raw_key)
        if key in by_norm_name and isinstance(value, dict):
            sub_tables[by_norm_name[key]] = value
            continue
        if isinstance(value, dict) and key not in own_options:
            section = ".".join([*where, raw_key])
            warnings.append(f"[{section}] is not a prime command; that table is ignored.")
            continue
        if key not in subtree_options:
            section = ".".join(where) or "top level"
            warnings.append(f"{raw_key} in [{section}] matches no option there; it is ignored.")
            continue
        scalars[key] = value
    scope = {**inherited, **scalars}
    result: dict[str, Any] = {}
    for name, param in own_options.items():
        if name in scope and name != "config":
            result[name] = _convert(param, scope[name], base_dir)
    for name, sub in subcommands.items():
        result[name] = _build(sub, sub_tables.get(name, {}), scope, [*where, name], base_dir, warnings)
    return result


def apply_config(ctx: typer.Context, config_path: Path | None) -> tuple[Path | None, list[str]]:
    """Load the config file (if any) into ``ctx.default_map``; call from the root callback.

    Returns the file used and the warnings about keys that matched nothing.
    """
    path = find_config(config_path)
    if path is None:
        return None, []
    settings = load_toml(path)
    warnings: list[str] = []
    default_map = build_default_map(ctx.command, settings, base_dir=path.parent.resolve(), warnings=warnings)
    ctx.default_map = {**default_map, **(ctx.default_map or {})}
    return path, warnings
