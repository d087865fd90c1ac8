"""Runs and their masters on a real anvil: happy paths and every access-control/validation revert."""

from __future__ import annotations

import pytest

from prime.chain.client import RevertError
from prime.chain.types import Requirements

ZERO = "0x0000000000000000000000000000000000000000"


async def test_create_run_stores_everything_and_emits_events(parties, fresh_account):
    second_master = fresh_account(0)
    req = Requirements(min_gpus=4, gpu_model="H100", min_gpu_memory_mib=80_000, min_cpu_cores=16, min_ram_mib=65_536, min_disk_gib=500, max_nodes=8)
    before = await parties.reader.run_count()

    result = await parties.buyer.create_run_tx(req, "http://127.0.0.1:9000", [parties.master_account, second_master])

    created = result.event("RunCreated")
    run_id = created.args["runId"]
    assert run_id == before + 1 == await parties.reader.run_count()
    assert created.args["owner"] == parties.buyer_account.address
    assert [e.name for e in result.events] == ["RunCreated", "MasterAdded", "MasterAdded"]
    run = await parties.reader.get_run(run_id)
    assert run.owner == parties.buyer_account.address
    assert run.requirements == req
    assert run.discovery_uri == "http://127.0.0.1:9000"
    assert run.masters == [parties.master_account.address, second_master.address]
    assert run.ended is False and run.node_count == 0
    assert await parties.reader.is_master(run_id, second_master)
    assert not await parties.reader.is_master(run_id, parties.buyer_account)


async def test_create_run_returns_consecutive_ids(parties):
    first = await parties.new_run()
    second = await parties.new_run()
    assert second == first + 1


async def test_create_run_rejects_zero_and_duplicate_masters(parties):
    with pytest.raises(RevertError) as zero:
        await parties.new_run(masters=[ZERO])
    assert zero.value.message == "The zero address is not allowed here; pass a real account address."
    with pytest.raises(RevertError) as dup:
        await parties.new_run(masters=[parties.master_account, parties.master_account])
    assert dup.value.error_name == "AlreadyMaster"
    assert dup.value.message.startswith(f"{parties.master_account.address} is already a master of run ")


async def test_owner_adds_and_removes_masters(parties, fresh_account):
    run_id = await parties.new_run()
    extra = fresh_account(0)

    added = await parties.buyer.add_master(run_id, extra)
    assert added.event("MasterAdded").args == {"runId": run_id, "master": extra.address}
    assert await parties.reader.is_master(run_id, extra)
    assert (await parties.reader.get_run(run_id)).masters == [parties.master_account.address, extra.address]

    removed = await parties.buyer.remove_master(run_id, parties.master_account)
    assert removed.event("MasterRemoved").args == {"runId": run_id, "master": parties.master_account.address}
    assert not await parties.reader.is_master(run_id, parties.master_account)
    assert (await parties.reader.get_run(run_id)).masters == [extra.address]


async def test_master_changes_by_non_owner_revert(parties, fresh_account):
    run_id = await parties.new_run()
    outsider = fresh_account()
    expected = f"Only the owner of run {run_id} can do this, and {outsider.address} is not its owner."
    for attempt in (
        lambda c: c.add_master(run_id, outsider),
        lambda c: c.remove_master(run_id, parties.master_account),
        lambda c: c.end_run(run_id),
    ):
        with pytest.raises(RevertError) as exc:
            await attempt(parties.as_(outsider))
        assert exc.value.message == expected
    # A master of the run is not its owner either.
    with pytest.raises(RevertError) as by_master:
        await parties.master.add_master(run_id, outsider)
    assert by_master.value.error_name == "NotRunOwner"
    assert (await parties.reader.get_run(run_id)).masters == [parties.master_account.address]


async def test_add_existing_and_remove_unknown_master_revert(parties, fresh_account):
    run_id = await parties.new_run()
    stranger = fresh_account(0)
    with pytest.raises(RevertError) as again:
        await parties.buyer.add_master(run_id, parties.master_account)
    assert again.value.message == f"{parties.master_account.address} is already a master of run {run_id}."
    with pytest.raises(RevertError) as unknown:
        await parties.buyer.remove_master(run_id, stranger)
    assert unknown.value.message == f"{stranger.address} is not a master of run {run_id}."


async def test_end_run_then_no_more_changes(parties, fresh_account):
    run_id = await parties.new_run()
    result = await parties.buyer.end_run(run_id)
    assert result.event("RunEnded").args == {"runId": run_id}
    assert (await parties.reader.get_run(run_id)).ended is True

    ended = f"Run {run_id} has ended, so it accepts no more changes, registrations or joins."
    for attempt in (
        lambda: parties.buyer.end_run(run_id),
        lambda: parties.buyer.add_master(run_id, fresh_account(0)),
        lambda: parties.buyer.remove_master(run_id, parties.master_account),
    ):
        with pytest.raises(RevertError) as exc:
            await attempt()
        assert exc.value.message == ended


async def test_unknown_run(parties):
    missing = await parties.reader.run_count() + 1000
    with pytest.raises(RevertError) as exc:
        await parties.reader.get_run(missing)
    assert exc.value.message == f"Run {missing} does not exist on this registry; check the run id."
    with pytest.raises(RevertError) as add:
        await parties.buyer.add_master(missing, parties.master_account)
    assert add.value.error_name == "RunNotFound"
    assert await parties.reader.is_master(missing, parties.master_account) is False


async def test_roles_and_min_stake_views(parties, deployment):
    assert await parties.reader.is_admin(parties.admin_account)
    assert await parties.reader.is_validator(parties.validator_account)
    assert not await parties.reader.is_validator(parties.buyer_account)
    assert await parties.reader.min_stake() == 10**16
    assert parties.reader.chain_id == deployment.chain_id
    assert await parties.reader.block_number() >= deployment.block


async def test_concurrent_sends_from_one_account_get_distinct_nonces(parties, chain_client):
    import asyncio

    # Two clients of the same account in one process, five transactions at once.
    other_client = await chain_client(parties.buyer_account)
    before = await parties.reader.run_count()
    ids = await asyncio.gather(*(client.create_run(Requirements(), f"http://127.0.0.1:{9000 + i}", [parties.master_account])
                                 for i, client in enumerate([parties.buyer, other_client] * 2 + [parties.buyer])))
    assert sorted(ids) == list(range(before + 1, before + 6))
    uris = {(await parties.reader.get_run(i)).discovery_uri for i in ids}
    assert uris == {f"http://127.0.0.1:{9000 + i}" for i in range(5)}
