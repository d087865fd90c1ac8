"""What the benchmarks against a real master share: the registry on a fresh anvil, a discovery and a
`prime master start` process for a new run (the tests' short settings, the liveness asked for),
and polling. Used by bench/recovery.py, bench/groups.py and bench/heartbeats.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from eth_account import Account

from prime.chain.client import RegistryClient
from prime.chain.deploy import deploy_registry
from prime.chain.types import Requirements
from prime.roles.master.lifecycle import StateConfig
from tests.fixtures.processes import RoleProcesses, free_port
from tests.roles.master.fake_miner import PASSWORD, World, discovery_command, master_command, write_key


async def deploy_for_bench(anvil: Any, work: Path) -> Any:
    """The registry deployed on ``anvil`` (account 0 admin, account 1 a validator), saved in ``work``."""
    admin, validator = anvil.accounts[0], anvil.accounts[1]
    deployed = await deploy_registry(anvil.rpc_url, admin, min_stake_wei=10**15)
    async with await RegistryClient.connect(anvil.rpc_url, deployed, admin) as client:
        await client.grant_validator(validator)
    return deployed.save(work / "deployment.json")


async def wait_for(check: Any, *, timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(interval_s)


async def start_world(anvil: Any, deployment: Any, processes: RoleProcesses, tmp: Path, interval_s: float,
                      dead_after: int, grace_s: float) -> World:
    disc_port = free_port()
    discovery_key = Account.create()
    discovery = processes.create("discovery", discovery_command(disc_port, anvil.rpc_url, deployment.path, tmp / "discovery"),
                                 port=disc_port, env={"PRIME_PRIVATE_KEY": discovery_key.key.hex()})
    await discovery.start_async()
    owner, validator = anvil.accounts[2], anvil.accounts[1]
    master_account = Account.create()
    owner_client = await RegistryClient.connect(anvil.rpc_url, deployment, owner)
    validator_client = await RegistryClient.connect(anvil.rpc_url, deployment, validator)
    run_id = await owner_client.create_run(Requirements(min_gpus=1), f"{discovery.base_url}#{discovery_key.address}",
                                           [master_account.address])
    port = free_port()
    # The fixtures' short test settings, then the master's own defaults for liveness (the last flag wins).
    command = master_command(port, run_id, write_key(tmp, master_account), anvil.rpc_url, deployment.path, tmp / "master",
                             "--heartbeat-interval", f"{interval_s:g}",
                             "--unhealthy-after", str(StateConfig().unhealthy_after_missed),
                             "--dead-after", str(dead_after), "--heartbeat-grace", f"{grace_s:g}")
    master = processes.create("master", command, port=port, env={"PRIME_KEY_PASSWORD": PASSWORD})
    await master.start_async(timeout_s=60)
    return World(discovery, master, run_id, owner, master_account, validator, validator_client, owner_client,
                 anvil.rpc_url, deployment, tmp, discovery_key=discovery_key)


