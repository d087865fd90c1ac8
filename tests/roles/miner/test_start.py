"""`prime miner start` as a real process: registration, discovery, refusal, rejection.

Real anvil, real discovery process, real Docker engine (preflight), real signatures.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from prime.auth.signing import Domain
from prime.chain.types import NodeStatus
from prime.clients.discovery import DiscoveryClient
from tests.fixtures.chain import MIN_STAKE_WEI
from tests.fixtures.processes import _child_env, free_port
from tests.support.miner_env import (
    VALIDATOR_INDEX,
    create_run,
    miner_command,
    miner_env,
    wait_until,
    write_keystore,
)
from tests.support.signing import peer_client

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


async def test_start_registers_the_node_and_announces_it(
    role_processes, discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node, provider = fresh_account(0), fresh_account()  # the node key holds no ETH: the provider pays
    port = free_port()
    command = miner_command(
        run_id=run_id, port=port, key_file=write_keystore(tmp_path / "node.json", node), data_dir=tmp_path / "data",
        anvil=anvil, deployment=deployment, provider_key_file=write_keystore(tmp_path / "provider.json", provider),
    )
    process = await role_processes.start_async("miner", command, port=port, env=miner_env(tmp_path / "home"), timeout_s=90)

    reader = await chain_client()
    info = await reader.get_node(node.address)
    assert info.status == NodeStatus.REGISTERED
    assert info.run_id == run_id and info.provider == provider.address and info.stake == MIN_STAKE_WEI
    assert info.specs.gpu_count == 0 and info.specs.cpu_cores >= 1

    async with peer_client(anvil.accounts[VALIDATOR_INDEX], to=discovery.address, domain=Domain.of(deployment)) as client:
        lookup = DiscoveryClient(client, discovery.url)
        record = await wait_until(lambda: lookup.get_node(node.address), timeout_s=30, what="the node's announcement")
    assert (record.ip, record.port, record.run_id) == ("127.0.0.1", port, run_id)
    assert process.running

    # A second miner on the same data dir is refused in one sentence, and leaves the first alone.
    second = miner_command(
        run_id=run_id, port=free_port(), key_file=tmp_path / "node.json", data_dir=tmp_path / "data",
        anvil=anvil, deployment=deployment,
    )
    refused = await asyncio.to_thread(
        subprocess.run, second, check=False, env=_child_env(miner_env(tmp_path / "home")), capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert process.proc is not None
    expected = (f"Error: Another miner (pid {process.proc.pid}) is already running with data directory {tmp_path / 'data'}; "
                "stop it or pass another --data-dir.")
    assert [line for line in refused.stderr.splitlines() if line.strip()] == [expected]
    assert process.running

    # A second start of the same node sends no second registration.
    process.stop()
    before = len(await reader.get_logs(deployment.block, await reader.block_number(), ["NodeRegistered"]))
    await process.start_async(timeout_s=90)
    after = await reader.get_logs(deployment.block, await reader.block_number(), ["NodeRegistered"])
    assert len(after) == before
    assert "no transaction sent" in process.logs()


async def test_start_refuses_a_run_the_node_does_not_meet_before_any_transaction(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url, min_gpus=1)
    node = fresh_account()
    command = miner_command(
        run_id=run_id, port=free_port(), key_file=write_keystore(tmp_path / "node.json", node),
        data_dir=tmp_path / "data", anvil=anvil, deployment=deployment,
    )
    reader = await chain_client()
    start_block = await reader.block_number()
    done = await asyncio.to_thread(
        subprocess.run, command, env=_child_env(miner_env(tmp_path / "home")), capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("Error:") and done.stderr.count("Error:") == 1, done.stderr
    assert "0 GPU(s)" in error and "at least 1" in error and f"run {run_id}" in error
    assert "Traceback" not in done.stderr + done.stdout
    assert await reader.node_status(node.address) == NodeStatus.NONE
    registered = await reader.get_logs(start_block, await reader.block_number(), ["NodeRegistered"])
    assert all(event.args["node"] != node.address for event in registered)
    assert await reader.w3.eth.get_transaction_count(node.address) == 0


async def test_rejected_node_exits_with_the_validators_reason(
    role_processes, discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    port = free_port()
    command = miner_command(
        run_id=run_id, port=port, key_file=write_keystore(tmp_path / "node.json", node),
        data_dir=tmp_path / "data", anvil=anvil, deployment=deployment,
    )
    process = await role_processes.start_async("miner", command, port=port, env=miner_env(tmp_path / "home"), timeout_s=90)
    validator = anvil.accounts[VALIDATOR_INDEX]
    report_hash = "0x" + "ab" * 32
    async with peer_client(validator, to=node.address, domain=Domain.of(deployment)) as client:
        answer = await client.request(
            "POST", f"{process.base_url}/challenge/c-1/verdict",
            json={"approved": False, "reason": "row 17 of the product is wrong", "report_hash": report_hash},
        )
    assert answer == {"ok": True}
    await (await chain_client(validator)).report_validation(node.address, False, bytes.fromhex(report_hash[2:]))

    code = await asyncio.to_thread(process.proc.wait, 60)
    assert code != 0
    last = process.logs().strip().splitlines()[-1]
    assert "rejected" in last and "row 17 of the product is wrong" in last and validator.address in last


async def test_start_with_an_unknown_run_or_bad_public_ip_is_one_sentence(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    key_file = write_keystore(tmp_path / "node.json", node)
    cases = (
        (["--run-id", "999999"], "Run 999999 does not exist"),
        (["--public-ip", "not-an-ip"], "--public-ip"),
    )
    for extra, expected in cases:
        command = miner_command(
            run_id=run_id, port=free_port(), key_file=key_file, data_dir=tmp_path / "data", anvil=anvil, deployment=deployment, extra=extra,
        )
        done = await asyncio.to_thread(
            subprocess.run, command, env=_child_env(miner_env(tmp_path / "home")), capture_output=True, text=True, timeout=120
        )
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 1 and last.startswith("Error:") and expected in last, done.stderr
        assert "Traceback" not in done.stderr
    assert await (await chain_client()).node_status(node.address) == NodeStatus.NONE
