"""A world for validator tests: a real discovery process, a run on the real anvil, a funded
provider, and a fresh validator key (granted VALIDATOR_ROLE) in an encrypted key file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest_asyncio
from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.auth.permissions import ChainPermissions
from prime.chain.client import RegistryClient
from prime.chain.types import Requirements
from prime.keys import create_keystore
from tests.fixtures.processes import (
    RoleProcess,
    RoleProcesses,
    free_port,
    prime_command,
)
from tests.roles.validator.support import (
    REPO_ROOT,
    InProcessMiner,
    MinerProcess,
    miner_process_command,
)

PASSWORD = "validator-test"
FAST_KDF = {"kdf": "pbkdf2", "iterations": 2}


@dataclass
class World:
    rpc_url: str
    deployment_path: Path
    discovery: RoleProcess
    run_id: int
    validator: LocalAccount
    validator_key_file: Path
    provider: RegistryClient  # sends registerNode for the tests' nodes
    reader: RegistryClient
    permissions: ChainPermissions

    def validator_command(self, port: int, data_dir: Path, *extra: str, key_file: Path | None = None) -> list[str]:
        return prime_command(
            "validator", "start", "--host", "127.0.0.1", "--port", str(port), "--rpc-url", self.rpc_url,
            "--deployment", str(self.deployment_path), "--key-file", str(key_file or self.validator_key_file),
            "--data-dir", str(data_dir), "--poll-interval", "0.2", "--challenge-n", "64", *extra,
        )


DISCOVERY_KEY = Account.create()  # the discovery's own key, named in the run's discovery URI


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory) -> AsyncIterator[World]:
    from prime.auth.signing import Domain
    from tests.roles.validator.support import WORLD_DOMAIN

    WORLD_DOMAIN[:] = [Domain.of(deployment)]
    port = free_port()
    discovery = module_role_processes.create(
        "discovery",
        prime_command("discovery", "start", "--host", "127.0.0.1", "--port", str(port), "--rpc-url", anvil.rpc_url,
                      "--deployment", str(deployment.path), "--data-dir", str(tmp_path_factory.mktemp("discovery"))),
        port=port, env={"PRIME_PRIVATE_KEY": DISCOVERY_KEY.key.hex()},
    )
    await discovery.start_async()

    admin, buyer, master = anvil.accounts[0], anvil.accounts[2], anvil.accounts[3]
    validator = Account.create()
    anvil.set_balance(validator.address, 100 * 10**18)
    key_dir = tmp_path_factory.mktemp("validator-key")
    create_keystore(key_dir / "validator.json", PASSWORD, validator.key.hex(), **FAST_KDF)
    provider_account = Account.create()
    anvil.set_balance(provider_account.address, 1000 * 10**18)

    async with await RegistryClient.connect(anvil.rpc_url, deployment, admin) as admin_client:
        await admin_client.grant_validator(validator.address)
    async with await RegistryClient.connect(anvil.rpc_url, deployment, buyer) as owner:
        run_id = await owner.create_run(Requirements(), f"{discovery.base_url}#{DISCOVERY_KEY.address}", [master.address])

    provider = await RegistryClient.connect(anvil.rpc_url, deployment, provider_account)
    reader = await RegistryClient.connect(anvil.rpc_url, deployment)
    world = World(anvil.rpc_url, deployment.path, discovery, run_id, validator, key_dir / "validator.json", provider,
                  reader, ChainPermissions(reader, ttl_s=1.0))
    try:
        yield world
    finally:
        await provider.close()
        await reader.close()


@pytest_asyncio.fixture(loop_scope="session")
async def start_miner(world: World) -> AsyncIterator[Callable]:
    """``await start_miner(prover)``: an in-process miner for a new node key (stopped after the test)."""
    from tests.roles.validator.support import new_node

    started: list[InProcessMiner] = []

    async def make(prover) -> InProcessMiner:
        miner = await InProcessMiner(new_node(), prover, world.permissions).start()
        started.append(miner)
        return miner

    yield make
    for miner in started:
        await miner.stop()


VALIDATOR_ENV = {"PRIME_KEY_PASSWORD": PASSWORD}


class RealMiners:
    """Real miner processes for the world's run (honest, or cheating with ``mode``)."""

    def __init__(self, world: World, anvil, deployment, role_processes: RoleProcesses, tmp_path: Path, fresh_account) -> None:
        self.world, self.anvil, self.deployment = world, anvil, deployment
        self.role_processes, self.tmp_path, self.fresh_account = role_processes, tmp_path, fresh_account
        self.count = 0

    def create(self, mode: str | None = None, *, delay_s: float | None = None,
               node: LocalAccount | None = None) -> MinerProcess:
        """A miner process not started yet; its node key (funded) is its own provider."""
        from tests.support.miner_env import miner_args, miner_env, write_keystore

        node = node or self.fresh_account()
        self.count += 1
        port, base = free_port(), self.tmp_path / f"miner{self.count}"
        base.mkdir()
        args = miner_args(run_id=self.world.run_id, port=port, key_file=write_keystore(base / "node.json", node),
                          data_dir=base / "data", anvil=self.anvil, deployment=self.deployment)
        process = self.role_processes.create(
            f"miner{self.count}-{mode or 'honest'}", miner_process_command(mode, args, delay_s=delay_s), port=port,
            env=miner_env(base / "home"), cwd=REPO_ROOT,
        )
        return MinerProcess(node, process)

    async def start(self, mode: str | None = None, *, delay_s: float | None = None) -> MinerProcess:
        miner = self.create(mode, delay_s=delay_s)
        await miner.process.start_async(timeout_s=90)
        return miner


@pytest_asyncio.fixture(loop_scope="session")
async def real_miners(world: World, anvil, deployment, role_processes: RoleProcesses, docker_client, tmp_path: Path,
                      fresh_account) -> RealMiners:
    """Start real `prime miner start` processes (the miner's preflight needs the Docker engine)."""
    return RealMiners(world, anvil, deployment, role_processes, tmp_path, fresh_account)
