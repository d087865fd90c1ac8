"""Shared helpers of the buyer CLI tests: run `prime` as a real process, owner key files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.keys import create_keystore

KEY_PASSWORD = "buyer-test-password"


def run_prime(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """`prime ARGS` in a fresh process, with none of the developer's PRIME_* settings."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    full_env["COLUMNS"] = "200"  # rich tables wide enough to assert on
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "prime.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


async def arun_prime(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """``run_prime`` without blocking the event loop (the server under test lives on it)."""
    return await asyncio.to_thread(run_prime, *args, env=env, timeout=timeout)


def assert_one_sentence_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with one `Error: …` line, no traceback, naming each fragment."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def key_file_for(tmp_path: Path) -> Callable[[LocalAccount], Path]:
    """An encrypted keystore of ``account`` (cheap KDF: tests, not secrets)."""

    def make(account: LocalAccount) -> Path:
        path = tmp_path / f"{account.address}.json"
        if not path.exists():
            create_keystore(path, KEY_PASSWORD, account.key.hex(), kdf="pbkdf2", iterations=1000)
        return path

    return make


@pytest.fixture
def random_account() -> LocalAccount:
    return Account.create()
