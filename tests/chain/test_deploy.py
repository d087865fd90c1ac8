"""Deployment files, deploying, and the clear failures of connecting to the wrong place."""

from __future__ import annotations

import json

import pytest

from prime.chain.anvil import free_port
from prime.chain.client import RegistryClient
from prime.chain.deploy import Deployment, deploy_registry
from prime.errors import ChainError, ConfigError


def test_save_and_load_round_trip(tmp_path):
    original = Deployment(chain_id=31337, registry="0x5fbdb2315678afecb367f032d93f642f64180aa3", block=1, rpc_url="http://127.0.0.1:8545")
    saved = original.save(tmp_path / "sub" / "deployment.json")
    assert saved.path == tmp_path / "sub" / "deployment.json"
    on_disk = json.loads(saved.path.read_text())
    assert on_disk["chain_id"] == 31337 and on_disk["block"] == 1 and on_disk["contract"] == "PrimeRegistry"
    loaded = Deployment.load(saved.path)
    assert loaded == original and loaded.path == saved.path
    assert loaded.registry == "0x5FbDB2315678afecb367f032d93F642f64180aa3"  # checksummed on load
    assert list(tmp_path.joinpath("sub").iterdir()) == [saved.path]  # no temp file left behind


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "does not exist; deploy with `prime chain deploy --out"),
        ("{broken", "is not valid JSON"),
        ('{"chain_id": 1, "block": 0}', "lacks a valid 'registry' field"),
        ('{"chain_id": 1, "registry": "nope", "block": 0}', "lacks a valid"),
    ],
)
def test_load_errors_are_one_sentence(tmp_path, content, fragment):
    path = tmp_path / "deployment.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        Deployment.load(path)
    assert fragment in exc.value.message and str(path) in exc.value.message


async def test_deploy_registry_with_its_own_admin(anvil, fresh_account):
    admin = fresh_account()
    deployment = await deploy_registry(anvil.rpc_url, admin, min_stake_wei=12345)
    assert deployment.chain_id == anvil.chain_id and deployment.rpc_url == anvil.rpc_url
    async with await RegistryClient.connect(anvil.rpc_url, deployment) as client:
        assert await client.min_stake() == 12345
        assert await client.is_admin(admin)
        assert not await client.is_admin(anvil.accounts[0])
        assert await client.run_count() == 0
        assert await client.block_number() >= deployment.block


async def test_deploy_rejects_negative_stake(anvil):
    with pytest.raises(ConfigError, match="cannot be negative"):
        await deploy_registry(anvil.rpc_url, anvil.accounts[0], min_stake_wei=-1)


async def test_unreachable_rpc_names_the_url(deployment, anvil):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ChainError) as exc:
        await RegistryClient.connect(url, deployment)
    assert exc.value.message == (
        f"Cannot reach the chain RPC at {url}; start the node (for a local chain: `prime chain anvil`) or pass the right --rpc-url / PRIME_RPC_URL."
    )
    with pytest.raises(ChainError, match="Cannot reach the chain RPC at"):
        await deploy_registry(url, anvil.accounts[0], min_stake_wei=0)


async def test_wrong_chain_and_missing_contract(anvil, deployment):
    wrong_chain = Deployment(chain_id=1, registry=deployment.registry, block=0, rpc_url=anvil.rpc_url)
    with pytest.raises(ChainError) as chain_exc:
        await RegistryClient.connect(anvil.rpc_url, wrong_chain)
    assert chain_exc.value.message == (
        f"The RPC at {anvil.rpc_url} serves chain {anvil.chain_id} but the deployment is for chain 1; pass the matching --rpc-url or deployment file."
    )
    nowhere = Deployment(chain_id=anvil.chain_id, registry="0x000000000000000000000000000000000000dEaD", block=0, rpc_url=anvil.rpc_url)
    with pytest.raises(ChainError, match="There is no registry contract at 0x000000000000000000000000000000000000dEaD"):
        await RegistryClient.connect(anvil.rpc_url, nowhere)


async def test_connect_with_a_deployment_path(anvil, deployment):
    async with await RegistryClient.connect(anvil.rpc_url, deployment.path) as client:
        assert client.address == deployment.registry
        assert client.deployment == deployment


async def test_rpc_going_away_mid_session(anvil, deployment):
    from prime.chain.anvil import start_anvil

    chain = start_anvil(None)
    try:
        local = await deploy_registry(chain.rpc_url, chain.accounts[0], min_stake_wei=0)
        client = await RegistryClient.connect(chain.rpc_url, local, chain.accounts[0])
    finally:
        chain.stop()
    try:
        with pytest.raises(ChainError, match=f"Cannot reach the chain RPC at {chain.rpc_url}"):
            await client.min_stake()
        with pytest.raises(ChainError, match=f"Cannot reach the chain RPC at {chain.rpc_url}"):
            await client.end_run(1)
    finally:
        await client.close()


async def test_transaction_reverting_when_mined_is_decoded():
    """Two sends that both pass estimation but conflict once mined in one block: the loser's reason is recovered."""
    import asyncio

    from prime.chain.anvil import start_anvil
    from prime.chain.client import RevertError
    from prime.chain.types import Requirements

    chain = start_anvil(None)
    try:
        local = await deploy_registry(chain.rpc_url, chain.accounts[0], min_stake_wei=0)
        async with await RegistryClient.connect(chain.rpc_url, local, chain.accounts[2]) as buyer:
            run_id = await buyer.create_run(Requirements(), "http://127.0.0.1:1", [chain.accounts[3]])
            chain.rpc("evm_setAutomine", [False])
            mining = asyncio.create_task(_mine_every(chain, 0.2))
            try:
                outcomes = await asyncio.gather(buyer.end_run(run_id), buyer.end_run(run_id), return_exceptions=True)
            finally:
                mining.cancel()
            failures = [o for o in outcomes if isinstance(o, Exception)]
            assert len(failures) == 1, outcomes
            assert isinstance(failures[0], RevertError)
            assert failures[0].message == f"Run {run_id} has ended, so it accepts no more changes, registrations or joins."
            # Both were mined (the loser with status 0): the reason came from the mined-revert path, not from estimation.
            statuses = []
            for number in range(local.block + 2, int(chain.rpc("eth_blockNumber"), 16) + 1):
                for tx in chain.rpc("eth_getBlockByNumber", [hex(number), False])["transactions"]:
                    statuses.append(int(chain.rpc("eth_getTransactionReceipt", [tx])["status"], 16))
            assert sorted(statuses) == [0, 1]
    finally:
        chain.stop()


async def _mine_every(chain, seconds: float) -> None:
    import asyncio

    while True:
        await asyncio.sleep(seconds)
        await asyncio.to_thread(chain.rpc, "evm_mine", [])
