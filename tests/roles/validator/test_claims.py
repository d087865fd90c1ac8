"""The validator as a real process holds a node's claim to the GPU table before any challenge (issue 12).

A CPU prover claiming 8×H100 with tiny memory (the spoof that was approved 20 times of 20),
an H100 claiming another model's memory, an unknown model, 8×H100 with too little RAM for
its challenge (a small RAM claim used to shrink it) and 8×H100 with 2 CPU cores are
rejected on chain with the claim's reason and never challenged; an honest CPU node is
still approved.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prime.chain.types import NodeStatus, Specs
from prime.challenge.generator import worker_count
from prime.challenge.prover import MatmulProver, NumpyBackend
from tests.fixtures.processes import RoleProcess, RoleProcesses, free_port
from tests.roles.validator.conftest import VALIDATOR_ENV, World
from tests.roles.validator.support import announce, by_node, register, reports, wait_validated

pytestmark = pytest.mark.e2e

HOST = {"cpu_cores": 64, "ram_mib": 512_000, "disk_gib": 2000}
TINY_H100 = Specs(gpu_count=8, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=1100, **HOST)
WRONG_MEMORY = Specs(gpu_count=1, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=24564, **HOST)  # a 4090's
UNKNOWN = Specs(gpu_count=1, gpu_model="Imaginary X9000", gpu_memory_mib=81559, **HOST)
# the table's memory, but RAM (or cores) too small for its challenge: a small RAM claim once shrank it
SMALL_RAM = Specs(gpu_count=8, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=81559, cpu_cores=64, ram_mib=8192,
                  disk_gib=2000)
FEW_CORES = Specs(gpu_count=8, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=81559, cpu_cores=2, ram_mib=512_000,
                  disk_gib=2000)
HONEST_CPU = Specs(gpu_count=0, gpu_model="", gpu_memory_mib=0, cpu_cores=worker_count(), ram_mib=4096, disk_gib=10)


async def start_validator(world: World, role_processes: RoleProcesses, data_dir: Path, *,
                          planned: bool = False) -> RoleProcess:
    """A validator from the current head; ``planned``: without the suite's --challenge-n 64, so
    challenges are sized from the claimed class as in production."""
    port = free_port()
    head = await world.reader.block_number()
    command = world.validator_command(port, data_dir, "--from-block", str(head + 1))
    if planned:
        at = command.index("--challenge-n")
        del command[at:at + 2]
    return await role_processes.start_async("validator", command, port=port, env=VALIDATOR_ENV, timeout_s=60)


async def test_claims_the_table_refuses_are_rejected_on_chain_without_a_challenge(
        world: World, role_processes: RoleProcesses, start_miner, tmp_path: Path) -> None:
    await start_validator(world, role_processes, tmp_path / "validator")
    claims = {"tiny": TINY_H100, "wrong": WRONG_MEMORY, "unknown": UNKNOWN, "small_ram": SMALL_RAM,
              "few_cores": FEW_CORES, "honest": HONEST_CPU}
    miners = {}
    for name, specs in claims.items():
        # every prover is honest CPU numpy: what decides is the claim
        miner = await start_miner(MatmulProver(NumpyBackend()))
        await register(world.provider, world.run_id, miner.node, specs)
        await announce(miner.node, world.discovery.base_url, miner.port, world.run_id)
        miners[name] = miner

    on_chain = {name: await wait_validated(world.reader, m.address) for name, m in miners.items()}
    rows = by_node(await reports(tmp_path / "validator"))

    assert on_chain["honest"].status == NodeStatus.APPROVED
    assert miners["honest"].challenges == 1
    expected = {"tiny": ("1100 MiB", "81559 MiB"), "wrong": ("24564 MiB", "H100"), "unknown": ("Imaginary X9000", "table"),
                "small_ram": ("8192 MiB of RAM", "needs at least"), "few_cores": ("2 CPU cores", "4 a GPU")}
    for name, words in expected.items():
        (row,) = rows[miners[name].address]
        assert on_chain[name].status == NodeStatus.REJECTED, row
        assert row["failed_check"] == "claim" and row["reason"].startswith("claim check failed: "), row
        assert all(word in row["reason"] for word in words), row["reason"]
        assert row["report"]["specs"]["gpu_count"] == claims[name].gpu_count
        assert on_chain[name].report_hash.hex() == row["report_hash"].removeprefix("0x")
        assert miners[name].challenges == 0  # refused before any challenge


async def test_an_honest_cpu_node_passes_the_challenge_planned_for_its_claimed_cores(
        world: World, role_processes: RoleProcesses, start_miner, tmp_path: Path) -> None:
    await start_validator(world, role_processes, tmp_path / "validator", planned=True)
    miner = await start_miner(MatmulProver(NumpyBackend()))
    await register(world.provider, world.run_id, miner.node, HONEST_CPU)
    await announce(miner.node, world.discovery.base_url, miner.port, world.run_id)

    info = await wait_validated(world.reader, miner.address)
    (row,) = by_node(await reports(tmp_path / "validator"))[miner.address]
    assert info.status == NodeStatus.APPROVED, row["reason"]
    report = row["report"]
    # sized from the claimed cores (3 s of work at 3e10 FLOP/s per core), not forced small
    assert report["dtype"] == "float32" and report["n"] * report["n"] * report["n"] * report["repeat"] * 2 >= (
        3.0 * HONEST_CPU.cpu_cores * 3e10)
    assert report["elapsed_s"] <= report["bound_s"]
