"""`prime miner start` locks its data dir (the role skeleton, prime.roles.process): a second miner on
the same dir is refused in one sentence before anything else (no hardware probe, no Docker, no chain)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from eth_account import Account

from prime.roles.process import open_data_dir
from tests.fixtures.processes import _child_env, free_port, prime_command
from tests.support.miner_env import miner_env, write_keystore


def _start(tmp_path: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    key_file = tmp_path / "node.json"
    if not key_file.exists():
        write_keystore(key_file, Account.create())
    command = prime_command(
        "miner", "start", "--run-id", "1", "--gpu", "none", "--host", "127.0.0.1", "--port", str(free_port()),
        "--key-file", str(key_file), "--rpc-url", "http://127.0.0.1:9",  # nothing listens: never reached
        "--deployment", str(tmp_path / "no-deployment.json"), "--data-dir", str(data_dir),
    )
    return subprocess.run(command, check=False, env=_child_env(miner_env(tmp_path / "home")), capture_output=True, text=True, timeout=60)


def _one_sentence(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_a_second_miner_on_the_same_data_dir_is_refused_in_one_sentence(tmp_path: Path) -> None:
    data_dir = tmp_path / "miner"
    with open_data_dir(data_dir, "miner"):  # what a running miner holds
        line = _one_sentence(_start(tmp_path, data_dir))
    assert line == (f"Error: Another miner (pid {os.getpid()}) is already running with data directory {data_dir}; "
                    "stop it or pass another --data-dir.")
    assert json.loads((data_dir / "role.json").read_text()) == {"role": "miner"}
    assert not (data_dir / "miner-state.json").exists()  # refused before the state was touched


def test_a_data_dir_of_another_role_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    (data_dir / "role.json").write_text(json.dumps({"role": "validator"}))
    assert _one_sentence(_start(tmp_path, data_dir)) == (
        f"Error: The data directory {data_dir} belongs to a validator, not a miner; pass another --data-dir.")
