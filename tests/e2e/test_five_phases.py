"""The five phases of prime, end to end, as separate real processes on loopback.

anvil (its own chain for this test), then as real ``prime`` processes: discovery, validator,
master and a miner, with the buyer's side driven through the ``prime buyer`` CLI; tasks run in
the real Docker engine. Each phase's result is asserted both on chain and off chain:

0. preparation  `prime buyer create-run` → the run on chain with its requirements and master
1. registration  NodeRegistered with the stake; discovery has the node's address
2. validation    NodeValidated(approved); the report in `prime validator reports --json`
3. onboarding    the node Active on chain (NodeJoined by the master) and Healthy at the master
4. execution     a persistent task's status, logs and files (sha256 as the task printed them),
                 a failing task's exit code, and a stopped task's container gone
then liveness:   the miner stopped → Unhealthy → Dead at the master, started again → Healthy with no
                 second joinRun; the master killed and restarted keeps the node and invites nobody
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.auth.client import SignedClient
from prime.auth.signing import Domain
from prime.chain.anvil import AnvilProcess, start_anvil
from prime.chain.client import RegistryClient
from prime.chain.deploy import deploy_registry
from prime.chain.types import NodeStatus, Requirements
from prime.clients.discovery import DiscoveryClient
from prime.keys import create_keystore
from prime.roles.buyer.master_client import MasterClient
from tests.e2e.support import (
    SLEEPER_SCRIPT,
    Prime,
    node_containers,
    only,
    remove_containers,
    sha256_file,
    task_containers,
    wait_until,
)
from tests.fixtures.processes import RoleProcesses, free_port, prime_command

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(300)]

PASSWORD = "e2e-password"
MIN_STAKE_WEI = 10**16
HEARTBEAT_S = 1.0
REQUIREMENTS = Requirements(min_gpus=0, gpu_model="", min_gpu_memory_mib=0, min_cpu_cores=1, min_ram_mib=256, min_disk_gib=0, max_nodes=3)

# The persistent task: prints lines, writes known and random files to /data, prints their sha256.
HELLO = b"hello from the prime e2e task\n"
NUMBERS = "".join(f"{i}\n" for i in range(1, 2001)).encode()
RANDOM_SIZE = 256 * 1024
PERSISTENT_SCRIPT = (
    'echo "e2e line one"; echo "e2e line two"; '
    "mkdir -p /data/sub; "
    "printf 'hello from the prime e2e task\\n' > /data/hello.txt; "
    "seq 1 2000 > /data/sub/numbers.txt; "
    "dd if=/dev/urandom of=/data/sub/random.bin bs=1024 count=256 2>/dev/null; "
    "cd /data && sha256sum hello.txt sub/numbers.txt sub/random.bin; "
    'echo "e2e done"'
)
FAILING_SCRIPT = 'echo "about to fail"; exit 7'
EXPECTED_FILES = {"hello.txt": hashlib.sha256(HELLO).hexdigest(), "sub/numbers.txt": hashlib.sha256(NUMBERS).hexdigest()}


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[AnvilProcess]:
    """A chain of this test's own: the validator sees no other test's registrations."""
    anvil = start_anvil(None, log_path=tmp_path / "anvil.log")
    try:
        yield anvil
    finally:
        anvil.stop()


def keystore(directory: Path, name: str, account: LocalAccount) -> Path:
    path = directory / f"{name}.json"
    create_keystore(path, PASSWORD, private_key=account.key.hex(), kdf="pbkdf2", iterations=16)
    return path


async def events_for(reader: RegistryClient, from_block: int, name: str, node: str) -> list[Any]:
    return [e for e in await reader.get_logs(from_block, await reader.block_number(), [name]) if e.args.get("node") == node]


async def test_five_phases_end_to_end(
    role_processes: RoleProcesses, chain: AnvilProcess, docker_client: docker.DockerClient, busybox_image: str, tmp_path: Path
) -> None:
    admin, validator, buyer, master, provider = chain.accounts[:5]
    node = Account.create()  # the node key holds no ETH: the provider pays stake and joinRun
    discovery_key = Account.create()  # signs discovery's answers
    keys = tmp_path / "keys"
    key = {name: keystore(keys, name, acct) for name, acct in
           (("buyer", buyer), ("validator", validator), ("master", master), ("provider", provider), ("node", node),
            ("discovery", discovery_key))}
    env = {"PRIME_KEY_PASSWORD": PASSWORD, "PRIME_PROVIDER_KEY_PASSWORD": PASSWORD, "PRIME_HOME": str(tmp_path / "home")}
    prime = Prime(env)

    deployed = await deploy_registry(chain.rpc_url, admin, min_stake_wei=MIN_STAKE_WEI)
    deployment = deployed.save(tmp_path / "deployment.json")
    reader = await RegistryClient.connect(chain.rpc_url, deployment)
    try:
        await reader.with_account(admin).grant_validator(validator.address)
        chain_args = ["--rpc-url", chain.rpc_url, "--deployment", str(deployment.path)]

        ports = {name: free_port() for name in ("discovery", "validator", "master", "miner")}
        while len(set(ports.values())) < len(ports):
            ports = {name: free_port() for name in ports}
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        data = {name: tmp_path / "data" / name for name in ports}

        discovery = await role_processes.start_async(
            "discovery",
            prime_command("discovery", "start", "--host", "127.0.0.1", "--port", ports["discovery"], *chain_args,
                          "--data-dir", data["discovery"], "--key-file", key["discovery"]),
            port=ports["discovery"], env=env,
        )

        # --- phase 0: preparation — the buyer puts the run on chain, naming its master -------------
        created = await prime.json(
            "buyer", "create-run", "--discovery-uri", discovery.base_url, "--master", master.address,
            "--min-cpu-cores", REQUIREMENTS.min_cpu_cores, "--min-ram-mib", REQUIREMENTS.min_ram_mib,
            "--max-nodes", REQUIREMENTS.max_nodes, *chain_args, "--key-file", key["buyer"], "--json",
        )
        run_id = int(created["run_id"])
        run = await reader.get_run(run_id)
        assert run.owner == buyer.address
        assert run.requirements == REQUIREMENTS
        assert run.discovery_uri == f"{discovery.base_url}#{discovery_key.address}"  # its signer, asked of discovery
        assert run.masters == [master.address]
        assert not run.ended and run.node_count == 0
        assert created["tx_hash"] and (await reader.get_logs(created["block"], created["block"], ["RunCreated"]))

        validator_proc, master_proc = await asyncio.gather(
            role_processes.start_async(
                "validator",
                prime_command("validator", "start", "--host", "127.0.0.1", "--port", ports["validator"], *chain_args,
                              "--key-file", key["validator"], "--data-dir", data["validator"], "--poll-interval", "0.2",
                              "--challenge-n", "64", "--challenge-timeout", "30"),
                port=ports["validator"], env=env, timeout_s=60,
            ),
            role_processes.start_async(
                "master",
                prime_command("master", "start", "--run-id", run_id, "--host", "127.0.0.1", "--port", ports["master"],
                              "--public-url", urls["master"], *chain_args, "--key-file", key["master"],
                              "--data-dir", data["master"], "--heartbeat-interval", HEARTBEAT_S, "--unhealthy-after", "3",
                              "--dead-after", "10", "--sync-interval", "1", "--poll-interval", "0.2"),
                port=ports["master"], env=env, timeout_s=60,
            ),
        )
        start_block = await reader.block_number()

        # --- phase 1: registration — the miner registers with stake and announces itself ----------
        miner_proc = await role_processes.start_async(
            "miner",
            prime_command("miner", "start", "--run-id", run_id, "--gpu", "none", "--host", "127.0.0.1",
                          "--port", ports["miner"], "--public-ip", "127.0.0.1", "--key-file", key["node"],
                          "--provider-key-file", key["provider"], *chain_args, "--data-dir", data["miner"],
                          "--task-network", "none", "--chain-poll-interval", "0.5", "--announce-interval", "5"),
            port=ports["miner"], env=env, timeout_s=90,
        )
        registered = only(await events_for(reader, start_block, "NodeRegistered", node.address), "NodeRegistered event")
        assert registered.args["runId"] == run_id and registered.args["provider"] == provider.address
        assert registered.args["stake"] == MIN_STAKE_WEI
        info = await reader.get_node(node.address)
        assert (info.run_id, info.provider, info.stake) == (run_id, provider.address, MIN_STAKE_WEI)
        assert info.specs.gpu_count == 0 and info.specs.cpu_cores >= 1
        async with SignedClient(validator, domain=Domain.of(deployment)) as as_validator:
            lookup = DiscoveryClient(as_validator, run.discovery_uri)
            record = await wait_until(lambda: lookup.get_node(node.address), timeout_s=30, what="the node in discovery")
        assert (record.ip, record.port, record.run_id) == ("127.0.0.1", ports["miner"], run_id)

        # --- phase 2: validation — challenged and approved on chain; the report is listed ---------
        validated = await wait_until(lambda: events_for(reader, start_block, "NodeValidated", node.address),
                                     timeout_s=60, what="NodeValidated for the node")
        validated = only(validated, "NodeValidated event")
        assert validated.args["approved"] is True, f"the validator rejected the node:\n{validator_proc.logs(40)}"
        assert validated.args["validator"] == validator.address and validated.args["runId"] == run_id
        reports = await prime.json("validator", "reports", "--json", "--data-dir", data["validator"])
        report = only([r for r in reports if r["node"] == node.address], "validator report of the node")
        assert report["result"] == "approved" and report["approved"] is True and report["run_id"] == run_id
        assert _hex(report["tx_hash"]) == _hex(validated.tx_hash)
        assert _hex(report["report_hash"]) == _hex(validated.args["reportHash"])
        assert report["report"]["n"] == 64

        # --- phase 3: onboarding — invited, joined on chain, heartbeating (Healthy) ---------------
        await wait_until(lambda: _status_is(reader, node.address, NodeStatus.ACTIVE), timeout_s=60, what="the node Active on chain")
        joined = only(await events_for(reader, start_block, "NodeJoined", node.address), "NodeJoined event")
        assert joined.args["master"] == master.address and joined.args["runId"] == run_id
        assert (await reader.get_run(run_id)).node_count == 1

        async with MasterClient.open(buyer, urls["master"]) as owner:
            await wait_until(lambda: _node_state(owner, node.address, "Healthy"), timeout_s=30, what="the node Healthy at the master")
            buyer_nodes = await prime.json("buyer", "nodes", "--master-url", urls["master"], "--key-file", key["buyer"], "--json")
            master_nodes = await prime.json("master", "nodes", "--master-url", urls["master"], "--key-file", key["master"], "--json")
            for seen in (buyer_nodes, master_nodes):
                entry = only([n for n in seen["nodes"] if n["address"] == node.address], "node record")
                assert entry["state"] == "Healthy" and entry["last_heartbeat"] is not None
                assert entry["url"] == urls["miner"]

            # --- phase 4: execution — tasks through the master, run by the miner in Docker -------
            task_args = ["--master-url", urls["master"], "--key-file", key["buyer"], "--json"]
            persistent, failing, sleeper = await asyncio.gather(
                prime.json("buyer", "task", "create", "--image", busybox_image, "--persistent", *task_args, "--", "sh", "-c", PERSISTENT_SCRIPT),
                prime.json("buyer", "task", "create", "--image", busybox_image, *task_args, "--", "sh", "-c", FAILING_SCRIPT),
                prime.json("buyer", "task", "create", "--image", busybox_image, *task_args, "--", "sh", "-c", SLEEPER_SCRIPT),
            )
            assert persistent["spec"]["persistent"] is True and persistent["spec"]["command"] == ["sh", "-c", PERSISTENT_SCRIPT]

            # The long task runs in a container labelled with its id, until the buyer stops it.
            await wait_until(lambda: _replica_state(owner, sleeper["id"], "Running"), timeout_s=60, what="the long task Running")
            await wait_until(lambda: task_containers(docker_client, sleeper["id"], all_states=False),
                             timeout_s=30, what="the long task's container running")
            running = only(task_containers(docker_client, sleeper["id"], all_states=False), "container of the long task")
            assert running["Labels"]["prime.node"] == node.address and running["State"] == "running"

            for task in (persistent, failing):
                await wait_until(lambda t=task: _final(owner, t["id"]), timeout_s=60, what=f"task {task['id']} to finish")

            shown = await prime.json("buyer", "task", "show", persistent["id"], *task_args)
            assert shown["state"] == "Completed", shown
            replica = only(shown["replicas"], "replica of the persistent task")
            assert (replica["state"], replica["exit_code"], replica["node"]) == ("Completed", 0, node.address)

            shown = await prime.json("buyer", "task", "show", failing["id"], *task_args)
            assert shown["state"] == "Failed", shown
            replica = only(shown["replicas"], "replica of the failing task")
            assert (replica["state"], replica["exit_code"]) == ("Failed", 7)

            text = (await prime.run("buyer", "logs", persistent["id"], "--master-url", urls["master"], "--key-file", key["buyer"])).stdout
            for line in ("e2e line one", "e2e line two", "e2e done"):
                assert line in text, f"{line!r} missing from `prime buyer logs`:\n{text}"
            printed = dict(reversed(m) for m in re.findall(r"\b([0-9a-f]{64})\s+(\S+)", text))
            assert printed.get("hello.txt") == EXPECTED_FILES["hello.txt"], text
            assert printed.get("sub/numbers.txt") == EXPECTED_FILES["sub/numbers.txt"], text
            assert "sub/random.bin" in printed, text
            failing_logs = await prime.run("buyer", "logs", failing["id"], *task_args)
            entries = [e for e in map(_json_line, failing_logs.stdout.splitlines()) if e]
            assert any(e.get("line") == "about to fail" and e.get("replica") == 0 and e.get("node") == node.address for e in entries), entries

            # Files: the master's synced copy of /data, downloaded and checked against what the task printed.
            await wait_until(lambda: _files_synced(owner, persistent["id"]), timeout_s=60, what="the persistent task's files synced")
            download = tmp_path / "download"
            listed = await prime.json("buyer", "files", persistent["id"], "--download", download, *task_args)
            assert {f["path"] for f in listed["files"]} == {"hello.txt", "sub/numbers.txt", "sub/random.bin"}
            assert (download / "hello.txt").read_bytes() == HELLO
            assert (download / "sub" / "numbers.txt").read_bytes() == NUMBERS
            assert (download / "sub" / "random.bin").stat().st_size == RANDOM_SIZE
            for path, digest in printed.items():
                assert sha256_file(download / path) == digest, f"{path}: downloaded sha256 differs from what the task printed"

            # Stop: the long task's container is removed and the task ends Stopped.
            await prime.run("buyer", "task", "stop", sleeper["id"], "--master-url", urls["master"], "--key-file", key["buyer"])
            await wait_until(lambda: not task_containers(docker_client, sleeper["id"]), timeout_s=30,
                             what="the stopped task's container to be removed")
            await wait_until(lambda: _task_state(owner, sleeper["id"], "Stopped"), timeout_s=30, what="the long task Stopped")

            # --- liveness: a stopped miner goes Unhealthy, then Dead; started again it is Healthy with
            # no second joinRun; a killed and restarted master keeps it as it was and invites nobody.
            miner_proc.stop()
            await wait_until(lambda: _node_state(owner, node.address, "Unhealthy"), timeout_s=30, what="the stopped node Unhealthy")
            await wait_until(lambda: _node_state(owner, node.address, "Dead"), timeout_s=60, what="the stopped node Dead")
            await miner_proc.start_async(timeout_s=90)
            await wait_until(lambda: _node_state(owner, node.address, "Healthy"), timeout_s=30, what="the restarted node Healthy")
            before = only([n for n in await owner.nodes() if n["address"] == node.address], "node record")
            master_proc.kill()
            await master_proc.start_async(timeout_s=60)
            after = only([n for n in await owner.nodes() if n["address"] == node.address], "node record after restart")
            assert after["state"] == "Healthy" and after["invites_sent"] == before["invites_sent"] == 1, after
            await wait_until(lambda: _node_state(owner, node.address, "Healthy"), timeout_s=30,
                             what="the node Healthy at the restarted master")
            assert len(await events_for(reader, start_block, "NodeJoined", node.address)) == 1  # joinRun once, ever
            assert await reader.node_status(node.address) == NodeStatus.ACTIVE

        assert miner_proc.running and master_proc.running and validator_proc.running and discovery.running
    finally:
        await reader.close()
        remove_containers(docker_client, node_containers(docker_client, node.address))


# --- small readers of the master's and the chain's view --------------------------------------------


async def _status_is(reader: RegistryClient, node: str, status: NodeStatus) -> bool:
    return await reader.node_status(node) == status


async def _node_state(owner: MasterClient, node: str, state: str) -> bool:
    return any(n["address"] == node and n["state"] == state for n in await owner.nodes())


async def _replica_state(owner: MasterClient, task_id: str, state: str) -> bool:
    task = await owner.get_task(task_id)
    return any(r["state"] == state for r in task["replicas"])


async def _task_state(owner: MasterClient, task_id: str, state: str) -> bool:
    return (await owner.get_task(task_id))["state"] == state


async def _final(owner: MasterClient, task_id: str) -> bool:
    return (await owner.get_task(task_id))["state"] in ("Completed", "Failed", "Stopped")


async def _files_synced(owner: MasterClient, task_id: str) -> bool:
    files = {f["path"]: f for f in await owner.files(task_id)}
    return set(files) == {"hello.txt", "sub/numbers.txt", "sub/random.bin"} and files["sub/random.bin"]["size"] == RANDOM_SIZE


def _hex(value: str | bytes) -> str:
    text = value.hex() if isinstance(value, bytes) else str(value)
    return text.lower().removeprefix("0x")


def _json_line(text: str) -> dict[str, Any] | None:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
