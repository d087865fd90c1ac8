"""The role skeleton in real processes: `prime discovery start` locks its data dir, a second process
on the same dir is refused with one sentence, a dir of another role is refused, and SIGTERM stops
the first cleanly and frees the dir."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.fixtures.processes import RoleProcesses, free_port, prime_command
from tests.roles.discovery.test_service import discovery_command, discovery_env


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}, **discovery_env()}
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=60)


def _one_sentence(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_a_second_process_on_the_same_data_dir_is_refused(anvil, deployment, role_processes: RoleProcesses, tmp_path: Path):
    data_dir = tmp_path / "discovery"
    port = free_port()
    first = role_processes.start("discovery", discovery_command(port, anvil.rpc_url, deployment.path, data_dir), port=port, env=discovery_env())
    assert json.loads((data_dir / "role.json").read_text()) == {"role": "discovery"}
    assert (data_dir / "prime.lock").read_text().strip() == str(first.proc.pid)

    second = _run(discovery_command(free_port(), anvil.rpc_url, deployment.path, data_dir))
    line = _one_sentence(second)
    assert line == (f"Error: Another discovery (pid {first.proc.pid}) is already running with data directory {data_dir}; "
                    "stop it or pass another --data-dir.")
    assert first.running  # the refused one did not disturb it

    assert first.stop() == 0  # SIGTERM: a clean exit ...
    assert "discovery stopped" in first.logs()
    again = role_processes.start("discovery-again", discovery_command(port, anvil.rpc_url, deployment.path, data_dir), port=port, env=discovery_env())
    assert again.running  # ... that left the dir free for the next one
    assert again.stop() == 0


def test_a_data_dir_of_another_role_is_refused(anvil, deployment, tmp_path: Path):
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    (data_dir / "role.json").write_text(json.dumps({"role": "validator"}))
    result = _run(discovery_command(free_port(), anvil.rpc_url, deployment.path, data_dir))
    assert _one_sentence(result) == (f"Error: The data directory {data_dir} belongs to a validator, not a discovery; "
                                     "pass another --data-dir.")


def test_an_unusable_data_dir_is_one_sentence(anvil, deployment, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = _run(prime_command("discovery", "start", "--port", str(free_port()), "--rpc-url", anvil.rpc_url,
                                "--deployment", str(deployment.path), "--data-dir", str(blocker / "sub")))
    line = _one_sentence(result)
    assert f"Cannot use data directory {blocker / 'sub'}" in line and "--data-dir" in line
