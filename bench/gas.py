#!/usr/bin/env python3
"""Gas used by every registry function, measured on a throwaway anvil.

    python bench/gas.py

Starts its own anvil on a free loopback port, deploys the registry, walks nodes through their
whole lifecycle and prints one row per transaction; then ``endRun`` of runs with 1, 100 and 1,000
active nodes (the release is lazy: the same gas whatever the run's size) and the path of a dead
node that a master ejects and that comes back (withdraw, register again). Needs
`cd contracts && npm ci` (for anvil). ``--quick`` skips the 1,000-node run.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from eth_account import Account  # noqa: E402

from prime.chain.anvil import start_anvil  # noqa: E402
from prime.chain.client import RegistryClient, TxResult  # noqa: E402
from prime.chain.deploy import deploy_registry  # noqa: E402
from prime.chain.types import Requirements, Specs  # noqa: E402

SPECS = Specs(gpu_count=8, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=81_559, cpu_cores=96, ram_mib=1_048_576, disk_gib=8_000)
REQ = Requirements(min_gpus=8, gpu_model="H100", min_gpu_memory_mib=80_000, min_cpu_cores=64, min_ram_mib=524_288, min_disk_gib=4_000, max_nodes=100)


async def measure() -> list[tuple[str, int]]:
    rows: list[tuple[str, int]] = []

    def record(label: str, result: TxResult) -> None:
        rows.append((label, result.gas_used))

    chain = start_anvil(None)
    try:
        admin, validator, buyer, master, provider = chain.accounts[:5]
        deployment = await deploy_registry(chain.rpc_url, admin, min_stake_wei=10**16)
        receipt = chain.rpc("eth_getTransactionReceipt", [chain.rpc("eth_getBlockByNumber", [hex(deployment.block), False])["transactions"][0]])
        rows.append(("deploy", int(receipt["gasUsed"], 16)))

        async with await RegistryClient.connect(chain.rpc_url, deployment, admin) as admin_c:
            validator_c, buyer_c, master_c, provider_c = (admin_c.with_account(a) for a in (validator, buyer, master, provider))
            record("grantRole (validator)", await admin_c.grant_validator(validator))
            record("setMinStake", await admin_c.set_min_stake(10**16))
            record("setRevalidationPenaltyBps", await admin_c.set_revalidation_penalty_bps(1000))

            run = await buyer_c.create_run_tx(REQ, "http://127.0.0.1:8090", [master])
            record("createRun (1 master)", run)
            run_id = run.event("RunCreated").args["runId"]
            extra = [Account.create().address for _ in range(3)]
            record("createRun (3 masters)", await buyer_c.create_run_tx(REQ, "http://127.0.0.1:8090", extra))
            record("addMaster", await buyer_c.add_master(run_id, extra[0]))
            record("removeMaster", await buyer_c.remove_master(run_id, extra[0]))

            nodes = [Account.create() for _ in range(5)]
            for i, node in enumerate(nodes):
                result = await provider_c.register_node(run_id, node, SPECS)
                if i == 0:
                    record("registerNode", result)
            record("reportValidation (approve)", await validator_c.report_validation(nodes[0], True, b"\x01" * 32))
            await validator_c.report_validation(nodes[1], True, b"\x01" * 32)
            await validator_c.report_validation(nodes[2], True, b"\x01" * 32)
            record("reportValidation (reject)", await validator_c.report_validation(nodes[3], False, b"\x02" * 32))
            await validator_c.report_validation(nodes[4], True, b"\x01" * 32)

            expiry = await admin_c.block_timestamp() + 3600
            joins = ("joinRun (first node)", "joinRun (next node)", None, None)
            for label, node in zip(joins, [*nodes[:3], nodes[4]], strict=True):
                result = await provider_c.join_run(run_id, node, expiry, master_c.sign_invite(master, run_id, node, expiry))
                if label:
                    record(label, result)

            record("leaveRun (active)", await provider_c.leave_run(nodes[0]))
            record("ejectNode", await master_c.eject_node(run_id, nodes[1]))
            record("slash", await admin_c.slash(nodes[2], 10**15))
            record("reportRevalidationFailure (active, 10 %)", await validator_c.report_revalidation_failure(nodes[4], b"\x03" * 32))
            record("withdrawStake (left)", await provider_c.withdraw_stake(nodes[0]))
            record("withdrawStake (rejected)", await provider_c.withdraw_stake(nodes[3]))
            record("endRun", await buyer_c.end_run(run_id))

            # The dead node's path: a master ejects it, its provider takes the stake back, it registers again.
            open_run = await buyer_c.create_run(Requirements(max_nodes=1), "http://127.0.0.1:8090", [master])
            dead = (await _active_nodes(chain, admin_c, validator_c, master_c, master, open_run, 1))[0]
            record("ejectNode (dead, after --eject-after)", await master_c.eject_node(open_run, dead))
            dead_c = admin_c.with_account(dead)
            record("withdrawStake (ejected)", await dead_c.withdraw_stake(dead))
            record("registerNode (again, after ejection)", await dead_c.register_node(open_run, dead, SPECS))

            for size in (1, 100) if QUICK else (1, 100, 1000):
                sized = await buyer_c.create_run(Requirements(), "http://127.0.0.1:8090", [master])
                active = await _active_nodes(chain, admin_c, validator_c, master_c, master, sized, size)
                record(f"endRun ({size:,} active node{'s' if size > 1 else ''})", await buyer_c.end_run(sized))
                if size == 1:
                    record("withdrawStake (released by endRun)", await admin_c.with_account(active[0]).withdraw_stake(active[0]))
    finally:
        chain.stop()
    return rows


QUICK = "--quick" in sys.argv


async def _active_nodes(chain, admin_c, validator_c, master_c, master, run_id: int, count: int) -> list:  # type: ignore[no-untyped-def]
    """``count`` nodes registered (each its own provider), approved and joined to ``run_id``."""
    nodes = [Account.create() for _ in range(count)]
    for node in nodes:
        chain.set_balance(node.address, 10**18)
    expiry = await admin_c.block_timestamp() + 3600
    for start in range(0, count, 50):
        batch = nodes[start:start + 50]
        await asyncio.gather(*(admin_c.with_account(n).register_node(run_id, n, SPECS) for n in batch))
        for node in batch:
            await validator_c.report_validation(node, True, b"\x01" * 32)
        await asyncio.gather(*(admin_c.with_account(n).join_run(run_id, n, expiry, master_c.sign_invite(master, run_id, n, expiry))
                               for n in batch))
    return nodes


def main() -> None:
    rows = asyncio.run(measure())
    width = max(len(label) for label, _ in rows)
    print(f"{'function'.ljust(width)}  {'gas used':>10}")
    print(f"{'-' * width}  {'-' * 10}")
    for label, gas in rows:
        print(f"{label.ljust(width)}  {gas:>10,}")


if __name__ == "__main__":
    main()
