"""The top-level `prime` command: every role group is there, and errors are one sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GROUPS = ("master", "miner", "validator", "discovery", "buyer", "keys", "chain", "devnet")


def prime(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    env["COLUMNS"] = "200"  # rich wraps help at the terminal width
    return subprocess.run([sys.executable, "-m", "prime.cli", *args], capture_output=True, text=True, env=env, timeout=60)


def test_help_lists_every_role_group() -> None:
    result = prime("--help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 1}
    assert set(GROUPS) <= listed, result.stdout


@pytest.mark.parametrize("group", GROUPS)
def test_each_group_has_help(group: str) -> None:
    result = prime(group, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "Commands" in result.stdout


def test_a_failing_command_prints_one_sentence_and_no_traceback(tmp_path) -> None:
    result = prime("keys", "show", str(tmp_path / "missing.json"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.startswith("Error: ") and message.count("\n") == 0, message


# Commands that run until stopped or stream what they watch: no one JSON document to print.
NO_JSON = {
    "buyer watch", "discovery start", "miner start", "validator start", "master start", "chain anvil",
    "devnet down", "devnet logs", "devnet miner", "devnet demo",
}


def _commands(command, path=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), command


def test_every_command_that_prints_a_result_has_json() -> None:
    import typer

    from prime.cli import app

    commands = dict(_commands(typer.main.get_command(app)))
    assert NO_JSON <= set(commands), NO_JSON - set(commands)
    lacking = [name for name, command in commands.items()
               if name not in NO_JSON and not any("--json" in getattr(p, "opts", ()) for p in command.params)]
    assert lacking == [], f"commands without --json: {lacking}"


def test_keys_show_json(tmp_path) -> None:
    from eth_account import Account

    from prime.keys import create_keystore

    account = Account.create()
    path = tmp_path / "k.json"
    create_keystore(path, "pw", account.key.hex(), kdf="pbkdf2", iterations=2)
    result = prime("keys", "show", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"address": account.address, "file": str(path)}
