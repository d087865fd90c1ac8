"""`prime buyer create-run|add-master|remove-master|end-run|run show` as real processes against a
real anvil: their JSON output is checked against what the chain then says."""

from __future__ import annotations

import json

import pytest
from eth_account import Account

from prime.chain.types import Requirements
from tests.roles.buyer.conftest import KEY_PASSWORD, arun_prime, assert_one_sentence_error
from tests.support.miner_env import discovery  # noqa: F401  (the session discovery process)


@pytest.fixture
def owner_env(anvil, deployment, fresh_account, key_file_for):
    owner = fresh_account()
    return owner, {
        "PRIME_RPC_URL": anvil.rpc_url,
        "PRIME_DEPLOYMENT": str(deployment.path),
        "PRIME_KEY_FILE": str(key_file_for(owner)),
        "PRIME_KEY_PASSWORD": KEY_PASSWORD,
    }


DISCOVERY_URI = f"http://127.0.0.1:8090#{Account.create().address}"  # a discovery URL with its signer


async def test_run_lifecycle_matches_the_chain(owner_env, chain_client):
    owner, env = owner_env
    master_a, master_b = Account.create().address, Account.create().address
    created = await arun_prime(
        "buyer", "create-run", "--discovery-uri", DISCOVERY_URI, "--master", master_a,
        "--min-gpus", "2", "--gpu-model", "H100", "--min-gpu-memory-mib", "80000", "--min-cpu-cores", "16",
        "--min-ram-mib", "65536", "--min-disk-gib", "500", "--max-nodes", "4", "--json", env=env,
    )
    assert created.returncode == 0, created.stderr
    answer = json.loads(created.stdout)
    run_id = answer["run_id"]
    client = await chain_client()
    run = await client.get_run(run_id)
    assert run.owner == owner.address
    assert run.masters == [master_a]
    assert run.discovery_uri == DISCOVERY_URI
    assert run.requirements == Requirements(2, "H100", 80000, 16, 65536, 500, 4)
    assert answer["run"]["requirements"]["min_gpu_memory_mib"] == 80000
    assert answer["tx_hash"].startswith("0x")

    added = await arun_prime("buyer", "add-master", str(run_id), master_b, "--json", env=env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["masters"] == [master_a, master_b]
    assert await client.is_master(run_id, master_b)

    removed = await arun_prime("buyer", "remove-master", str(run_id), master_a, "--json", env=env)
    assert removed.returncode == 0, removed.stderr
    assert (await client.get_run(run_id)).masters == [master_b]

    shown = await arun_prime("buyer", "run", "show", str(run_id), "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "run_id": run_id, "owner": owner.address,
        "requirements": {"min_gpus": 2, "gpu_model": "H100", "min_gpu_memory_mib": 80000, "min_cpu_cores": 16,
                         "min_ram_mib": 65536, "min_disk_gib": 500, "max_nodes": 4},
        "discovery_uri": DISCOVERY_URI, "masters": [master_b], "ended": False, "node_count": 0,
    }
    table = await arun_prime("buyer", "run", "show", str(run_id), env=env)
    assert owner.address in table.stdout and "'H100'" in table.stdout and "open" in table.stdout

    ended = await arun_prime("buyer", "end-run", str(run_id), "--json", env=env)
    assert ended.returncode == 0, ended.stderr
    assert json.loads(ended.stdout)["ended"] is True
    assert (await client.get_run(run_id)).ended

    again = await arun_prime("buyer", "add-master", str(run_id), master_a, env=env)
    assert_one_sentence_error(again, f"Run {run_id} has ended")


async def test_plain_create_run_prints_only_the_id(owner_env, chain_client):
    owner, env = owner_env
    result = await arun_prime("buyer", "create-run", "--discovery-uri", DISCOVERY_URI, env=env)
    assert result.returncode == 0, result.stderr
    run_id = int(result.stdout.strip())
    assert (await (await chain_client()).get_run(run_id)).owner == owner.address
    assert "no master yet" in result.stderr


async def test_chain_errors_are_one_sentence(owner_env, anvil, deployment, fresh_account, key_file_for):
    owner, env = owner_env
    created = await arun_prime("buyer", "create-run", "--discovery-uri", DISCOVERY_URI, env=env)
    run_id = created.stdout.strip()

    stranger = fresh_account()
    stranger_env = {**env, "PRIME_KEY_FILE": str(key_file_for(stranger))}
    not_owner = await arun_prime("buyer", "end-run", run_id, env=stranger_env)
    assert_one_sentence_error(not_owner, f"Only the owner of run {run_id}", stranger.address)

    missing = await arun_prime("buyer", "run", "show", "999999", env=env)
    assert_one_sentence_error(missing, "Run 999999 does not exist")

    bad_address = await arun_prime("buyer", "add-master", run_id, "0x1234", env=env)
    assert_one_sentence_error(bad_address, "is not an Ethereum address")

    bad_uri = await arun_prime("buyer", "create-run", "--discovery-uri", "discovery.local", env=env)
    assert_one_sentence_error(bad_uri, "--discovery-uri")

    wrong_password = await arun_prime("buyer", "end-run", run_id, env={**env, "PRIME_KEY_PASSWORD": "nope"})
    assert_one_sentence_error(wrong_password, "Wrong password")

    no_chain = await arun_prime("buyer", "run", "show", run_id, env={**env, "PRIME_RPC_URL": "http://127.0.0.1:1"})
    assert_one_sentence_error(no_chain, "Cannot reach the chain RPC at http://127.0.0.1:1")

    no_deployment = await arun_prime("buyer", "run", "show", run_id, env={k: v for k, v in env.items() if k != "PRIME_DEPLOYMENT"})
    assert_one_sentence_error(no_deployment, "--deployment")


async def test_create_run_asks_discovery_for_its_signer_when_the_uri_names_none(owner_env, chain_client, discovery):  # noqa: F811
    owner, env = owner_env
    created = await arun_prime("buyer", "create-run", "--discovery-uri", discovery.base_url, env=env)
    assert created.returncode == 0, created.stderr
    assert f"signs as {discovery.address}" in created.stderr
    run = await (await chain_client()).get_run(int(created.stdout.strip()))
    assert run.discovery_uri == f"{discovery.base_url}#{discovery.address}"

    # Nothing listens there: one sentence saying what to do, no run created.
    absent = await arun_prime("buyer", "create-run", "--discovery-uri", "http://127.0.0.1:1", env=env)
    assert_one_sentence_error(absent, "Could not ask discovery at http://127.0.0.1:1 for its signing address")
    garbled = await arun_prime("buyer", "create-run", "--discovery-uri", "http://127.0.0.1:8090#not-an-address", env=env)
    assert_one_sentence_error(garbled, "is not a 0x address after '#'")
