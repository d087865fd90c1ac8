"""reportRevalidationFailure and the revalidation penalty on a real anvil: validator-only, which
statuses, the penalty's arithmetic and who it is paid to, the events, the run's slot, the stake
left withdrawable, and the admin setter's bounds (contract and `prime chain` CLI)."""

from __future__ import annotations

import pytest

from prime.chain.client import RevertError
from prime.chain.deploy import deploy_registry
from prime.chain.types import NodeStatus, Requirements
from tests.chain.test_cli import prime
from tests.chain.test_nodes import invite, joined_node, new_node
from tests.fixtures.chain import DEFAULT_SPECS, MIN_STAKE_WEI

EVIDENCE = b"\x5e" * 32
DEFAULT_BPS = 1000


@pytest.fixture
async def penalty(parties):
    """``await penalty(bps)`` sets the registry's revalidation penalty; the default is put back after the test."""

    async def set_bps(bps: int) -> None:
        await parties.admin.set_revalidation_penalty_bps(bps)

    yield set_bps
    await parties.admin.set_revalidation_penalty_bps(DEFAULT_BPS)


async def validator_gain(parties, anvil, before: int, result) -> int:
    """What the validator's balance grew by in ``result``'s transaction, its gas added back."""
    receipt = anvil.rpc("eth_getTransactionReceipt", [result.tx_hash])
    gas_cost = int(receipt["gasUsed"], 16) * int(receipt["effectiveGasPrice"], 16)
    return await parties.reader.balance(parties.validator_account) - before + gas_cost


async def test_default_penalty_is_ten_percent(parties):
    assert await parties.reader.revalidation_penalty_bps() == DEFAULT_BPS


async def test_failed_revalidation_ejects_an_active_node_and_slashes_it(parties, fresh_account, anvil, deployment):
    run_id, provider, node, provider_client = await joined_node(parties, fresh_account)
    assert (await parties.reader.get_run(run_id)).node_count == 1
    registry_before = await parties.reader.balance(deployment.registry)
    validator_before = await parties.reader.balance(parties.validator_account)

    result = await parties.validator.report_revalidation_failure(node, EVIDENCE)

    penalty = MIN_STAKE_WEI * DEFAULT_BPS // 10_000
    validator = parties.validator_account.address
    assert [e.name for e in result.events] == ["NodeEjected", "NodeSlashed", "RevalidationFailed"]
    assert result.event("NodeEjected").args == {"runId": run_id, "node": node.address, "master": validator}
    assert result.event("NodeSlashed").args == {"node": node.address, "amount": penalty, "remainingStake": MIN_STAKE_WEI - penalty}
    assert result.event("RevalidationFailed").args == {
        "runId": run_id, "node": node.address, "validator": validator, "reportHash": EVIDENCE, "penalty": penalty,
    }
    info = await parties.reader.get_node(node)
    assert (info.status, info.stake, info.report_hash) == (NodeStatus.EJECTED, MIN_STAKE_WEI - penalty, EVIDENCE)
    assert (await parties.reader.get_run(run_id)).node_count == 0
    # The penalty goes to the reporting validator, as `slash` pays the calling admin.
    assert await parties.reader.balance(deployment.registry) == registry_before - penalty
    assert await validator_gain(parties, anvil, validator_before, result) == penalty

    # The rest of the stake is the provider's to take back; the node cannot be reported twice.
    provider_before = await parties.reader.balance(provider)
    await parties.as_(node).withdraw_stake(node)  # the node pays the gas: the provider's gain is exact
    assert await parties.reader.balance(provider) == provider_before + MIN_STAKE_WEI - penalty
    with pytest.raises(RevertError) as twice:
        await parties.validator.report_revalidation_failure(node, EVIDENCE)
    assert twice.value.error_name == "NotRevalidatable"
    assert twice.value.message == (
        f"Node {node.address} cannot be reported for a failed re-validation in status ejected; only approved or active nodes can."
    )


async def test_the_freed_slot_of_a_full_run_takes_the_next_node(parties, fresh_account):
    run_id = await parties.new_run(Requirements(max_nodes=1))
    _, _, first, _ = await joined_node(parties, fresh_account, run_id=run_id)
    _, _, second, second_client = await new_node(parties, fresh_account, run_id=run_id)
    expiry, sig = await invite(parties, run_id, second)
    with pytest.raises(RevertError) as full:
        await second_client.join_run(run_id, second, expiry, sig)
    assert full.value.error_name == "RunFull"
    await parties.validator.report_revalidation_failure(first, EVIDENCE)
    await second_client.join_run(run_id, second, expiry, sig)
    assert (await parties.reader.get_run(run_id)).node_count == 1
    assert await parties.reader.node_status(second) == NodeStatus.ACTIVE


async def test_an_approved_node_not_joined_yet_can_be_reported(parties, fresh_account):
    run_id, _, node, _ = await new_node(parties, fresh_account)
    result = await parties.validator.report_revalidation_failure(node, EVIDENCE)
    assert result.event("NodeEjected").args["runId"] == run_id
    assert await parties.reader.node_status(node) == NodeStatus.EJECTED
    assert (await parties.reader.get_run(run_id)).node_count == 0  # it held no slot: nothing to give back


@pytest.mark.parametrize(("bps", "stake"), [(0, MIN_STAKE_WEI), (1, MIN_STAKE_WEI + 7), (2500, MIN_STAKE_WEI + 3),
                                            (3333, 3 * MIN_STAKE_WEI + 1), (10_000, MIN_STAKE_WEI + 11)])
async def test_penalty_is_the_stated_share_rounded_down(parties, fresh_account, penalty, anvil, bps, stake):
    await penalty(bps)
    run_id = await parties.new_run()
    provider, node = fresh_account(), fresh_account(10)
    provider_client = parties.as_(provider)
    await provider_client.register_node(run_id, node, DEFAULT_SPECS, stake_wei=stake)
    await parties.validator.report_validation(node, True, b"\x42" * 32)
    validator_before = await parties.reader.balance(parties.validator_account)

    result = await parties.validator.report_revalidation_failure(node, EVIDENCE)

    expected = stake * bps // 10_000
    assert result.event("RevalidationFailed").args["penalty"] == expected
    assert (await parties.reader.get_node(node)).stake == stake - expected
    assert await validator_gain(parties, anvil, validator_before, result) == expected
    names = [e.name for e in result.events]
    assert ("NodeSlashed" in names) == (expected > 0)  # no slash event for a zero penalty
    provider_before = await parties.reader.balance(provider)
    if stake - expected:
        await parties.as_(node).withdraw_stake(node)
        assert await parties.reader.balance(provider) == provider_before + stake - expected
    else:  # all of it was slashed: nothing left, and the node may register again
        with pytest.raises(RevertError) as nothing:
            await parties.as_(node).withdraw_stake(node)
        assert nothing.value.error_name == "NothingToWithdraw"


async def test_only_validators_report(parties, fresh_account):
    run_id, provider, node, provider_client = await joined_node(parties, fresh_account)
    for who, client in ((parties.admin_account, parties.admin), (parties.master_account, parties.master),
                        (provider, provider_client)):
        with pytest.raises(RevertError) as exc:
            await client.report_revalidation_failure(node, EVIDENCE)
        assert exc.value.message == f"Account {who.address} does not have the validator role needed for this."
    info = await parties.reader.get_node(node)
    assert (info.status, info.stake) == (NodeStatus.ACTIVE, MIN_STAKE_WEI)


async def test_only_approved_or_active_nodes_and_never_without_evidence(parties, fresh_account):
    _, _, registered, _ = await new_node(parties, fresh_account, approve=None)
    _, _, rejected, _ = await new_node(parties, fresh_account, approve=False)
    _, _, left, left_client = await joined_node(parties, fresh_account)
    await left_client.leave_run(left)
    for node, label in ((registered, "registered"), (rejected, "rejected"), (left, "left"), (fresh_account(0), "none")):
        with pytest.raises(RevertError) as exc:
            await parties.validator.report_revalidation_failure(node, EVIDENCE)
        assert exc.value.error_name == "NotRevalidatable" and f"in status {label};" in exc.value.message
    _, _, active, _ = await joined_node(parties, fresh_account)
    with pytest.raises(RevertError) as none:
        await parties.validator.report_revalidation_failure(active, b"\x00" * 32)
    assert none.value.message == (
        f"A re-validation failure of node {active.address} needs the failed report's hash as evidence, not zero."
    )
    assert await parties.reader.node_status(active) == NodeStatus.ACTIVE


async def test_penalty_setter_is_admin_only_and_bounded(parties, penalty):
    result = await parties.admin.set_revalidation_penalty_bps(10_000)
    assert result.event("RevalidationPenaltyChanged").args == {"penaltyBps": 10_000}
    await parties.admin.set_revalidation_penalty_bps(0)
    assert await parties.reader.revalidation_penalty_bps() == 0
    with pytest.raises(RevertError) as high:
        await parties.admin.set_revalidation_penalty_bps(10_001)
    assert high.value.message == "A penalty of 10001 basis points is more than the whole stake; give 0 to 10000."
    with pytest.raises(RevertError) as stranger:
        await parties.validator.set_revalidation_penalty_bps(500)
    assert stranger.value.message == f"Account {parties.validator_account.address} does not have the admin role needed for this."
    assert await parties.reader.revalidation_penalty_bps() == 0


async def test_cli_sets_and_shows_the_penalty(anvil, tmp_path):
    admin, other = anvil.accounts[5], anvil.accounts[6]
    path = (await deploy_registry(anvil.rpc_url, admin, min_stake_wei=MIN_STAKE_WEI)).save(tmp_path / "d.json").path
    env = {"PRIME_RPC_URL": anvil.rpc_url}
    info = prime("chain", "info", "--deployment", str(path), env=env)
    assert info.returncode == 0, info.stderr
    assert "revalidation penalty: 1000 bps (10 % of the stake)" in info.stdout
    done = prime("chain", "set-revalidation-penalty", "2500", "--deployment", str(path),
                 env={**env, "PRIME_PRIVATE_KEY": admin.key.hex()})
    assert done.returncode == 0, done.stderr
    assert "revalidation penalty: 2500 bps (25 % of the stake)" in prime("chain", "info", "--deployment", str(path), env=env).stdout
    refused = prime("chain", "set-revalidation-penalty", "100", "--deployment", str(path),
                    env={**env, "PRIME_PRIVATE_KEY": other.key.hex()})
    assert refused.returncode == 1 and "does not have the admin role" in refused.stderr and "Traceback" not in refused.stderr
    too_high = prime("chain", "set-revalidation-penalty", "10001", "--deployment", str(path),
                     env={**env, "PRIME_PRIVATE_KEY": admin.key.hex()})
    assert too_high.returncode == 2 and "Traceback" not in too_high.stderr  # refused by the CLI before any transaction
