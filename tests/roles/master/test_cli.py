"""`prime master nodes` against a real master process: signed by the run owner's key or the
master's own key; anyone else gets one sentence, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest_asyncio
from eth_account import Account

from tests.fixtures.processes import RoleProcesses, prime_command
from tests.roles.master.fake_miner import PASSWORD, World, eventually, make_world, write_key


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-cli"))
    miner = await w.new_miner(anvil=anvil)

    async def healthy() -> bool:
        if miner.master_url is None:
            return False
        await miner.heartbeat()
        return await w.node_state(miner.address) == "Healthy"

    await eventually(healthy, what="a Healthy node")
    yield w
    await w.close()


def _nodes_cli(world: World, key_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    env["PRIME_KEY_PASSWORD"] = PASSWORD
    return subprocess.run(
        prime_command("master", "nodes", "--master-url", world.url, "--key-file", str(key_file), *extra),
        capture_output=True, text=True, env=env, timeout=60,
    )


async def test_nodes_json_and_table_for_owner_and_master(world: World, tmp_path: Path) -> None:
    miner = world.miners[0]
    for account in (world.owner, world.master_account):
        done = _nodes_cli(world, write_key(tmp_path, account), "--json")
        assert done.returncode == 0, done.stderr
        nodes = {n["address"]: n for n in json.loads(done.stdout)["nodes"]}
        assert nodes[miner.address]["state"] in ("Healthy", "Unhealthy", "Dead")
        assert nodes[miner.address]["hardware"]["gpu_count"] == 2

    done = _nodes_cli(world, tmp_path / f"{world.owner.address}.json")  # the table
    assert done.returncode == 0, done.stderr
    assert miner.address in done.stdout and "ago" in done.stdout and "2 x NVIDIA H100" in done.stdout


async def test_nodes_refused_for_a_stranger_in_one_sentence(world: World, tmp_path: Path) -> None:
    done = _nodes_cli(world, write_key(tmp_path, Account.create()))
    assert done.returncode != 0
    assert "only the run's owner or a master may list its nodes" in done.stderr and "Traceback" not in done.stderr


def test_nodes_with_no_master_listening(tmp_path: Path, world: World) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    env["PRIME_KEY_PASSWORD"] = PASSWORD
    done = subprocess.run(
        prime_command("master", "nodes", "--master-url", "http://127.0.0.1:9", "--key-file",
                      str(write_key(tmp_path, Account.create()))),
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode != 0 and "Cannot reach the master" in done.stderr and "Traceback" not in done.stderr


def test_a_second_master_on_the_same_data_dir_is_refused_in_one_sentence(world: World, tmp_path: Path) -> None:
    from tests.fixtures.processes import free_port
    from tests.roles.master.fake_miner import master_command

    saved = json.loads((world.data_dir / "run.json").read_text())  # the role skeleton's marker, with the run's identity
    assert saved["role"] == "master" and saved["run_id"] == world.run_id
    assert {"chain_id", "registry"} <= set(saved)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    env["PRIME_KEY_PASSWORD"] = PASSWORD
    command = master_command(free_port(), world.run_id, write_key(tmp_path, world.master_account), world.rpc_url,
                             world.deployment.path, world.data_dir)
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    assert world.master.proc is not None
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    expected = (f"Error: Another master (pid {world.master.proc.pid}) is already running with data directory "
                f"{world.data_dir}; stop it or pass another --data-dir.")
    assert lines == [expected], done.stderr
    assert world.master.running  # the refused one did not disturb it
