"""Node lifecycle on a real anvil: register, validate, join, leave, eject, withdraw, slash; every revert."""

from __future__ import annotations

from dataclasses import replace

import pytest

from prime.chain.client import RevertError, sign_digest
from prime.chain.types import NodeStatus, Requirements, Specs
from prime.errors import PrimeError
from tests.fixtures.chain import DEFAULT_SPECS, MIN_STAKE_WEI, invite_expiry

REPORT = b"\x42" * 32
REVERTING_CODE = "0x60006000fd"  # PUSH1 0 PUSH1 0 REVERT: refuses every call, ETH included


async def new_node(parties, fresh_account, *, run_id=None, req=None, specs=DEFAULT_SPECS, approve=True):
    """A fresh provider + node registered for a (new) run, then approved/rejected (approve None: left registered)."""
    run_id = run_id if run_id is not None else await parties.new_run(req)
    provider, node = fresh_account(), fresh_account(10)
    provider_client = parties.as_(provider)
    await provider_client.register_node(run_id, node, specs)
    if approve is not None:
        await parties.validator.report_validation(node, approve, REPORT)
    return run_id, provider, node, provider_client


async def invite(parties, run_id, node, *, seconds=600, signer=None):
    expiry = await invite_expiry(parties.reader, seconds)
    return expiry, parties.reader.sign_invite(signer or parties.master_account, run_id, node, expiry)


async def joined_node(parties, fresh_account, **kwargs):
    run_id, provider, node, provider_client = await new_node(parties, fresh_account, **kwargs)
    expiry, sig = await invite(parties, run_id, node)
    await provider_client.join_run(run_id, node, expiry, sig)
    return run_id, provider, node, provider_client


# ------------------------------------------------------------------ registration


async def test_register_node_records_stake_and_specs(parties, fresh_account, deployment):
    run_id = await parties.new_run()
    provider, node = fresh_account(), fresh_account(0)
    registry_before = await parties.reader.balance(deployment.registry)

    result = await parties.as_(provider).register_node(run_id, node, DEFAULT_SPECS, stake_wei=3 * MIN_STAKE_WEI)

    assert result.event("NodeRegistered").args == {"runId": run_id, "node": node.address, "provider": provider.address, "stake": 3 * MIN_STAKE_WEI}
    info = await parties.reader.get_node(node)
    assert (info.provider, info.run_id, info.specs, info.stake, info.status, info.report_hash) == (
        provider.address, run_id, DEFAULT_SPECS, 3 * MIN_STAKE_WEI, NodeStatus.REGISTERED, b"\x00" * 32,
    )
    assert await parties.reader.node_status(node) == NodeStatus.REGISTERED
    assert await parties.reader.balance(deployment.registry) == registry_before + 3 * MIN_STAKE_WEI


async def test_register_with_separately_made_node_signature(parties, fresh_account):
    # How a provider registers a node whose key lives on another machine: the node signs, the provider sends.
    run_id = await parties.new_run()
    provider, node = fresh_account(), fresh_account(0)
    digest = parties.reader.registration_digest(provider, node.address, run_id)
    await parties.as_(provider).register_node(run_id, node.address, DEFAULT_SPECS, node_sig=sign_digest(node, digest))
    assert (await parties.reader.get_node(node.address)).provider == provider.address


async def test_unknown_node_reads_as_none(parties, fresh_account):
    info = await parties.reader.get_node(fresh_account(0))
    assert info.status == NodeStatus.NONE and info.run_id == 0 and info.stake == 0 and not info.registered


async def test_stake_too_low(parties, fresh_account):
    run_id = await parties.new_run()
    provider, node = fresh_account(), fresh_account(0)
    with pytest.raises(RevertError) as exc:
        await parties.as_(provider).register_node(run_id, node, DEFAULT_SPECS, stake_wei=MIN_STAKE_WEI - 1)
    assert exc.value.message == (
        f"The stake of {MIN_STAKE_WEI - 1} wei is below the registry's minimum of {MIN_STAKE_WEI} wei; send at least the minimum."
    )
    assert await parties.reader.node_status(node) == NodeStatus.NONE


async def test_double_registration(parties, fresh_account):
    run_id, provider, node, provider_client = await new_node(parties, fresh_account, approve=None)
    other_run = await parties.new_run()
    for target_run in (run_id, other_run):
        with pytest.raises(RevertError) as exc:
            await provider_client.register_node(target_run, node, DEFAULT_SPECS)
        assert exc.value.message == (
            f"Node {node.address} is already registered (status registered); it can register again only after it "
            "has left or been ejected or rejected (or its run has ended) and its stake was withdrawn."
        )


async def test_forged_node_signatures(parties, fresh_account):
    run_id = await parties.new_run()
    other_run = await parties.new_run()
    provider, node, impostor, other_provider = fresh_account(), fresh_account(0), fresh_account(0), fresh_account()
    client = parties.as_(provider)
    forged = {
        "signed by another key": sign_digest(impostor, parties.reader.registration_digest(provider, node, run_id)),
        "signed for another run": parties.reader.sign_registration(node, provider, other_run),
        "signed for another provider": parties.reader.sign_registration(node, other_provider, run_id),
        "garbage": b"\x01" * 65,
    }
    for label, sig in forged.items():
        with pytest.raises(RevertError) as exc:
            await client.register_node(run_id, node.address, DEFAULT_SPECS, node_sig=sig)
        assert exc.value.error_name == "InvalidNodeSignature", label
        assert exc.value.message.startswith(f"The node signature does not come from node {node.address} (it recovers to 0x"), label
        assert exc.value.message.endswith("sign the registration digest with the node's own key."), label
    with pytest.raises(RevertError) as impostor_exc:
        await client.register_node(run_id, node.address, DEFAULT_SPECS, node_sig=forged["signed by another key"])
    assert f"(it recovers to {impostor.address})" in impostor_exc.value.message
    assert await parties.reader.node_status(node) == NodeStatus.NONE


async def test_register_needs_an_open_existing_run_and_a_real_node(parties, fresh_account):
    provider, node = fresh_account(), fresh_account(0)
    client = parties.as_(provider)
    ended = await parties.new_run()
    await parties.buyer.end_run(ended)
    with pytest.raises(RevertError) as ended_exc:
        await client.register_node(ended, node, DEFAULT_SPECS)
    assert ended_exc.value.message == f"Run {ended} has ended, so it accepts no more changes, registrations or joins."
    missing = await parties.reader.run_count() + 50
    with pytest.raises(RevertError) as missing_exc:
        await client.register_node(missing, node, DEFAULT_SPECS)
    assert missing_exc.value.error_name == "RunNotFound"
    with pytest.raises(RevertError) as zero_exc:
        await client.register_node(ended - 1, "0x0000000000000000000000000000000000000000", DEFAULT_SPECS, node_sig=b"\x00" * 65)
    assert zero_exc.value.error_name == "ZeroAddress"


async def test_register_by_address_needs_the_node_signature(parties, fresh_account):
    run_id = await parties.new_run()
    with pytest.raises(PrimeError, match="needs the node's signature"):
        await parties.as_(fresh_account()).register_node(run_id, fresh_account(0).address, DEFAULT_SPECS)


async def test_broke_provider_gets_a_funding_sentence(parties, fresh_account):
    run_id = await parties.new_run()
    broke = fresh_account(0)
    with pytest.raises(PrimeError) as exc:
        await parties.as_(broke).register_node(run_id, fresh_account(0), DEFAULT_SPECS)
    assert exc.value.message.startswith(f"Account {broke.address} does not have enough ETH to pay for the registerNode transaction")


# -------------------------------------------------------------------- validation


async def test_validator_approves_and_rejects(parties, fresh_account):
    run_id, _, approved_node, _ = await new_node(parties, fresh_account, approve=None)
    result = await parties.validator.report_validation(approved_node, True, REPORT)
    assert result.event("NodeValidated").args == {
        "runId": run_id, "node": approved_node.address, "validator": parties.validator_account.address, "approved": True, "reportHash": REPORT,
    }
    info = await parties.reader.get_node(approved_node)
    assert info.status == NodeStatus.APPROVED and info.report_hash == REPORT

    _, _, rejected_node, _ = await new_node(parties, fresh_account, run_id=run_id, approve=None)
    result = await parties.validator.report_validation(rejected_node, False, "0x" + "ab" * 32)
    assert result.event("NodeValidated").args["approved"] is False
    info = await parties.reader.get_node(rejected_node)
    assert info.status == NodeStatus.REJECTED and info.report_hash == b"\xab" * 32


async def test_only_validators_report(parties, fresh_account):
    _, provider, node, provider_client = await new_node(parties, fresh_account, approve=None)
    for who, client in ((provider, provider_client), (parties.admin_account, parties.admin), (parties.master_account, parties.master)):
        with pytest.raises(RevertError) as exc:
            await client.report_validation(node, True, REPORT)
        assert exc.value.message == f"Account {who.address} does not have the validator role needed for this."
    assert await parties.reader.node_status(node) == NodeStatus.REGISTERED


async def test_report_only_on_registered_nodes(parties, fresh_account):
    stranger = fresh_account(0)
    with pytest.raises(RevertError) as none_exc:
        await parties.validator.report_validation(stranger, True, REPORT)
    assert none_exc.value.message == (
        f"Node {stranger.address} is not awaiting validation (status none); only registered nodes can be approved or rejected."
    )
    _, _, node, _ = await new_node(parties, fresh_account, approve=True)
    with pytest.raises(RevertError) as twice:
        await parties.validator.report_validation(node, False, REPORT)
    assert "(status approved)" in twice.value.message
    assert await parties.reader.node_status(node) == NodeStatus.APPROVED


async def test_report_hash_must_be_32_bytes(parties, fresh_account):
    with pytest.raises(PrimeError, match="exactly 32 bytes"):
        await parties.validator.report_validation(fresh_account(0), True, b"short")


async def test_granted_validator_reports_and_revoked_one_cannot(parties, fresh_account):
    newcomer = fresh_account()
    await parties.admin.grant_validator(newcomer)
    assert await parties.reader.is_validator(newcomer)
    _, _, node, _ = await new_node(parties, fresh_account, approve=None)
    await parties.as_(newcomer).report_validation(node, True, REPORT)
    await parties.admin.revoke_validator(newcomer)
    assert not await parties.reader.is_validator(newcomer)
    _, _, other, _ = await new_node(parties, fresh_account, approve=None)
    with pytest.raises(RevertError) as exc:
        await parties.as_(newcomer).report_validation(other, True, REPORT)
    assert exc.value.error_name == "AccessControlUnauthorizedAccount"


async def test_only_admin_grants_validators(parties, fresh_account):
    outsider = fresh_account()
    with pytest.raises(RevertError) as exc:
        await parties.as_(outsider).grant_validator(outsider)
    assert exc.value.message == f"Account {outsider.address} does not have the admin role needed for this."
    assert not await parties.reader.is_validator(outsider)


# -------------------------------------------------------------------------- join


async def test_provider_joins_with_a_master_invite(parties, fresh_account):
    run_id, _, node, provider_client = await new_node(parties, fresh_account)
    expiry, sig = await invite(parties, run_id, node)
    result = await provider_client.join_run(run_id, node, expiry, sig)
    assert result.event("NodeJoined").args == {"runId": run_id, "node": node.address, "master": parties.master_account.address}
    assert await parties.reader.node_status(node) == NodeStatus.ACTIVE
    assert (await parties.reader.get_run(run_id)).node_count == 1


async def test_node_itself_joins(parties, fresh_account):
    run_id, _, node, _ = await new_node(parties, fresh_account)
    expiry, sig = await invite(parties, run_id, node)
    await parties.as_(node).join_run(run_id, node, expiry, sig)
    assert await parties.reader.node_status(node) == NodeStatus.ACTIVE


async def test_join_needs_an_approved_node(parties, fresh_account):
    for approve, label in ((None, "registered"), (False, "rejected")):
        run_id, _, node, provider_client = await new_node(parties, fresh_account, approve=approve)
        expiry, sig = await invite(parties, run_id, node)
        with pytest.raises(RevertError) as exc:
            await provider_client.join_run(run_id, node, expiry, sig)
        assert exc.value.message == f"Node {node.address} is not approved by a validator (status {label}); wait for validation before joining."


async def test_join_with_expired_invite(parties, fresh_account):
    run_id, _, node, provider_client = await new_node(parties, fresh_account)
    expiry, sig = await invite(parties, run_id, node, seconds=-1)
    with pytest.raises(RevertError) as exc:
        await provider_client.join_run(run_id, node, expiry, sig)
    assert exc.value.error_name == "InviteExpired"
    assert exc.value.message.startswith(f"The invite expired at {expiry} (chain time is ")
    assert exc.value.message.endswith("ask the master for a new invite.")


async def test_join_with_forged_invites(parties, fresh_account):
    run_id, _, node, provider_client = await new_node(parties, fresh_account)
    _, _, other_node, _ = await new_node(parties, fresh_account, run_id=run_id)
    other_run = await parties.new_run()  # the same master leads it
    expiry = await invite_expiry(parties.reader)
    master, owner = parties.master_account, parties.buyer_account
    forged = {
        "signed by the run owner, not a master": (parties.reader.sign_invite(owner, run_id, node, expiry), owner.address),
        "signed by a stranger": (parties.reader.sign_invite(fresh_account(0), run_id, node, expiry), None),
        "for another run": (parties.reader.sign_invite(master, other_run, node, expiry), None),
        "for another node": (parties.reader.sign_invite(master, run_id, other_node, expiry), None),
        "for another expiry": (parties.reader.sign_invite(master, run_id, node, expiry + 1), None),
        "garbage": (b"\x00" * 65, "0x0000000000000000000000000000000000000000"),
    }
    for label, (sig, signer) in forged.items():
        with pytest.raises(RevertError) as exc:
            await provider_client.join_run(run_id, node, expiry, sig)
        assert exc.value.error_name == "InviteNotFromMaster", label
        assert exc.value.message.startswith(f"The invite for node {node.address} is not signed by a master of run {run_id} (it recovers to "), label
        if signer:
            assert f"(it recovers to {signer})" in exc.value.message, label
    assert await parties.reader.node_status(node) == NodeStatus.APPROVED


# One run per requirement that the node's specs (DEFAULT_SPECS) miss, in the contract's check order.
UNMET = [
    ("GPU count", Requirements(min_gpus=DEFAULT_SPECS.gpu_count + 1)),
    ("GPU model", Requirements(gpu_model="A100")),
    ("GPU memory", Requirements(min_gpu_memory_mib=DEFAULT_SPECS.gpu_memory_mib + 1)),
    ("CPU cores", Requirements(min_cpu_cores=DEFAULT_SPECS.cpu_cores + 1)),
    ("RAM", Requirements(min_ram_mib=DEFAULT_SPECS.ram_mib + 1)),
    ("disk", Requirements(min_disk_gib=DEFAULT_SPECS.disk_gib + 1)),
]


@pytest.mark.parametrize(("what", "req"), UNMET, ids=[u[0] for u in UNMET])
async def test_join_requires_meeting_the_requirements(parties, fresh_account, what, req):
    assert req.unmet_by(DEFAULT_SPECS) is not None  # the Python rule agrees with the contract
    run_id, _, node, provider_client = await new_node(parties, fresh_account, req=req)
    expiry, sig = await invite(parties, run_id, node)
    with pytest.raises(RevertError) as exc:
        await provider_client.join_run(run_id, node, expiry, sig)
    assert exc.value.message == f"Node {node.address} does not meet the run's {what} requirement, so it cannot join."


async def test_join_when_requirements_met_exactly(parties, fresh_account):
    s = DEFAULT_SPECS
    req = Requirements(s.gpu_count, "h100 80gb", s.gpu_memory_mib, s.cpu_cores, s.ram_mib, s.disk_gib, 0)
    assert req.unmet_by(s) is None
    await joined_node(parties, fresh_account, req=req)


async def test_join_ended_run(parties, fresh_account):
    run_id, _, node, provider_client = await new_node(parties, fresh_account)
    expiry, sig = await invite(parties, run_id, node)
    await parties.buyer.end_run(run_id)
    with pytest.raises(RevertError) as exc:
        await provider_client.join_run(run_id, node, expiry, sig)
    assert exc.value.message == f"Run {run_id} has ended, so it accepts no more changes, registrations or joins."


async def test_double_join(parties, fresh_account):
    run_id, _, node, provider_client = await joined_node(parties, fresh_account)
    expiry, sig = await invite(parties, run_id, node)
    with pytest.raises(RevertError) as exc:
        await provider_client.join_run(run_id, node, expiry, sig)
    assert exc.value.message == f"Node {node.address} has already joined run {run_id}."
    assert (await parties.reader.get_run(run_id)).node_count == 1


async def test_join_another_run_than_registered(parties, fresh_account):
    run_id, _, node, provider_client = await new_node(parties, fresh_account)
    other_run = await parties.new_run()
    expiry, sig = await invite(parties, other_run, node)
    with pytest.raises(RevertError) as exc:
        await provider_client.join_run(other_run, node, expiry, sig)
    assert exc.value.message == f"Node {node.address} is not registered for run {other_run}."


async def test_join_by_outsider(parties, fresh_account):
    run_id, _, node, _ = await new_node(parties, fresh_account)
    expiry, sig = await invite(parties, run_id, node)
    outsider = fresh_account()
    with pytest.raises(RevertError) as exc:
        await parties.as_(outsider).join_run(run_id, node, expiry, sig)
    assert exc.value.message == (
        f"{outsider.address} is neither node {node.address} nor its provider (or the node is not registered), so it cannot act for it."
    )


async def test_max_nodes(parties, fresh_account):
    run_id = await parties.new_run(Requirements(max_nodes=1))
    _, _, first, first_client = await joined_node(parties, fresh_account, run_id=run_id)
    _, _, second, second_client = await new_node(parties, fresh_account, run_id=run_id)
    expiry, sig = await invite(parties, run_id, second)
    with pytest.raises(RevertError) as exc:
        await second_client.join_run(run_id, second, expiry, sig)
    assert exc.value.message == f"Run {run_id} already has its maximum of 1 active node(s)."
    await first_client.leave_run(first)  # a seat frees up
    await second_client.join_run(run_id, second, expiry, sig)
    assert (await parties.reader.get_run(run_id)).node_count == 1


# -------------------------------------------------------------------- leave/eject


async def test_leave_run(parties, fresh_account):
    run_id, _, node, provider_client = await joined_node(parties, fresh_account)
    result = await provider_client.leave_run(node)
    assert result.event("NodeLeft").args == {"runId": run_id, "node": node.address}
    assert await parties.reader.node_status(node) == NodeStatus.LEFT
    assert (await parties.reader.get_run(run_id)).node_count == 0
    with pytest.raises(RevertError) as again:
        await provider_client.leave_run(node)
    assert again.value.message == f"Node {node.address} cannot leave in status left; only registered, approved or active nodes can."


async def test_deregister_before_validation(parties, fresh_account):
    # Operators can always take a registration back and reclaim the stake.
    _, _, node, _ = await new_node(parties, fresh_account, approve=None)
    await parties.as_(node).leave_run(node)
    assert await parties.reader.node_status(node) == NodeStatus.LEFT


async def test_leave_by_outsider(parties, fresh_account):
    _, _, node, _ = await joined_node(parties, fresh_account)
    with pytest.raises(RevertError) as exc:
        await parties.buyer.leave_run(node)
    assert exc.value.error_name == "NotNodeOperator"
    assert await parties.reader.node_status(node) == NodeStatus.ACTIVE


async def test_master_ejects(parties, fresh_account):
    run_id, _, node, _ = await joined_node(parties, fresh_account)
    result = await parties.master.eject_node(run_id, node)
    assert result.event("NodeEjected").args == {"runId": run_id, "node": node.address, "master": parties.master_account.address}
    assert await parties.reader.node_status(node) == NodeStatus.EJECTED
    assert (await parties.reader.get_run(run_id)).node_count == 0


async def test_eject_by_non_master(parties, fresh_account):
    run_id, provider, node, provider_client = await joined_node(parties, fresh_account)
    for who, client in ((parties.buyer_account, parties.buyer), (provider, provider_client)):
        with pytest.raises(RevertError) as exc:
            await client.eject_node(run_id, node)
        assert exc.value.message == f"{who.address} is not a master of run {run_id}."
    assert await parties.reader.node_status(node) == NodeStatus.ACTIVE


async def test_eject_only_active_nodes_of_the_run(parties, fresh_account):
    run_id, _, approved, _ = await new_node(parties, fresh_account)
    with pytest.raises(RevertError) as exc:
        await parties.master.eject_node(run_id, approved)
    assert exc.value.message == f"Node {approved.address} is not active in the run (status approved)."
    other_run, _, elsewhere, _ = await joined_node(parties, fresh_account)
    with pytest.raises(RevertError) as other:
        await parties.master.eject_node(run_id, elsewhere)
    assert other.value.message == f"Node {elsewhere.address} is not registered for run {run_id}."


# ------------------------------------------------------------------ stake


async def test_withdraw_after_leaving_pays_the_provider(parties, fresh_account, deployment):
    _, provider, node, provider_client = await joined_node(parties, fresh_account)
    await provider_client.leave_run(node)
    provider_before = await parties.reader.balance(provider)
    registry_before = await parties.reader.balance(deployment.registry)

    result = await parties.as_(node).withdraw_stake(node)  # the node pays the gas, so the provider's gain is exact

    assert result.event("StakeWithdrawn").args == {"node": node.address, "provider": provider.address, "amount": MIN_STAKE_WEI}
    assert await parties.reader.balance(provider) == provider_before + MIN_STAKE_WEI
    assert await parties.reader.balance(deployment.registry) == registry_before - MIN_STAKE_WEI
    assert (await parties.reader.get_node(node)).stake == 0
    with pytest.raises(RevertError) as twice:
        await provider_client.withdraw_stake(node)
    assert twice.value.message == f"Node {node.address} has no stake left to withdraw."
    assert await parties.reader.balance(provider) == provider_before + MIN_STAKE_WEI


async def test_withdraw_after_ejection_and_rejection(parties, fresh_account):
    run_id, _, ejected, ejected_client = await joined_node(parties, fresh_account)
    await parties.master.eject_node(run_id, ejected)
    await ejected_client.withdraw_stake(ejected)
    _, _, rejected, rejected_client = await new_node(parties, fresh_account, approve=False)
    await rejected_client.withdraw_stake(rejected)
    assert (await parties.reader.get_node(ejected)).stake == 0 == (await parties.reader.get_node(rejected)).stake


async def test_withdraw_before_leaving(parties, fresh_account):
    for status, make in (("registered", dict(approve=None)), ("approved", dict(approve=True))):
        _, _, node, client = await new_node(parties, fresh_account, **make)
        with pytest.raises(RevertError) as exc:
            await client.withdraw_stake(node)
        assert exc.value.message == f"The stake of node {node.address} is locked while it is {status}; leave the run first."
    _, _, active, active_client = await joined_node(parties, fresh_account)
    with pytest.raises(RevertError) as exc:
        await active_client.withdraw_stake(active)
    assert exc.value.error_name == "StakeLocked" and "while it is active" in exc.value.message


async def test_withdraw_by_outsider(parties, fresh_account):
    _, _, node, client = await joined_node(parties, fresh_account)
    await client.leave_run(node)
    with pytest.raises(RevertError) as exc:
        await parties.buyer.withdraw_stake(node)
    assert exc.value.error_name == "NotNodeOperator"
    assert (await parties.reader.get_node(node)).stake == MIN_STAKE_WEI


async def test_withdraw_to_a_provider_that_refuses_eth(parties, fresh_account, anvil):
    _, provider, node, client = await new_node(parties, fresh_account, approve=False)
    anvil.rpc("anvil_setCode", [provider.address, REVERTING_CODE])
    try:
        with pytest.raises(RevertError) as exc:
            await parties.as_(node).withdraw_stake(node)
        assert exc.value.message == f"Paying {MIN_STAKE_WEI} wei to {provider.address} failed; that address does not accept ETH."
        assert (await parties.reader.get_node(node)).stake == MIN_STAKE_WEI  # nothing lost
    finally:
        anvil.rpc("anvil_setCode", [provider.address, "0x"])


async def test_re_registration_only_after_withdrawal(parties, fresh_account):
    run_id, _, node, client = await new_node(parties, fresh_account, approve=False)
    with pytest.raises(RevertError) as exc:
        await client.register_node(run_id, node, DEFAULT_SPECS)
    assert exc.value.error_name == "NodeAlreadyRegistered" and "(status rejected)" in exc.value.message
    await client.withdraw_stake(node)
    other_run = await parties.new_run()
    bigger = replace(DEFAULT_SPECS, gpu_count=8)
    await client.register_node(other_run, node, bigger)
    info = await parties.reader.get_node(node)
    assert (info.status, info.run_id, info.specs, info.stake, info.report_hash) == (NodeStatus.REGISTERED, other_run, bigger, MIN_STAKE_WEI, b"\x00" * 32)


# ------------------------------------------------------------------ admin


async def test_slash(parties, fresh_account, deployment):
    _, provider, node, client = await joined_node(parties, fresh_account)
    registry_before = await parties.reader.balance(deployment.registry)
    result = await parties.admin.slash(node, MIN_STAKE_WEI // 4)
    assert result.event("NodeSlashed").args == {"node": node.address, "amount": MIN_STAKE_WEI // 4, "remainingStake": MIN_STAKE_WEI - MIN_STAKE_WEI // 4}
    assert await parties.reader.balance(deployment.registry) == registry_before - MIN_STAKE_WEI // 4
    with pytest.raises(RevertError) as too_much:
        await parties.admin.slash(node, MIN_STAKE_WEI)
    assert too_much.value.message == (
        f"Cannot slash {MIN_STAKE_WEI} wei from node {node.address}: its stake is {MIN_STAKE_WEI - MIN_STAKE_WEI // 4} wei "
        "and the amount must be between 1 and the stake."
    )
    await client.leave_run(node)
    provider_before = await parties.reader.balance(provider)
    await parties.as_(node).withdraw_stake(node)
    assert await parties.reader.balance(provider) == provider_before + MIN_STAKE_WEI - MIN_STAKE_WEI // 4


async def test_slash_by_non_admin(parties, fresh_account):
    _, _, node, _ = await joined_node(parties, fresh_account)
    with pytest.raises(RevertError) as exc:
        await parties.validator.slash(node, 1)
    assert exc.value.message == f"Account {parties.validator_account.address} does not have the admin role needed for this."
    assert (await parties.reader.get_node(node)).stake == MIN_STAKE_WEI


async def test_set_min_stake(parties, fresh_account):
    outsider = fresh_account()
    with pytest.raises(RevertError) as exc:
        await parties.as_(outsider).set_min_stake(1)
    assert exc.value.error_name == "AccessControlUnauthorizedAccount"
    result = await parties.admin.set_min_stake(2 * MIN_STAKE_WEI)
    try:
        assert result.event("MinStakeChanged").args == {"minStake": 2 * MIN_STAKE_WEI}
        assert await parties.reader.min_stake() == 2 * MIN_STAKE_WEI
        run_id = await parties.new_run()
        with pytest.raises(RevertError) as low:
            await parties.as_(fresh_account()).register_node(run_id, fresh_account(0), DEFAULT_SPECS, stake_wei=MIN_STAKE_WEI)
        assert low.value.error_name == "StakeTooLow"
    finally:
        await parties.admin.set_min_stake(MIN_STAKE_WEI)  # the session's registry is shared


async def test_read_only_client_cannot_send(parties):
    with pytest.raises(PrimeError, match="no account"):
        await parties.reader.end_run(1)


async def test_specs_reject_out_of_range_numbers():
    with pytest.raises(ValueError, match="gpu_count"):
        Specs(-1, "x", 0, 0, 0, 0)
