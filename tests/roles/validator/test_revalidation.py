"""Re-validation by a real validator process against the real anvil: an approved node that joined
its run (Active) is challenged again at random times (``--revalidate-every 1``). An honest node
passes and stays Active; a node that turns lazy after its approval fails, and the chain shows
NodeEjected, the slash (its stake, the validator's balance) and the failed report's hash."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from prime.chain.types import NodeStatus
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import MatmulProver
from tests.challenge.cheaters import CorruptingProver
from tests.fixtures.processes import RoleProcesses
from tests.roles.validator.conftest import World
from tests.roles.validator.support import InProcessMiner, run_cli, wait_for, wait_validated
from tests.roles.validator.test_service import metric, metrics, onboard, start_validator

pytestmark = pytest.mark.e2e


class TurnCoat(CorruptingProver):
    """Honest until ``cheat`` is set; then 10 % of C's entries are wrong (caught by the entry check)."""

    def __init__(self) -> None:
        super().__init__(fraction=0.10)
        self.cheat = False

    def compute(self, params: ChallengeParams) -> np.ndarray:
        return super().compute(params) if self.cheat else MatmulProver.compute(self, params)


async def join(world: World, anvil, miner: InProcessMiner) -> None:
    """Join the approved node to the world's run with an invite of its master, as a master's invite would."""
    master = anvil.accounts[3]
    expiry = await world.reader.block_timestamp() + 600
    signature = world.provider.sign_invite(master, world.run_id, miner.node, expiry)
    await world.provider.join_run(world.run_id, miner.node, expiry, signature)
    assert await world.reader.node_status(miner.address) == NodeStatus.ACTIVE


async def revalidations(data_dir: Path) -> list[dict]:
    import json

    code, out, err = await run_cli("validator", "revalidations", "--json", "--data-dir", str(data_dir))
    assert code == 0, err
    return json.loads(out)


async def test_an_active_node_that_turns_lazy_is_ejected_and_slashed(
        world: World, role_processes: RoleProcesses, start_miner, anvil, tmp_path: Path) -> None:
    data_dir = tmp_path / "validator"
    validator = await start_validator(world, role_processes, data_dir, "--revalidate-every", "1",
                                      "--challenge-timeout", "30")
    prover = TurnCoat()
    miner = await start_miner(prover)
    await onboard(world, miner)
    approved = await wait_validated(world.reader, miner.address)
    assert approved.status == NodeStatus.APPROVED
    stake = approved.stake
    penalty = stake * await world.reader.revalidation_penalty_bps() // 10_000
    assert penalty > 0
    prover.cheat = True  # from now on every answer has wrong entries
    nodes_before = (await world.reader.get_run(world.run_id)).node_count
    await join(world, anvil, miner)
    joined_block = await world.reader.block_number()
    validator_before = await world.reader.balance(world.validator)

    async def ejected():
        info = await world.reader.get_node(miner.address)
        return info if info.status == NodeStatus.EJECTED else None

    info = await wait_for(ejected, timeout_s=90, what="the lazy node to be ejected on chain")
    assert info.stake == stake - penalty
    assert (await world.reader.get_run(world.run_id)).node_count == nodes_before  # its slot is free again

    # The chain's record: NodeEjected by the validator, the slash, and the failed report's hash.
    events = await world.reader.get_logs(joined_block, await world.reader.block_number(),
                                         ["NodeEjected", "NodeSlashed", "RevalidationFailed"])
    mine = [e for e in events if e.args["node"] == miner.address]
    assert [e.name for e in mine] == ["NodeEjected", "NodeSlashed", "RevalidationFailed"]
    ejected_event, slashed, failed = mine
    assert ejected_event.args == {"runId": world.run_id, "node": miner.address, "master": world.validator.address}
    assert slashed.args == {"node": miner.address, "amount": penalty, "remainingStake": stake - penalty}
    assert failed.args["validator"] == world.validator.address and failed.args["penalty"] == penalty
    receipt = anvil.rpc("eth_getTransactionReceipt", [failed.tx_hash])
    gas = int(receipt["gasUsed"], 16) * int(receipt["effectiveGasPrice"], 16)
    # The validator sent nothing else since the join, so its balance moved by the penalty less this gas.
    assert await world.reader.balance(world.validator) == validator_before + penalty - gas

    # The validator's store: the failed re-challenge, its report (whose hash is the evidence) and the tx.
    rows = [r for r in await revalidations(data_dir) if r["node"] == miner.address]
    (row,) = [r for r in rows if r["result"] == "failed"]
    assert row["state"] == "reported" and row["tx_hash"] == failed.tx_hash
    assert row["failed_check"] == "entries" and row["reason"].startswith("entries check failed: ")
    assert failed.args["reportHash"].hex() == row["report_hash"].removeprefix("0x") == info.report_hash.hex()
    assert all(r["result"] in ("failed", "skipped", "passed") for r in rows)
    # The first validation and at least one re-challenge reached the miner; it was told the failure.
    assert miner.challenges >= 2
    await wait_for(lambda: any(v["approved"] is False for v in miner.verdicts), timeout_s=30,
                   what="the failed verdict note at the miner")
    note = next(v for v in miner.verdicts if v["approved"] is False)
    assert note["reason"] == row["reason"] and note["report_hash"] == row["report_hash"]
    text = await metrics(validator)
    assert metric(text, 'prime_validator_revalidations_total{result="failed"}') == 1
    assert metric(text, "prime_validator_revalidation_reports_total") == 1

    # No second report, no second challenge of an ejected node; the rest of the stake is withdrawable.
    challenged = miner.challenges
    provider_before = await world.reader.balance(world.provider.account.address)
    anvil.set_balance(miner.address, 10**18)  # the node pays the gas of its withdrawal: the provider's gain is exact
    await world.reader.with_account(miner.node).withdraw_stake(miner.address)
    assert await world.reader.balance(world.provider.account.address) == provider_before + stake - penalty
    await asyncio.sleep(3)  # three mean re-validation intervals: an ejected node is not challenged again
    assert miner.challenges == challenged and validator.running


async def test_an_honest_active_node_is_re_challenged_and_stays_active(
        world: World, role_processes: RoleProcesses, start_miner, anvil, tmp_path: Path) -> None:
    from tests.roles.validator.test_service import honest

    data_dir = tmp_path / "validator"
    validator = await start_validator(world, role_processes, data_dir, "--revalidate-every", "1",
                                      "--challenge-timeout", "30")
    miner = await start_miner(honest())
    await onboard(world, miner)
    assert (await wait_validated(world.reader, miner.address)).status == NodeStatus.APPROVED
    await join(world, anvil, miner)
    stake = (await world.reader.get_node(miner.address)).stake

    async def passed_twice() -> bool:
        rows = [r for r in await revalidations(data_dir) if r["node"] == miner.address]
        return sum(r["result"] == "passed" for r in rows) >= 2

    await wait_for(passed_twice, timeout_s=90, what="two passed re-validations")
    info = await world.reader.get_node(miner.address)
    assert (info.status, info.stake) == (NodeStatus.ACTIVE, stake)
    assert miner.challenges >= 3  # the first validation and the re-challenges
    rows = [r for r in await revalidations(data_dir) if r["node"] == miner.address and r["result"] == "passed"]
    assert all(r["tx_hash"] is None and r["reason"] == "all checks passed" and r["report"]["n"] == 64 for r in rows)
    assert all(v["approved"] for v in miner.verdicts)  # no failure note ever; passes send nothing
    text = await metrics(validator)
    assert metric(text, 'prime_validator_revalidations_total{result="passed"}') >= 2
    assert metric(text, 'prime_validator_revalidations_total{result="failed"}') == 0
    await world.provider.leave_run(miner.node)  # out of the run: not challenged any more
