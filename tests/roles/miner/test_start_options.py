"""``prime miner start``'s options reach the miner as ``MinerOptions`` (the CLI parsed in process,
``run_miner`` replaced by a recorder: what is checked is the translation, not a running miner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from typer.testing import CliRunner

from prime.cli import app
from prime.roles.miner import node
from prime.roles.miner.release import DEFAULT_GRACE_S
from tests.support.miner_env import PASSWORD, write_keystore


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Any]:
    seen: list[Any] = []

    async def record(options: Any, *_: Any, **__: Any) -> None:
        seen.append(options)

    monkeypatch.setattr(node, "run_miner", record)
    monkeypatch.setenv("PRIME_KEY_PASSWORD", PASSWORD)
    for name in ("PRIME_RELEASE_GRACE", "PRIME_CHAIN_POLL_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    return seen


def _start(tmp_path: Path, *extra: str) -> Any:
    key = write_keystore(tmp_path / "node.json", Account.create())
    (tmp_path / "deployment.json").write_text("{}")
    return CliRunner().invoke(app, ["miner", "start", "--run-id", "3", "--key-file", str(key),
                                    "--deployment", str(tmp_path / "deployment.json"),
                                    "--data-dir", str(tmp_path / "data"), *extra])


def test_release_grace_reaches_the_miner(started: list[Any], tmp_path: Path) -> None:
    result = _start(tmp_path, "--release-grace", "12.5")
    assert result.exit_code == 0, result.output
    assert started[-1].release_grace_s == 12.5 and started[-1].run_id == 3


def test_release_grace_defaults_to_five_minutes(started: list[Any], tmp_path: Path) -> None:
    result = _start(tmp_path)
    assert result.exit_code == 0, result.output
    assert started[-1].release_grace_s == DEFAULT_GRACE_S == 300.0


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_a_bad_release_grace_is_one_sentence_and_starts_nothing(started: list[Any], tmp_path: Path, value: str) -> None:
    result = _start(tmp_path, "--release-grace", value)
    assert result.exit_code == 2 and "--release-grace" in result.output
    assert "Traceback" not in result.output and started == []
