"""`prime miner status`: chain status, announced address, master, heartbeats and tasks."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from prime.auth.signing import Domain
from tests.fixtures.docker import remove_prime_containers
from tests.fixtures.processes import _child_env, prime_command
from tests.support.miner_env import (
    MASTER_INDEX,
    SLEEPER,
    VALIDATOR_INDEX,
    TestMaster,
    create_run,
    desired_entry,
    running_node,
    sign_invite_body,
    wait_until,
    write_keystore,
)
from tests.support.signing import peer_client

pytestmark = pytest.mark.docker


async def _status(*args: str, home: Path) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run, prime_command("miner", "status", *args), env=_child_env({"PRIME_HOME": str(home), "COLUMNS": "200"}),
        capture_output=True, text=True, timeout=60,
    )


async def test_status_shows_chain_discovery_master_and_tasks(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, busybox_image, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    master = await TestMaster(anvil.accounts[MASTER_INDEX], Domain.of(deployment), interval_s=0.3).start()
    master.desired = [desired_entry("busy", busybox_image, SLEEPER)]
    data = tmp_path / "data"
    chain_args = ["--rpc-url", anvil.rpc_url, "--deployment", str(deployment.path), "--data-dir", str(data)]
    try:
        async with running_node(anvil, deployment, run_id, node, data) as miner:
            registered = json.loads((await _status("--json", *chain_args, home=tmp_path)).stdout)
            assert registered["node"] == node.address
            assert registered["chain"]["status"] == "registered" and registered["chain"]["run_id"] == run_id
            assert registered["local"]["master_url"] is None

            await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x05" * 32)
            async with peer_client(master_account, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
                await client.request("POST", f"{miner.url}/invite", json=await sign_invite_body(reader, master_account, run_id, node.address, master.url))
            await master.wait_for(lambda: any(r["state"] == "Running" for r in master.reports("busy")))
            await wait_until(lambda: miner.state.tasks and miner.state.tasks[0]["state"] == "Running", what="a heartbeat with the task")
            await wait_until(lambda: miner.state.announced is not None, what="the announcement")

            done = await _status("--json", *chain_args, home=tmp_path)
            assert done.returncode == 0, done.stderr
            status = json.loads(done.stdout)
            chain, disc, local = status["chain"], status["discovery"], status["local"]
            assert chain["status"] == "active" and chain["run_id"] == run_id and chain["stake_wei"] > 0
            assert chain["discovery_uri"] == discovery.url and disc["url"] == discovery.url
            assert disc["announced"]["ip"] == "127.0.0.1" and disc["announced"]["port"] == miner.options.port
            assert "local state" in disc["source"]
            assert local["master_url"] == master.url and local["master"] == master_account.address
            assert local["last_heartbeat_at"] is not None
            assert [(t["id"], t["state"]) for t in local["tasks"]] == [("busy", "Running")]

            # For people: tables with the same facts; the node's key file gives the address too.
            key_file = write_keystore(tmp_path / "node.json", node)
            table = await _status("--key-file", str(key_file), *chain_args, home=tmp_path)
            assert table.returncode == 0, table.stderr
            for text in ("Status on chain", "active", f"127.0.0.1:{miner.options.port}", master.url, "busy", "Running"):
                assert text in table.stdout, (text, table.stdout)

            # Without a deployment the chain part says why it is missing; the local part is still there.
            offline = json.loads((await _status("--json", "--data-dir", str(data), home=tmp_path)).stdout)
            assert "--deployment" in offline["chain"]["error"] and offline["local"]["master_url"] == master.url
    finally:
        await master.stop()
        remove_prime_containers(docker_client, node.address)


async def test_status_of_a_data_dir_without_a_miner_is_one_sentence(tmp_path: Path) -> None:
    done = await _status("--data-dir", str(tmp_path / "empty"), home=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("Error:") and len(done.stderr.strip().splitlines()) == 1
    assert "--key-file" in done.stderr and "Traceback" not in done.stderr
