"""ChainPermissions against the real registry on anvil (the unit tests use a fake)."""

from __future__ import annotations

from eth_account import Account

from prime.auth.permissions import ChainPermissions
from prime.chain.types import Requirements
from tests.fixtures.chain import onboard_node

REQUIREMENTS = Requirements(
    min_gpus=1, gpu_model="", min_gpu_memory_mib=1, min_cpu_cores=1, min_ram_mib=1, min_disk_gib=1, max_nodes=4
)


async def test_permissions_read_the_chain(anvil, chain_client, fresh_account) -> None:
    owner, master, provider, node = fresh_account(), Account.create(), fresh_account(), Account.create()
    validator = anvil.accounts[1]
    owner_client = await chain_client(owner)
    run_id = await owner_client.create_run(REQUIREMENTS, "http://127.0.0.1:1", [master.address])
    await onboard_node(await chain_client(provider), await chain_client(validator), run_id, node)

    perms = ChainPermissions(await chain_client(), ttl_s=0.0)  # no caching: every answer from chain
    assert await perms.is_validator(validator.address)
    assert not await perms.is_validator(owner.address)
    assert await perms.is_master(run_id, master.address)
    assert not await perms.is_master(run_id, owner.address)
    assert await perms.is_run_owner(run_id, owner.address)
    assert not await perms.is_run_owner(run_id, master.address)
    assert not await perms.is_run_owner(10**9, owner.address)  # unknown run: a no, not an error
    assert await perms.is_registered_node(run_id, node.address)
    assert not await perms.is_registered_node(run_id, provider.address)
    assert await perms.node_run_id(node.address) == run_id
    assert await perms.node_run_id(Account.create().address) is None

    await owner_client.remove_master(run_id, master.address)
    assert not await perms.is_master(run_id, master.address)
