"""Finding, starting and stopping anvil."""

from __future__ import annotations

import pytest

from prime.chain import anvil as anvil_mod
from prime.chain.anvil import dev_accounts, find_anvil, rpc_call, start_anvil
from prime.errors import ChainError, PrimeError


def test_binary_from_npm_is_found_and_runs():
    path = find_anvil()
    assert path.name == "anvil" and path.is_file()


def test_missing_binary_says_how_to_install(monkeypatch):
    monkeypatch.delenv("PRIME_ANVIL_BIN", raising=False)
    monkeypatch.setattr(anvil_mod, "_contracts_dirs", lambda: [])
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PrimeError) as exc:
        find_anvil()
    assert "npm install -g @foundry-rs/anvil" in exc.value.message and "cd contracts && npm ci" in exc.value.message
    assert "PRIME_ANVIL_BIN" in exc.value.message and exc.value.message.count(".") == 1 and exc.value.message.endswith(".")


def test_bad_explicit_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIME_ANVIL_BIN", str(tmp_path / "nothing"))
    with pytest.raises(PrimeError, match="PRIME_ANVIL_BIN points to"):
        find_anvil()


def test_session_anvil_has_the_dev_accounts(anvil):
    assert [a.lower() for a in anvil.rpc("eth_accounts")] == [a.address.lower() for a in anvil.accounts]
    assert anvil.accounts[0].address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert dev_accounts(2) == anvil.accounts[:2]
    assert int(anvil.rpc("eth_chainId"), 16) == anvil.chain_id == 31337


def test_start_and_stop_on_a_chosen_chain_id():
    with start_anvil(None, chain_id=4242) as chain:
        assert int(rpc_call(chain.rpc_url, "eth_chainId"), 16) == 4242
    assert not chain.running
    with pytest.raises(ChainError, match="Cannot reach the chain RPC"):
        rpc_call(chain.rpc_url, "eth_chainId", timeout_s=1)


def test_busy_port_is_a_clear_error(anvil):
    with pytest.raises(ChainError) as exc:
        start_anvil(anvil.port, startup_timeout_s=5)
    assert exc.value.message.startswith(f"Could not start anvil on 127.0.0.1:{anvil.port}")
    assert anvil.running


def test_anvil_keeps_no_old_states_on_disk_and_forgets_no_block(monkeypatch, tmp_path):
    """Past 500 blocks anvil used to write every older state under ~/.foundry/anvil/tmp and leave it there
    (about 130 MB a test run); what we start keeps none on disk, yet every block and the latest state stay."""
    monkeypatch.setenv("HOME", str(tmp_path))  # anvil's cache dir follows HOME
    blocks = 650
    with start_anvil(None) as chain:
        for i in range(blocks):
            chain.set_balance(f"0x{i + 1:040x}", 10**18 + i)
            chain.rpc("evm_mine")
        assert int(chain.rpc("eth_blockNumber"), 16) == blocks
        assert int(chain.rpc("eth_getBalance", [f"0x{5:040x}", "latest"]), 16) == 10**18 + 4
        assert chain.rpc("eth_getBlockByNumber", ["0x1", False])["number"] == "0x1"
    cache = tmp_path / ".foundry" / "anvil" / "tmp"
    assert not cache.exists() or not any(cache.iterdir()), sorted(p.name for p in cache.iterdir())


def test_the_devnet_anvil_keeps_no_old_states_on_disk_either(tmp_path):
    from prime.devnet.state import DevnetPaths
    from prime.devnet.up import anvil_command

    command = anvil_command(DevnetPaths(tmp_path), 8545)
    at = command.index(anvil_mod.NO_DISK_STATES[0])
    assert tuple(command[at:at + 2]) == anvil_mod.NO_DISK_STATES
