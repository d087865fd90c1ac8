"""`prime miner start` while the chain RPC is stalled: it waits (one visible line) and comes up when the chain returns."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from eth_account import Account

from prime.chain.client import RegistryClient
from prime.chain.types import NodeStatus, Requirements
from tests.fixtures.processes import free_port
from tests.support.miner_env import BUYER_INDEX, MASTER_INDEX, miner_command, miner_env, write_keystore
from tests.support.stalled_chain import own_chain, stalled

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


async def test_a_miner_started_during_a_chain_stall_comes_up_when_the_chain_returns(
    role_processes, docker_client, tmp_path: Path
) -> None:
    async with own_chain(tmp_path) as (chain, deployment):
        async with await RegistryClient.connect(chain.rpc_url, deployment, chain.accounts[BUYER_INDEX]) as buyer:
            discovery_uri = f"http://127.0.0.1:{free_port()}#{Account.create().address}"  # nobody there: announcing may fail
            run_id = await buyer.create_run(Requirements(), discovery_uri, [chain.accounts[MASTER_INDEX].address])
        node, provider = Account.create(), chain.accounts[5]
        port = free_port()
        command = miner_command(
            run_id=run_id, port=port, key_file=write_keystore(tmp_path / "node.json", node), data_dir=tmp_path / "data",
            anvil=chain, deployment=deployment, provider_key_file=write_keystore(tmp_path / "provider.json", provider),
        )
        process = role_processes.create("miner", command, port=port, env=miner_env(tmp_path / "home"))
        with stalled(chain):
            process.spawn()
            deadline = time.monotonic() + 90
            while "does not answer" not in process.logs():
                assert process.running, process.logs()
                assert time.monotonic() < deadline, process.logs()
                await asyncio.sleep(0.2)
            await asyncio.sleep(5)  # a few retries into the stall: still waiting, not exited
            assert process.running, process.logs()
        await process.wait_healthy_async(timeout_s=90)
        async with await RegistryClient.connect(chain.rpc_url, deployment) as reader:
            info = await reader.get_node(node.address)
        assert info.status == NodeStatus.REGISTERED and info.run_id == run_id
        logs = process.logs()
        assert "retrying every" in logs and "answers again" in logs and "Traceback" not in logs
        process.stop()
