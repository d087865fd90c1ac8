"""Killing and restarting a real miner process while its task runs.

The restarted miner adopts the running container (exactly one container, the same one),
resumes heartbeats to the persisted master and sends no second joinRun.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from prime.auth.signing import Domain
from prime.chain.types import NodeStatus
from tests.fixtures.docker import remove_prime_containers
from tests.fixtures.processes import free_port
from tests.support.miner_env import (
    MASTER_INDEX,
    SLEEPER,
    VALIDATOR_INDEX,
    TestMaster,
    create_run,
    desired_entry,
    miner_command,
    miner_env,
    sign_invite_body,
    write_keystore,
)
from tests.support.signing import peer_client, signed

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


async def test_restart_while_a_task_runs_keeps_exactly_one_container(
    role_processes, discovery, anvil, deployment, chain_client, fresh_account, docker_client, busybox_image, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node, provider = fresh_account(0), fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    master = await TestMaster(anvil.accounts[MASTER_INDEX], Domain.of(deployment), interval_s=0.3).start()
    master.desired = [desired_entry("steady", busybox_image, SLEEPER)]
    port = free_port()
    command = miner_command(
        run_id=run_id, port=port, key_file=write_keystore(tmp_path / "node.json", node), data_dir=tmp_path / "data",
        anvil=anvil, deployment=deployment, provider_key_file=write_keystore(tmp_path / "provider.json", provider),
    )
    labels = {"label": [f"prime.node={node.address}", "prime.task_id=steady"]}
    try:
        process = await role_processes.start_async("miner", command, port=port, env=miner_env(tmp_path / "home"), timeout_s=90)
        await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x04" * 32)
        async with peer_client(master_account, to=node.address, domain=Domain.of(deployment), retries=0) as client:
            await client.request(
                "POST", f"{process.base_url}/invite",
                json=await sign_invite_body(reader, master_account, run_id, node.address, master.url),
            )
        await master.wait_for(lambda: any(r["state"] == "Running" for r in master.reports("steady")))
        (before,) = docker_client.containers.list(all=True, filters=labels, ignore_removed=True)
        provider_nonce = await reader.w3.eth.get_transaction_count(provider.address)

        # A request the master signed, captured on the wire: used once before the crash...
        captured = signed(master_account, "GET", "/tasks", to=node.address, domain=Domain.of(deployment))
        async with aiohttp.ClientSession() as session, session.get(f"{process.base_url}/tasks", headers=captured) as answer:
            assert answer.status == 200

        process.kill()  # a crash: no tidy shutdown
        beats_before_restart = len(master.heartbeats)
        await process.start_async(timeout_s=90)
        # ...and refused after it: the miner's nonces outlive the process.
        async with aiohttp.ClientSession() as session, session.get(f"{process.base_url}/tasks", headers=captured) as answer:
            assert answer.status == 401 and "already used" in (await answer.json())["detail"]
        await master.wait_for(lambda: len(master.heartbeats) >= beats_before_restart + 3)
        await master.wait_for(lambda: master.reports("steady")[-1]["state"] == "Running")

        after = docker_client.containers.list(all=True, filters=labels, ignore_removed=True)
        assert [c.id for c in after] == [before.id]
        after[0].reload()
        assert after[0].status == "running" and after[0].attrs["RestartCount"] == 0
        assert after[0].attrs["State"]["StartedAt"] == before.attrs["State"]["StartedAt"]
        assert await reader.node_status(node.address) == NodeStatus.ACTIVE
        assert await reader.w3.eth.get_transaction_count(provider.address) == provider_nonce  # no new joinRun
        joined = await reader.get_logs(deployment.block, await reader.block_number(), ["NodeJoined"])
        assert [e.args["node"] for e in joined].count(node.address) == 1
        assert "Adopted 1 task container(s)" in process.logs()

        # A graceful stop (SIGTERM) leaves the task running too.
        assert process.stop() == 0
        (still,) = docker_client.containers.list(all=True, filters=labels, ignore_removed=True)
        still.reload()
        assert still.id == before.id and still.status == "running"
    finally:
        await master.stop()
        remove_prime_containers(docker_client, node.address)
