"""`prime chain ...` commands, run as a person would: a real process against the real anvil."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prime.chain.anvil import free_port, rpc_call
from prime.chain.cli import parse_wei
from prime.chain.client import RegistryClient
from prime.chain.types import Requirements
from prime.errors import ChainError, ConfigError
from tests.fixtures.chain import MIN_STAKE_WEI


def prime(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "prime.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.mark.parametrize(
    ("text", "wei"),
    [("0", 0), ("1000", 1000), ("1000wei", 1000), ("5gwei", 5 * 10**9), ("0.01eth", 10**16), ("2 ETH", 2 * 10**18), ("1.5ether", 15 * 10**17)],
)
def test_parse_wei(text, wei):
    assert parse_wei(text) == wei


@pytest.mark.parametrize("text", ["", "-1", "1.5", "abc", "1btc", "0.0000000000000000001eth"])
def test_parse_wei_rejects(text):
    with pytest.raises(ConfigError):
        parse_wei(text)


async def test_deploy_writes_the_deployment_and_grants_validators(anvil, tmp_path):
    out = tmp_path / "deployment.json"
    admin, validator = anvil.accounts[5], anvil.accounts[6]
    result = prime(
        "chain", "deploy", "--out", str(out), "--min-stake", "0.5eth", "--validator", validator.address,
        env={"PRIME_RPC_URL": anvil.rpc_url, "PRIME_PRIVATE_KEY": admin.key.hex()},
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved["chain_id"] == anvil.chain_id
    assert f"admin:      {admin.address}" in result.stdout and f"validator:  {validator.address}" in result.stdout

    info = prime("chain", "info", "--deployment", str(out), env={"PRIME_RPC_URL": anvil.rpc_url})
    assert info.returncode == 0, info.stderr
    assert f"min stake: {5 * 10**17} wei" in info.stdout and f"registry:  {saved['registry']}" in info.stdout

    grant = prime("chain", "grant-validator", anvil.accounts[7].address, "--deployment", str(out),
                  env={"PRIME_RPC_URL": anvil.rpc_url, "PRIME_PRIVATE_KEY": admin.key.hex()})
    assert grant.returncode == 0, grant.stderr
    not_admin = prime("chain", "set-min-stake", "1eth", "--deployment", str(out),
                      env={"PRIME_RPC_URL": anvil.rpc_url, "PRIME_PRIVATE_KEY": validator.key.hex()})
    assert not_admin.returncode == 1
    assert f"Account {validator.address} does not have the admin role needed for this." in not_admin.stderr
    assert "Traceback" not in not_admin.stderr

    async with await RegistryClient.connect(anvil.rpc_url, out) as client:
        assert await client.is_admin(admin)
        assert await client.is_validator(validator) and await client.is_validator(anvil.accounts[7])
        assert await client.min_stake() == 5 * 10**17


def test_deploy_to_an_unreachable_rpc_is_one_sentence(anvil, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = prime("chain", "deploy", "--rpc-url", url, "--out", str(tmp_path / "d.json"),
                   env={"PRIME_PRIVATE_KEY": anvil.accounts[0].key.hex()})
    assert result.returncode == 1
    assert f"Cannot reach the chain RPC at {url}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "d.json").exists()


def test_deploy_without_a_key_is_one_sentence(anvil, tmp_path):
    result = prime("chain", "deploy", "--rpc-url", anvil.rpc_url, "--out", str(tmp_path / "d.json"))
    assert result.returncode == 1
    assert "--key-file" in result.stderr and "Traceback" not in result.stderr


def test_bad_min_stake_is_one_sentence(anvil, tmp_path):
    result = prime("chain", "deploy", "--rpc-url", anvil.rpc_url, "--min-stake", "lots", "--out", str(tmp_path / "d.json"),
                   env={"PRIME_PRIVATE_KEY": anvil.accounts[0].key.hex()})
    assert result.returncode == 1
    assert "'lots' is not an amount" in result.stderr


def test_anvil_command_serves_deploys_and_stops(tmp_path):
    port = free_port()
    out = tmp_path / "deployment.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "prime.cli", "chain", "anvil", "--port", str(port), "--deploy-out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert out.exists(), process.stdout.read() if process.poll() is not None else "no deployment file"
        registry = json.loads(out.read_text())["registry"]
        assert rpc_call(f"http://127.0.0.1:{port}", "eth_getCode", [registry, "latest"]) not in ("0x", None)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    assert process.returncode == 0, process.stdout.read()
    with pytest.raises(ChainError, match="Cannot reach"):  # anvil went down with the command
        rpc_call(f"http://127.0.0.1:{port}", "eth_chainId", timeout_s=1)


# --- operator commands: leave, withdraw, deregister, eject, slash ----------------------------------


async def _active_node(anvil, deployment, chain_client, fresh_account):
    """A run, a provider and its node, registered (minimum stake), approved and joined: (run id, provider, node)."""
    from tests.fixtures.chain import invite_expiry, onboard_node

    buyer, master = await chain_client(anvil.accounts[2]), await chain_client(anvil.accounts[3])
    provider, node = fresh_account(), fresh_account(balance_eth=1)
    run_id = await buyer.create_run(Requirements(), "http://127.0.0.1:8090", [anvil.accounts[3]])
    provider_client = await chain_client(provider)
    await onboard_node(provider_client, await chain_client(anvil.accounts[1]), run_id, node)
    expiry = await invite_expiry(master)
    await provider_client.join_run(run_id, node, expiry, master.sign_invite(anvil.accounts[3], run_id, node, expiry))
    return run_id, provider, node


def _chain_env(anvil, deployment, key) -> dict[str, str]:
    return {"PRIME_RPC_URL": anvil.rpc_url, "PRIME_DEPLOYMENT": str(deployment.path), "PRIME_PRIVATE_KEY": key.key.hex()}


async def test_miner_deregister_returns_the_stake_to_the_provider(anvil, deployment, chain_client, fresh_account):
    run_id, provider, node = await _active_node(anvil, deployment, chain_client, fresh_account)
    reader = await chain_client(None)
    stake = (await reader.get_node(node)).stake
    assert stake == MIN_STAKE_WEI
    before = await reader.balance(provider)

    # Sent with the node's key: the node pays the gas, so the provider's balance grows by exactly the stake.
    result = prime("miner", "deregister", "--json", env=_chain_env(anvil, deployment, node))
    assert result.returncode == 0, result.stderr
    leave, withdraw = json.loads(result.stdout)["changes"]
    assert (leave["action"], leave["sent"], leave["status_before"], leave["status_after"]) == ("leave", True, "active", "left")
    assert (withdraw["action"], withdraw["sent"], withdraw["amount"], withdraw["payee"]) == ("withdraw", True, stake, provider.address)
    assert withdraw["payee_balance_after"] - withdraw["payee_balance_before"] == stake
    assert await reader.balance(provider) == before + stake
    record = await reader.get_node(node)
    assert (record.status.label, record.stake, record.run_id) == ("left", 0, run_id)

    again = prime("miner", "deregister", env=_chain_env(anvil, deployment, node))
    assert again.returncode == 0, again.stderr
    assert "no leave needed; nothing was sent" in again.stdout and "no stake left to withdraw; nothing was sent" in again.stdout

    empty = prime("miner", "withdraw", env=_chain_env(anvil, deployment, node))
    assert empty.returncode == 1
    assert f"Node {node.address} has no stake left to withdraw." in empty.stderr and "Traceback" not in empty.stderr
    assert await reader.balance(provider) == before + stake


async def test_miner_leave_then_withdraw_by_the_provider(anvil, deployment, chain_client, fresh_account):
    from tests.fixtures.chain import onboard_node

    buyer = await chain_client(anvil.accounts[2])
    provider, node = fresh_account(), fresh_account(balance_eth=0)
    run_id = await buyer.create_run(Requirements(), "http://127.0.0.1:8090", [anvil.accounts[3]])
    await onboard_node(await chain_client(provider), await chain_client(anvil.accounts[1]), run_id, node)
    env = _chain_env(anvil, deployment, provider)

    locked = prime("miner", "withdraw", "--node", node.address, env=env)
    assert locked.returncode == 1
    assert f"The stake of node {node.address} is locked while it is approved; leave the run first." in locked.stderr

    left = prime("miner", "leave", "--node", node.address, env=env)
    assert left.returncode == 0, left.stderr
    assert f"Node {node.address} left run {run_id}: status approved → left" in left.stdout
    assert "its stake of 0.01 ETH can now be withdrawn" in left.stdout

    twice = prime("miner", "leave", "--node", node.address, env=env)
    assert twice.returncode == 1
    assert f"Node {node.address} cannot leave in status left" in twice.stderr and "Traceback" not in twice.stderr

    paid = prime("miner", "withdraw", "--node", node.address, env=env)
    assert paid.returncode == 0, paid.stderr
    assert f"Node {node.address}: 0.01 ETH of stake returned to provider {provider.address} (balance " in paid.stdout
    assert "stake 0.01 ETH → 0 ETH" in paid.stdout
    reader = await chain_client(None)
    assert (await reader.get_node(node)).stake == 0


async def test_master_eject_and_chain_slash(anvil, deployment, chain_client, fresh_account):
    run_id, provider, node = await _active_node(anvil, deployment, chain_client, fresh_account)
    reader = await chain_client(None)
    stranger = fresh_account()

    refused = prime("master", "eject", node.address, env=_chain_env(anvil, deployment, stranger))
    assert refused.returncode == 1
    assert f"{stranger.address} is not a master of run {run_id}." in refused.stderr and "Traceback" not in refused.stderr

    ejected = prime("master", "eject", node.address, "--json", env=_chain_env(anvil, deployment, anvil.accounts[3]))
    assert ejected.returncode == 0, ejected.stderr
    (change,) = json.loads(ejected.stdout)["changes"]
    assert (change["action"], change["run_id"], change["status_before"], change["status_after"]) == ("eject", run_id, "active", "ejected")
    assert (await reader.get_node(node)).status.label == "ejected"

    not_admin = prime("chain", "slash", node.address, "0.004eth", env=_chain_env(anvil, deployment, stranger))
    assert not_admin.returncode == 1
    assert f"Account {stranger.address} does not have the admin role needed for this." in not_admin.stderr

    too_much = prime("chain", "slash", node.address, "1eth", env=_chain_env(anvil, deployment, anvil.accounts[0]))
    assert too_much.returncode == 1
    assert f"its stake is {MIN_STAKE_WEI} wei" in too_much.stderr

    slashed = prime("chain", "slash", node.address, "0.004eth", env=_chain_env(anvil, deployment, anvil.accounts[0]))
    assert slashed.returncode == 0, slashed.stderr
    assert f"Node {node.address}: 0.004 ETH slashed and paid to {anvil.accounts[0].address}" in slashed.stdout
    assert "stake 0.01 ETH → 0.006 ETH" in slashed.stdout
    assert (await reader.get_node(node)).stake == MIN_STAKE_WEI - 4 * 10**15

    unknown = fresh_account(balance_eth=0)
    missing = prime("miner", "deregister", "--node", unknown.address, env=_chain_env(anvil, deployment, provider))
    assert missing.returncode == 1
    assert f"Node {unknown.address} is not registered with the registry" in missing.stderr


async def test_chain_info_json(anvil, deployment):
    result = prime("chain", "info", "--json", "--deployment", str(deployment.path), env={"PRIME_RPC_URL": anvil.rpc_url})
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["registry"] == deployment.registry and facts["min_stake_wei"] == MIN_STAKE_WEI
    assert facts["chain_id"] == anvil.chain_id and facts["run_count"] >= 0


async def test_after_the_run_ends_deregister_skips_the_leave_and_withdraws(anvil, deployment, chain_client, fresh_account):
    run_id, provider, node = await _active_node(anvil, deployment, chain_client, fresh_account)
    await (await chain_client(anvil.accounts[2])).end_run(run_id)
    reader = await chain_client(None)
    assert (await reader.get_node(node)).status.label == "released"
    before = await reader.balance(provider)

    result = prime("miner", "deregister", env=_chain_env(anvil, deployment, node))
    assert result.returncode == 0, result.stderr
    leave, withdraw = result.stdout.strip().splitlines()
    assert leave == f"Node {node.address}: already out of run {run_id} (status released), no leave needed; nothing was sent."
    assert withdraw.startswith(f"Node {node.address}: 0.01 ETH of stake returned to provider {provider.address} (balance ")
    assert await reader.balance(provider) == before + MIN_STAKE_WEI
