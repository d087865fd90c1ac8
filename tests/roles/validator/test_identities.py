"""One GPU, one node; one prover, one identity (issue 12) — a real validator process, the real
anvil and discovery, miners served in the test's event loop (support.InProcessMiner).

- A second node reporting the GPU UUID of an approved node is rejected on chain with the
  ``gpu_uuid`` reason; the first stays approved, and the UUIDs and driver are in its report.
- One prover relaying for three identities announced at one address: the validator challenges
  them at the same moment, the relay computes one after the other, and all but one miss the
  time bound an honest node with the same prover alone meets.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from eth_account.signers.local import LocalAccount

from prime.chain.types import NodeStatus, Specs
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import Commitment, MatmulProver, NumpyBackend
from prime.protocol.challenge import DriverIdentity
from tests.fixtures.processes import RoleProcess, RoleProcesses, free_port
from tests.roles.validator.conftest import VALIDATOR_ENV, World
from tests.roles.validator.support import (
    CPU_SPECS,
    InProcessMiner,
    announce,
    by_node,
    new_node,
    register,
    reports,
    wait_validated,
)

pytestmark = pytest.mark.e2e

UUID = "GPU-5a1e2b3c-4d5e-6f70-8192-a3b4c5d6e7f8"
DRIVER = DriverIdentity(version="550.54.15", cuda="12.4")
ONE_H100 = Specs(gpu_count=1, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=81559, cpu_cores=8, ram_mib=65536,
                 disk_gib=100)
COMMIT_S = 1.0  # what one challenge costs the relayed prover
BOUND_S = 1.6  # met by one challenge (COMMIT_S and the round trip), missed by the second in a row


class RelayedProver(MatmulProver):
    """The one real prover behind every identity: honest, each commitment takes COMMIT_S, one at a time."""

    def __init__(self) -> None:
        super().__init__(NumpyBackend())
        self.lock = threading.Lock()
        self.done_at: list[float] = []

    def commit(self, params: ChallengeParams) -> Commitment:
        with self.lock:
            time.sleep(COMMIT_S)
            commitment = super().commit(params)
            self.done_at.append(time.monotonic())
            return commitment


async def start_validator(world: World, role_processes: RoleProcesses, data_dir: Path, from_block: int,
                          *extra: str) -> RoleProcess:
    port = free_port()
    command = world.validator_command(port, data_dir, "--from-block", str(from_block), *extra)
    return await role_processes.start_async("validator", command, port=port, env=VALIDATOR_ENV, timeout_s=60)


async def miner_for(world: World, started: list[InProcessMiner], prover: MatmulProver, specs: Specs,
                    node: LocalAccount | None = None, **service) -> InProcessMiner:
    miner = await InProcessMiner(node or new_node(), prover, world.permissions, **service).start()
    started.append(miner)
    await register(world.provider, world.run_id, miner.node, specs)
    await announce(miner.node, world.discovery.base_url, miner.port, world.run_id)
    return miner


async def test_a_second_node_reporting_an_approved_nodes_gpu_uuid_is_rejected(
        world: World, role_processes: RoleProcesses, tmp_path: Path) -> None:
    data_dir = tmp_path / "validator"
    await start_validator(world, role_processes, data_dir, await world.reader.block_number() + 1,
                          "--challenge-timeout", "30")
    started: list[InProcessMiner] = []
    try:
        first = await miner_for(world, started, MatmulProver(NumpyBackend()), ONE_H100, gpu_uuids=[UUID], driver=DRIVER)
        assert (await wait_validated(world.reader, first.address)).status == NodeStatus.APPROVED
        # Another identity whose commitments name the same GPU (one card behind two nodes).
        second = await miner_for(world, started, MatmulProver(NumpyBackend()), ONE_H100, gpu_uuids=[UUID], driver=DRIVER)
        info = await wait_validated(world.reader, second.address)
        rows = by_node(await reports(data_dir))

        assert info.status == NodeStatus.REJECTED
        (row,) = rows[second.address]
        assert row["failed_check"] == "gpu_uuid", row
        assert row["reason"].startswith(f"gpu_uuid check failed: GPU {UUID} is already the GPU of node {first.address}")
        assert row["report"]["gpu_uuids"] == [UUID] and row["report"]["checks"]["entries"] is None  # it did compute
        assert info.report_hash.hex() == row["report_hash"].removeprefix("0x")
        assert second.challenges == 1
        # The first keeps its approval; its report records the GPU and the driver it named.
        assert await world.reader.node_status(first.address) == NodeStatus.APPROVED
        (kept,) = rows[first.address]
        assert kept["result"] == "approved" and kept["report"]["gpu_uuids"] == [UUID]
        assert kept["report"]["driver"] == {"version": "550.54.15", "cuda": "12.4"}
        assert kept["report"]["checks"]["gpu_uuid"] is None
    finally:
        for miner in started:
            await miner.stop()


async def test_one_prover_relaying_for_three_identities_at_one_address_fails_when_challenged_together(
        world: World, role_processes: RoleProcesses, tmp_path: Path) -> None:
    started: list[InProcessMiner] = []
    bound = ("--challenge-timeout", str(BOUND_S))
    try:
        # The control: the same prover serving one identity alone meets the bound.
        alone_from = await world.reader.block_number() + 1
        alone = await miner_for(world, started, RelayedProver(), CPU_SPECS)
        control = await start_validator(world, role_processes, tmp_path / "control", alone_from, *bound)
        assert (await wait_validated(world.reader, alone.address)).status == NodeStatus.APPROVED
        await asyncio.to_thread(control.stop)

        # Three identities (three node keys, each signing its own answers) behind one address and
        # one prover, all registered and announced before the validator reads them.
        relay = RelayedProver()
        relay_from = await world.reader.block_number() + 1
        identities = [await miner_for(world, started, relay, CPU_SPECS) for _ in range(3)]
        data_dir = tmp_path / "validator"
        validator = await start_validator(world, role_processes, data_dir, relay_from, *bound)

        infos = [await wait_validated(world.reader, m.address) for m in identities]
        rows = by_node(await reports(data_dir))
        (alone_row,) = by_node(await reports(tmp_path / "control"))[alone.address]
        assert alone_row["result"] == "approved" and alone_row["report"]["elapsed_s"] <= BOUND_S

        # Challenged at the same moment (the relay saw all three within a fraction of one commitment).
        moments = [m.challenged_at[0] for m in identities]
        assert all(m.challenges == 1 for m in identities)
        assert max(moments) - min(moments) < COMMIT_S / 2, moments
        assert len(relay.done_at) == 3
        assert "challenging 3 nodes at the same moment" in validator.logs()  # grouped by their address
        statuses = [info.status for info in infos]
        assert statuses.count(NodeStatus.APPROVED) <= 1, statuses
        late = [rows[m.address][0] for m, s in zip(identities, statuses, strict=True) if s == NodeStatus.REJECTED]
        assert len(late) >= 2
        for row in late:
            assert row["failed_check"] == "time", row
            assert row["reason"].startswith("time check failed: ")
            assert row["report"]["elapsed_s"] > row["report"]["bound_s"] == BOUND_S
    finally:
        for miner in started:
            await miner.stop()
