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
from prime.errors import ChainError, ConfigError


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
