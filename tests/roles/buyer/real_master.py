"""The master the buyer CLI tests talk to: a real `prime master start` process on a real anvil.

No hand-written copy of the master's routes: the owner API, its validation, placement, the
on-chain owner check, log merging and storage sync are the master's own. Around it, the world
the master needs: a discovery process, a run owned by anvil account 2, and two nodes played by
the master tests' ``FakeMiner`` (real signatures, real joinRun; the test sets what they report,
serve as logs and list as files):

- ``node`` (2 GPUs, NVIDIA H100) heartbeats every 0.2 s and stays Healthy: every replica is
  placed on it;
- ``quiet`` heartbeats once and then never again: Unhealthy after 2 s (Dead only after an hour).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.chain.client import RegistryClient
from prime.chain.types import Requirements
from prime.protocol.tasks import FINAL_REPLICA_STATES
from tests.fixtures.processes import RoleProcess, RoleProcesses, free_port
from tests.roles.master.fake_miner import (
    PASSWORD,
    FakeMiner,
    discovery_command,
    eventually,
    master_command,
    signed_call,
    write_key,
)

FINAL = {state.value for state in FINAL_REPLICA_STATES}


@dataclass
class RealMaster:
    master: RoleProcess
    owner: LocalAccount
    node: FakeMiner
    quiet: FakeMiner
    data_dir: Path
    clients: list[RegistryClient]

    @property
    def url(self) -> str:
        return self.master.base_url

    async def call(self, method: str, path: str, body: Any = None, *, as_account: LocalAccount | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        return await signed_call(as_account or self.owner, method, self.url, path, data)

    async def task(self, task_id: str) -> dict[str, Any]:
        status, task = await self.call("GET", f"/tasks/{task_id}")
        assert status == 200, task
        return task

    async def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        status, task = await self.call("POST", "/tasks", spec)
        assert status == 201, task
        return task

    async def replica_states(self, task_id: str) -> list[str]:
        return [r["state"] for r in (await self.task(task_id))["replicas"]]

    async def wait_states(self, task_id: str, states: list[str]) -> None:
        async def reached() -> bool:
            return await self.replica_states(task_id) == states

        await eventually(reached, what=f"task {task_id} replicas {states}")

    async def stop_everything(self) -> None:
        """Stop every task and let the node drop it: the next test finds the node's GPUs free."""
        status, listing = await self.call("GET", "/tasks")
        assert status == 200, listing
        for task in listing["tasks"]:
            if all(r["state"] in FINAL for r in task["replicas"]):
                continue
            await self.call("DELETE", f"/tasks/{task['id']}")
            for key in [k for k in self.node.reports if k[0] == task["id"]]:
                del self.node.reports[key]

        async def all_final() -> bool:
            _, now = await self.call("GET", "/tasks")
            return all(r["state"] in FINAL for t in now["tasks"] for r in t["replicas"])

        await eventually(all_final, what="every task stopped")

    async def close(self) -> None:
        for miner in (self.node, self.quiet):
            await miner.close()
        for client in self.clients:
            await client.close()


async def start_real_master(anvil: Any, deployment: Any, processes: RoleProcesses, tmp: Path) -> RealMaster:
    disc_port = free_port()
    discovery_key = Account.create()
    discovery = processes.create("discovery", discovery_command(disc_port, anvil.rpc_url, deployment.path, tmp / "discovery"),
                                 port=disc_port, env={"PRIME_PRIVATE_KEY": discovery_key.key.hex()})
    discovery_uri = f"{discovery.base_url}#{discovery_key.address}"
    await discovery.start_async()
    owner, validator = anvil.accounts[2], anvil.accounts[1]
    master_account = Account.create()
    owner_client = await RegistryClient.connect(anvil.rpc_url, deployment, owner)
    validator_client = await RegistryClient.connect(anvil.rpc_url, deployment, validator)
    run_id = await owner_client.create_run(Requirements(min_gpus=1), discovery_uri, [master_account.address])
    port = free_port()
    data_dir = tmp / "master"
    # The last --dead-after wins: an Unhealthy node stays Unhealthy for the whole module.
    command = master_command(port, run_id, write_key(tmp, master_account), anvil.rpc_url, deployment.path, data_dir,
                             "--dead-after", "3600")
    master = processes.create("master", command, port=port, env={"PRIME_KEY_PASSWORD": PASSWORD})
    await master.start_async()

    miners = []
    for _ in range(2):
        node, provider = Account.create(), Account.create()
        anvil.set_balance(provider.address, 10 * 10**18)
        miner = await FakeMiner(node, provider, run_id, anvil.rpc_url, deployment).start()
        await miner.register_and_announce(validator_client, discovery_uri)
        miners.append(miner)
    world = RealMaster(master, owner, miners[0], miners[1], data_dir, [owner_client, validator_client])

    async def state_of(miner: FakeMiner) -> str | None:
        status, body = await world.call("GET", "/nodes")
        assert status == 200, body
        return next((n["state"] for n in body["nodes"] if n["address"] == miner.address), None)

    async def invited(miner: FakeMiner) -> bool:
        return miner.master_url is not None

    for miner in miners:
        await eventually(lambda m=miner: invited(m), what="the invite")
    world.node.start_heartbeats(0.2)
    await world.quiet.heartbeat()

    async def settled() -> bool:
        return (await state_of(world.node), await state_of(world.quiet)) == ("Healthy", "Unhealthy")

    await eventually(settled, timeout_s=60, what="one node Healthy, the other Unhealthy")
    await asyncio.sleep(0)
    return world
