"""One master per node (issue 14), on a real miner with a real chain: while the node's master is a
master of the run, another master's invite is refused (409 has_master, nothing sent); once the
run's owner removed it, the other master's invite adopts the node without a second joinRun."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account

from prime.auth.signing import Domain
from prime.chain.types import NodeStatus
from tests.roles.miner.test_invite import _approve, _post
from tests.support.miner_env import BUYER_INDEX, MASTER_INDEX, create_run, running_node, sign_invite_body

pytestmark = pytest.mark.docker


async def test_another_masters_invite_is_refused_until_the_nodes_master_is_removed(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node, provider = fresh_account(0), fresh_account()
    first, second = anvil.accounts[MASTER_INDEX], Account.create()
    owner = await chain_client(anvil.accounts[BUYER_INDEX])
    await owner.add_master(run_id, second.address)
    reader = await chain_client()
    domain = Domain.of(deployment)
    async with running_node(anvil, deployment, run_id, node, tmp_path / "data", provider=provider) as miner:
        await _approve(chain_client, anvil, node)
        body = await sign_invite_body(reader, first, run_id, node.address, "http://127.0.0.1:9/")
        status, answer = await _post(first, f"{miner.url}/invite", body, to=node.address, domain=domain)
        assert status == 200 and answer["tx_hash"], answer

        other = await sign_invite_body(reader, second, run_id, node.address, "http://127.0.0.1:10/")
        status, refused = await _post(second, f"{miner.url}/invite", other, to=node.address, domain=domain)
        assert status == 409 and refused["error"] == "has_master", refused
        assert miner.state.master == first.address

        await owner.remove_master(run_id, first.address)
        nonce = await reader.w3.eth.get_transaction_count(provider.address)
        status, adopted = await _post(second, f"{miner.url}/invite", other, to=node.address, domain=domain)
        assert status == 200 and adopted["tx_hash"] is None, adopted  # no second joinRun
        assert await reader.w3.eth.get_transaction_count(provider.address) == nonce
        assert (miner.state.master, miner.state.master_url) == (second.address, "http://127.0.0.1:10")
        assert await reader.node_status(node.address) == NodeStatus.ACTIVE
