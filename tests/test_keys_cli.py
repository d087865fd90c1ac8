"""`prime keys new|show|import` through Typer's CliRunner, prime's own main(), and a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from prime.cli import app, main
from prime.errors import PrimeError
from prime.keys import create_keystore

KEY = "0x" + "5e" * 32


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    """A clean environment: own PRIME_HOME, no password or config from the developer's shell."""
    for name in ("PRIME_KEY_PASSWORD", "PRIME_PRIVATE_KEY", "PRIME_CONFIG", "PRIME_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("PRIME_HOME", str(home))
    return {"PRIME_HOME": str(home)}


def run_main(args: list[str], monkeypatch, input: str | None = None) -> tuple[int, str, str]:
    """prime's real entry point (the one that prints errors), with captured streams."""
    runner = CliRunner()
    monkeypatch.setattr(sys, "argv", ["prime", *args])
    with runner.isolation(input=input) as (out, err, _):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        return code, out.getvalue().decode(), err.getvalue().decode()


def test_new_then_show_round_trip(env, tmp_path) -> None:
    out = tmp_path / "node.json"
    result = CliRunner().invoke(app, ["keys", "new", "--out", str(out)], input="pw\npw\n")
    assert result.exit_code == 0, result.output
    address = next(line.split()[-1] for line in result.output.splitlines() if line.startswith("address:"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    shown = CliRunner().invoke(app, ["keys", "show", str(out)])
    assert shown.exit_code == 0 and f"address: {address}" in shown.output


def test_new_defaults_to_the_key_dir(env) -> None:
    result = CliRunner().invoke(app, ["keys", "new"], env={"PRIME_KEY_PASSWORD": "pw"})
    assert result.exit_code == 0, result.output
    key_dir = Path(env["PRIME_HOME"]) / "keys"
    files = list(key_dir.iterdir())
    assert len(files) == 1 and files[0].name.startswith("0x") and files[0].suffix == ".json"
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert str(files[0]) in result.output


def test_new_refuses_mismatched_confirmation(env, tmp_path) -> None:
    result = CliRunner().invoke(app, ["keys", "new", "--out", str(tmp_path / "k.json")], input="one\ntwo\n")
    assert result.exit_code == 1
    assert isinstance(result.exception, PrimeError)
    assert not (tmp_path / "k.json").exists()


def test_new_refuses_to_overwrite(env, tmp_path, monkeypatch) -> None:
    out = tmp_path / "k.json"
    out.write_text("precious")
    code, _, err = run_main(["keys", "new", "--out", str(out)], monkeypatch, input="pw\npw\n")
    assert code == 1 and "already exists" in err
    assert out.read_text() == "precious"


def test_show_private_needs_the_password_and_warns(env, tmp_path, monkeypatch) -> None:
    out = tmp_path / "k.json"
    create_keystore(out, "pw", KEY, kdf="pbkdf2", iterations=2)
    code, stdout, stderr = run_main(["keys", "show", "--private", str(out)], monkeypatch, input="pw\n")
    assert code == 0
    assert KEY in stdout and "Warning" in stderr


def test_wrong_password_is_one_sentence_without_traceback(env, tmp_path, monkeypatch) -> None:
    out = tmp_path / "k.json"
    create_keystore(out, "pw", kdf="pbkdf2", iterations=2)
    monkeypatch.setenv("MY_PW", "not-it")
    code, stdout, stderr = run_main(["keys", "show", "--private", "--password-env", "MY_PW", str(out)], monkeypatch)
    assert code == 1 and stdout == ""
    assert stderr.strip() == f"Error: Wrong password for {out}; check MY_PW or type the password again."
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("{broken"), "not valid JSON"),
        (lambda p: p.write_text("[]"), "not an encrypted keystore"),
    ],
)
def test_show_bad_files_are_one_sentence(env, tmp_path, monkeypatch, setup, words: str) -> None:
    path = tmp_path / "k.json"
    setup(path)
    code, _, stderr = run_main(["keys", "show", str(path)], monkeypatch)
    assert code == 1 and words in stderr and len(stderr.strip().splitlines()) == 1


def test_show_warns_about_loose_permissions(env, tmp_path, monkeypatch) -> None:
    path = tmp_path / "k.json"
    create_keystore(path, "pw", kdf="pbkdf2", iterations=2)
    os.chmod(path, 0o644)
    code, stdout, stderr = run_main(["keys", "show", str(path)], monkeypatch)
    assert code == 0 and "address:" in stdout and "chmod 600" in stderr


def test_import_reads_the_key_from_stdin_never_argv(env, tmp_path) -> None:
    out = tmp_path / "imported.json"
    result = CliRunner().invoke(app, ["keys", "import", str(out)], input=f"{KEY}\n", env={"PRIME_KEY_PASSWORD": "pw"})
    assert result.exit_code == 0, result.output
    assert f"address: {Account.from_key(KEY).address}" in result.output
    assert KEY not in result.output
    assert json.loads(out.read_text())["address"].lower() == Account.from_key(KEY).address[2:].lower()


def test_import_rejects_a_bad_key(env, tmp_path, monkeypatch) -> None:
    code, _, stderr = run_main(["keys", "import", str(tmp_path / "k.json")], monkeypatch, input="0x1234\n")
    assert code == 1 and "64 hex characters" in stderr


def test_bare_group_shows_help_and_unknown_option_is_a_usage_error(env, monkeypatch) -> None:
    code, _, stderr = run_main(["keys", "show", "--bogus", "x"], monkeypatch)
    assert code == 2 and "No such option" in stderr and "unexpected failure" not in stderr


@pytest.mark.skipif(shutil.which("prime") is None, reason="the prime console script is not installed")
def test_real_subprocess_round_trip_and_wrong_password(tmp_path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    base["PRIME_HOME"] = str(tmp_path / "home")
    out = tmp_path / "node.json"

    def prime(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
        environ = dict(base, **({"PRIME_KEY_PASSWORD": password} if password else {}))
        return subprocess.run(["prime", *args], env=environ, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    assert prime("--help").returncode == 0
    created = prime("keys", "new", "--out", str(out), password="pw")
    assert created.returncode == 0, created.stderr
    address = created.stdout.split()[1]
    shown = prime("keys", "show", str(out))
    assert shown.returncode == 0 and shown.stdout.strip() == f"address: {address}"
    wrong = prime("keys", "show", "--private", str(out), password="nope")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == f"Error: Wrong password for {out}; check PRIME_KEY_PASSWORD or type the password again."
