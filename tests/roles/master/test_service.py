"""The master as a real process against a real anvil and a real discovery process: an approved
node is invited (valid signature, real joinRun), heartbeats make it Healthy, silence makes it
Unhealthy then Dead, a heartbeat brings it back without a new invite, and kill -9 + restart keeps
every node and invites nobody again. Strangers and unsigned heartbeats change nothing."""

from __future__ import annotations

import json
import subprocess

import pytest
import pytest_asyncio
from eth_account import Account

from prime.chain.types import NodeStatus
from tests.fixtures.chain import DEFAULT_SPECS
from tests.fixtures.processes import RoleProcesses, free_port
from tests.roles.master.fake_miner import (
    PASSWORD,
    World,
    eventually,
    make_world,
    master_command,
    signed_call,
    write_key,
)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(anvil, deployment, module_role_processes: RoleProcesses, tmp_path_factory):
    w = await make_world(anvil, deployment, module_role_processes, tmp_path_factory.mktemp("master-service"))
    yield w
    await w.close()


async def _state_is(world: World, address: str, wanted: str) -> bool:
    return await world.node_state(address) == wanted


async def test_node_lifecycle_invite_health_and_restart(world: World, anvil) -> None:
    miner = await world.new_miner(anvil=anvil)
    other = await world.new_miner(anvil=anvil)

    # Approved on chain -> the master looks it up in discovery and invites it; the miner joins.
    for m in (miner, other):
        await eventually(lambda m=m: _state_is(world, m.address, "Joined"), what=f"{m.address} Joined")
        assert len(m.received.invites) == 1, m.received.refused_invites
        invite = m.received.invites[0]
        assert invite["run_id"] == world.run_id and invite["master_url"] == world.url
    assert await world.owner_client.node_status(miner.address) == NodeStatus.ACTIVE
    assert await world.metric("prime_master_node_transitions_total", 'from="Invited",to="Joined"') >= 2

    # Heartbeats -> Healthy, and the answer names the interval.
    for m in (miner, other):
        status, answer = await m.heartbeat()
        assert status == 200 and answer == {"interval_s": 1.0, "desired": []}
        m.start_heartbeats()
    await eventually(lambda: _state_is(world, miner.address, "Healthy"), what="Healthy")
    node = (await world.nodes())[miner.address]
    assert node["hardware"]["gpu_count"] == 2 and node["last_sample"]["gpus"][0]["util"] == 10.0

    # Silence: Unhealthy, then Dead (interval 1 s, unhealthy after 2 missed, dead after 4).
    other.stop_heartbeats()
    await eventually(lambda: _state_is(world, other.address, "Unhealthy"), what="Unhealthy")
    await eventually(lambda: _state_is(world, other.address, "Dead"), what="Dead")
    assert await world.node_state(miner.address) == "Healthy"  # the other one kept heartbeating
    assert await world.metric("prime_master_nodes", 'state="Dead"') >= 1

    # A heartbeat brings it back: Healthy, no new invite.
    status, _ = await other.heartbeat()
    assert status == 200
    assert await world.node_state(other.address) == "Healthy"
    assert len(other.received.invites) == 1
    assert await world.metric("prime_master_node_transitions_total", 'from="Dead",to="Healthy"') >= 1

    # Make it Dead again, then crash the master (kill -9) and restart it on the same data dir.
    other.stop_heartbeats()
    await eventually(lambda: _state_is(world, other.address, "Dead"), what="Dead again")
    before = await world.nodes()
    world.master.kill()
    await world.master.start_async()
    after = await world.nodes()
    assert set(after) == set(before)
    for address in (miner.address, other.address):
        assert after[address]["state"] == before[address]["state"], address
        assert after[address]["invites_sent"] == before[address]["invites_sent"] == 1
        assert after[address]["hardware"] == before[address]["hardware"]
    assert after[miner.address]["state"] == "Healthy" and after[other.address]["state"] == "Dead"

    # The restarted master catches up with the chain and still invites nobody.
    await eventually(lambda: _state_is(world, miner.address, "Healthy"), what="Healthy after restart")
    status, _ = await other.heartbeat()
    assert status == 200 and await world.node_state(other.address) == "Healthy"
    assert len(miner.received.invites) == 1 and len(other.received.invites) == 1
    miner.stop_heartbeats()


async def test_heartbeats_from_strangers_or_unsigned_change_nothing(world: World, anvil) -> None:
    before = await world.nodes()
    body = json.dumps({"tasks": [], "gpus": [], "load": {}}).encode()

    status, answer = await signed_call(None, "POST", world.url, "/heartbeat", body)
    assert status == 401 and answer["error"] == "unauthorized"

    stranger = Account.create()
    status, answer = await signed_call(stranger, "POST", world.url, "/heartbeat", body)
    assert status == 403 and answer["error"] == "not_a_member"

    # Registered on chain but never approved nor joined: not a member either.
    registered = Account.create()
    provider = Account.create()
    anvil.set_balance(provider.address, 10**18)
    from prime.chain.client import RegistryClient

    async with await RegistryClient.connect(world.rpc_url, world.deployment, provider) as client:
        await client.register_node(world.run_id, registered, DEFAULT_SPECS)
    status, answer = await signed_call(registered, "POST", world.url, "/heartbeat", body)
    assert status == 403 and "not" in answer["detail"]
    # A key with rights elsewhere (the run's validator) is no node of this run.
    status, answer = await signed_call(world.validator, "POST", world.url, "/heartbeat", body)
    assert status == 403

    status, answer = await signed_call(stranger, "POST", world.url, "/heartbeat", b"{not json")
    assert status == 400 and answer["error"] == "invalid_json"
    status, answer = await signed_call(stranger, "POST", world.url, "/heartbeat",
                                       json.dumps({"tasks": [{"id": "x", "state": "Bogus"}]}).encode())
    assert status == 400 and answer["detail"]["field"] == "tasks[0].state"

    after = await world.nodes()
    assert set(after) == set(before)
    assert await world.metric("prime_master_heartbeats_total", 'result="refused"') >= 3


async def test_a_node_that_joined_while_the_master_was_down_is_adopted_not_invited(world: World, anvil) -> None:
    world.master.kill()
    try:
        miner = await world.new_miner(anvil=anvil)
        # Join on chain with an invite the master signed before (the master is down: sign it here).
        expiry = await world.owner_client.block_timestamp() + 600
        signature = world.owner_client.sign_invite(world.master_account, world.run_id, miner.address, expiry)
        await miner._chain.join_run(world.run_id, miner.address, expiry, signature)
        miner.master_url = world.url
    finally:
        await world.master.start_async()
    status, answer = await miner.heartbeat()
    assert status == 200, answer
    assert await world.node_state(miner.address) == "Healthy"
    await eventually(lambda: _state_is(world, miner.address, "Healthy"), what="healthy")
    node = (await world.nodes())[miner.address]
    assert node["invites_sent"] == 0 and miner.received.invites == []
    assert node["hardware"]["gpu_count"] == 2


async def test_a_refused_invite_is_retried_after_a_backoff(world: World, anvil) -> None:
    from tests.roles.master.fake_miner import FakeMiner

    node, provider = Account.create(), Account.create()
    anvil.set_balance(provider.address, 10**19)
    miner = await FakeMiner(node, provider, world.run_id, world.rpc_url, world.deployment).start()
    world.miners.append(miner)
    miner.refuse_invites = True
    await miner.register_and_announce(world.validator_client, world.discovery_uri)

    async def failed_once() -> dict | None:
        rec = (await world.nodes()).get(miner.address)
        return rec if rec and rec["invite_failures"] >= 1 else None

    rec = await eventually(failed_once, what="a failed invite")
    assert rec["state"] == "Approved" and "not ready for invites" in rec["last_error"]
    assert rec["next_invite_at"] > rec["invited_at"]
    miner.refuse_invites = False
    # The retry comes after the backoff (5 s for the first failure) and succeeds.
    await eventually(lambda: _state_is(world, miner.address, "Joined"), timeout_s=30, what="joined after the retry")
    assert len(miner.received.invites) == 1 and len(miner.received.refused_invites) >= 1
    assert await world.metric("prime_master_invites_total", 'result="failed"') >= 1


def test_master_refuses_to_start_with_a_key_that_is_not_a_master(world: World, tmp_path) -> None:
    stranger = Account.create()
    key_file = write_key(tmp_path, stranger)
    command = master_command(free_port(), world.run_id, key_file, world.rpc_url, world.deployment.path,
                             tmp_path / "data")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PRIME_")}
    env["PRIME_KEY_PASSWORD"] = PASSWORD
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert f"Key {stranger.address} is not a master of run {world.run_id} on chain" in done.stderr
    assert "Traceback" not in done.stderr

    missing_run = master_command(free_port(), 10**9, write_key(tmp_path, Account.create()), world.rpc_url,
                                 world.deployment.path, tmp_path / "data2")
    done = subprocess.run(missing_run, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "does not exist" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--dead-after"])
def test_dead_after_must_exceed_unhealthy_after(flag: str, tmp_path) -> None:
    from tests.fixtures.processes import prime_command

    done = subprocess.run(prime_command("master", "start", "--run-id", "1", "--deployment", str(tmp_path / "d.json"),
                                        "--unhealthy-after", "3", flag, "3"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "must be more than --unhealthy-after" in done.stderr
