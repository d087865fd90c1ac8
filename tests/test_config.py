"""prime.config: flags > PRIME_* env > TOML file > default, through click's default_map."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from prime.config import (
    DEFAULT_RPC_URL,
    ConfigPath,
    DataDir,
    KeyFile,
    Port,
    RpcUrl,
    apply_config,
    build_default_map,
)
from prime.errors import ConfigError


def make_app() -> typer.Typer:
    """A miniature prime: a root callback wired like prime.cli, two groups, a few commands."""
    app = typer.Typer()
    seen: list[str] = []

    @app.callback()
    def root(ctx: typer.Context, config: ConfigPath = None) -> None:
        _, warnings = apply_config(ctx, config)
        seen.extend(warnings)

    miner = typer.Typer()

    @miner.command()
    def start(port: Port = 8000, rpc_url: RpcUrl = DEFAULT_RPC_URL, data_dir: DataDir = Path("data"), key_file: KeyFile = None) -> None:
        typer.echo(f"port={port} rpc_url={rpc_url} data_dir={data_dir} key_file={key_file}")

    @miner.command()
    def status(rpc_url: RpcUrl = DEFAULT_RPC_URL) -> None:
        typer.echo(f"rpc_url={rpc_url}")

    @miner.command()
    def create_run(max_nodes: int = 4) -> None:  # Typer names it "create-run"
        typer.echo(f"max_nodes={max_nodes}")

    master = typer.Typer()

    @master.command("start")
    def master_start(port: Port = 8100, rpc_url: RpcUrl = DEFAULT_RPC_URL) -> None:
        typer.echo(f"port={port} rpc_url={rpc_url}")

    app.add_typer(miner, name="miner")
    app.add_typer(master, name="master")
    app.warnings = seen  # type: ignore[attr-defined]
    return app


@pytest.fixture
def clean(monkeypatch, tmp_path):
    for name in ("PRIME_CONFIG", "PRIME_PORT", "PRIME_RPC_URL", "PRIME_DATA_DIR", "PRIME_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRIME_HOME", str(tmp_path / "home"))


def run(app: typer.Typer, args: list[str], env: dict[str, str] | None = None) -> dict[str, str]:
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return dict(part.split("=", 1) for part in result.output.split())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_precedence_flag_over_env_over_toml_over_default(clean, tmp_path) -> None:
    config = write(tmp_path / "c.toml", "[miner.start]\nport = 9000\n")
    app = make_app()
    assert run(app, ["miner", "start"])["port"] == "8000"  # default
    assert run(app, ["--config", str(config), "miner", "start"])["port"] == "9000"  # TOML
    assert run(app, ["--config", str(config), "miner", "start"], env={"PRIME_PORT": "7000"})["port"] == "7000"  # env
    assert run(app, ["--config", str(config), "miner", "start", "--port", "6000"], env={"PRIME_PORT": "7000"})["port"] == "6000"


def test_defaults_table_group_table_and_command_table(clean, tmp_path) -> None:
    config = write(
        tmp_path / "c.toml",
        """
        [defaults]
        rpc_url = "http://defaults:1"
        port = 1111

        [miner]
        rpc-url = "http://miner-group:2"

        [miner.start]
        port = 3333
        """,
    )
    app = make_app()
    miner_start = run(app, ["--config", str(config), "miner", "start"])
    assert miner_start["rpc_url"] == "http://miner-group:2" and miner_start["port"] == "3333"
    assert run(app, ["--config", str(config), "miner", "status"])["rpc_url"] == "http://miner-group:2"
    master = run(app, ["--config", str(config), "master", "start"])
    assert master == {"port": "1111", "rpc_url": "http://defaults:1"}


def test_relative_paths_are_relative_to_the_config_file(clean, tmp_path) -> None:
    config = write(tmp_path / "etc" / "c.toml", '[miner.start]\ndata_dir = "state"\nkey_file = "~/k.json"\n')
    out = run(make_app(), ["--config", str(config), "miner", "start"])
    assert out["data_dir"] == str(tmp_path / "etc" / "state")
    assert out["key_file"] == str(Path("~/k.json").expanduser())


@pytest.mark.parametrize("section", ["miner.create-run", "miner.create_run"])
def test_dashed_command_names_and_keys(clean, tmp_path, section: str) -> None:
    config = write(tmp_path / "c.toml", f"[{section}]\nmax-nodes = 9\n")
    app = make_app()
    assert run(app, ["--config", str(config), "miner", "create-run"])["max_nodes"] == "9"
    assert app.warnings == []  # type: ignore[attr-defined]


def test_config_found_through_env_and_default_location(clean, tmp_path, monkeypatch) -> None:
    by_env = write(tmp_path / "env.toml", "[miner.start]\nport = 4000\n")
    assert run(make_app(), ["miner", "start"], env={"PRIME_CONFIG": str(by_env)})["port"] == "4000"
    write(tmp_path / "home" / "config.toml", "[miner.start]\nport = 5000\n")
    assert run(make_app(), ["miner", "start"])["port"] == "5000"


def test_missing_explicit_config_is_an_error(clean, tmp_path) -> None:
    result = CliRunner().invoke(make_app(), ["--config", str(tmp_path / "nope.toml"), "miner", "start"])
    assert isinstance(result.exception, ConfigError) and "does not exist" in result.exception.message


def test_bad_toml_names_the_file_and_line(clean, tmp_path) -> None:
    config = write(tmp_path / "c.toml", "[miner.start]\nport = 80\nrpc_url = \n")
    result = CliRunner().invoke(make_app(), ["--config", str(config), "miner", "start"])
    assert isinstance(result.exception, ConfigError)
    assert str(config) in result.exception.message and "line 3" in result.exception.message


def test_unknown_keys_and_tables_are_reported(clean, tmp_path) -> None:
    config = write(tmp_path / "c.toml", "[defaults]\nprot = 1\n[miner.strat]\nport = 1\n[miner.start]\nrcp_url = 'x'\n")
    app = make_app()
    run(app, ["--config", str(config), "miner", "start"])
    joined = " | ".join(app.warnings)  # type: ignore[attr-defined]
    assert "prot" in joined and "[miner.strat]" in joined and "rcp_url" in joined


def test_wrongly_typed_toml_value_is_a_usage_error(clean, tmp_path) -> None:
    config = write(tmp_path / "c.toml", "[miner.start]\nport = 'eighty'\n")
    result = CliRunner().invoke(make_app(), ["--config", str(config), "miner", "start"])
    assert result.exit_code == 2 and "port" in result.output.lower()


def test_build_default_map_is_pure(clean) -> None:
    command = typer.main.get_command(make_app())
    warnings: list[str] = []
    default_map = build_default_map(command, {"defaults": {"port": 1}, "master": {"start": {"port": 2}}}, base_dir=Path("/"), warnings=warnings)
    assert default_map["miner"]["start"]["port"] == 1
    assert default_map["master"]["start"]["port"] == 2
    assert "port" not in default_map["miner"]["status"]
    assert warnings == []


def test_real_cli_reads_the_config_file(clean, tmp_path, monkeypatch) -> None:
    """The real `prime` root callback: a [defaults] password_env reaches `prime keys new`."""
    from prime.cli import app, main

    config = write(tmp_path / "c.toml", '[defaults]\npassword_env = "VAULT_PW"\n[keys.new]\nout = "keys/node.json"\n')
    result = CliRunner().invoke(app, ["--config", str(config), "keys", "new"], env={"VAULT_PW": "pw", "PRIME_KEY_PASSWORD": None})
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "keys" / "node.json").is_file()

    bad = write(tmp_path / "bad.toml", "[keys\n")
    monkeypatch.setattr(sys, "argv", ["prime", "--config", str(bad), "keys", "show", "x"])
    with CliRunner().isolation() as (_, err, _):
        with pytest.raises(SystemExit) as exited:
            main()
        message = err.getvalue().decode().strip()
    assert exited.value.code == 1
    assert message.startswith(f"Error: Config file {bad} is not valid TOML") and "line 1" in message
    assert len(message.splitlines()) == 1


def test_each_role_has_its_own_default_port():
    from prime.config import DEFAULT_PORTS, DISCOVERY_PORT, MASTER_PORT, MINER_PORT, VALIDATOR_PORT
    from prime.roles.discovery.cli import DEFAULT_PORT as discovery_default
    from prime.roles.validator.cli import DEFAULT_PORT as validator_default

    assert DEFAULT_PORTS == {"discovery": DISCOVERY_PORT, "validator": VALIDATOR_PORT, "master": MASTER_PORT,
                             "miner": MINER_PORT}
    assert len(set(DEFAULT_PORTS.values())) == len(DEFAULT_PORTS)
    assert (discovery_default, validator_default) == (DISCOVERY_PORT, VALIDATOR_PORT)
