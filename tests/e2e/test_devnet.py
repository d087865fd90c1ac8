"""`prime devnet up` → a miner → a task readable through `prime buyer …` → `prime devnet down`
leaves nothing behind: no process of the devnet, no container of its node.

Everything is a real process started by the devnet CLI in a temporary state directory, on
free loopback ports; the buyer's commands read the devnet's env file like a user who ran
`source .devnet/env`.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

import docker
import psutil
import pytest

from tests.e2e.support import Prime, node_containers, remove_containers, wait_until
from tests.fixtures.processes import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(300)]

TASK_SCRIPT = 'echo "devnet line one"; echo "devnet line two"; printf "devnet says 42\\n" > /data/answer.txt; echo "devnet done"'
ANSWER = b"devnet says 42\n"


def read_env_file(path: Path) -> dict[str, str]:
    """The `export NAME=value` lines of the devnet's env file."""
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            values[name] = shlex.split(value)[0] if value else ""
    return values


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line or working directory mentions ``text``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status", "cwd"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(text in part for part in proc.info["cmdline"] or []) or text in (proc.info["cwd"] or ""):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


async def test_devnet_up_task_down_leaves_nothing(docker_client: docker.DockerClient, busybox_image: str, tmp_path: Path) -> None:
    state = tmp_path / "devnet"
    prime = Prime({}, cwd=tmp_path, timeout_s=180)
    anvil, discovery, validator, master, miner = distinct_ports(5)
    node = None
    downed = False
    try:
        up = await prime.json(
            "devnet", "up", "--state-dir", state, "--anvil-port", anvil, "--discovery-port", discovery,
            "--validator-port", validator, "--master-port", master, "--miner-port", miner,
            "--heartbeat-interval", "1", "--json",
        )
        node = up["node_address"]
        assert up["already_up"] is False and up["run_id"] >= 1
        assert up["services"]["master"]["port"] == master and up["rpc_url"].endswith(f":{anvil}")

        started = await prime.run("devnet", "miner", "--state-dir", state, "--background", "--task-network", "none")
        assert node in started.stdout

        # Act as the run's owner with the env file `source .devnet/env` would load.
        owner = Prime(read_env_file(state / "env"), cwd=tmp_path, timeout_s=60)
        assert owner.env["PRIME_MASTER_URL"] == f"http://127.0.0.1:{master}"

        async def healthy() -> bool:
            nodes = (await owner.json("buyer", "nodes", "--json"))["nodes"]
            return any(n["address"] == node and n["state"] == "Healthy" for n in nodes)

        await wait_until(healthy, timeout_s=120, interval_s=1.0, what="the devnet's node Healthy at its master")

        task = await owner.json("buyer", "task", "create", "--image", busybox_image, "--persistent", "--json", "--", "sh", "-c", TASK_SCRIPT)

        async def logs_complete() -> str | None:
            text = (await owner.run("buyer", "logs", task["id"])).stdout
            return text if "devnet done" in text else None

        text = await wait_until(logs_complete, timeout_s=60, interval_s=1.0, what="the task's logs through `prime buyer logs`")
        assert "devnet line one" in text and "devnet line two" in text

        async def files_synced() -> bool:
            listed = (await owner.json("buyer", "files", task["id"], "--json"))["files"]
            return any(f["path"] == "answer.txt" for f in listed)

        await wait_until(files_synced, timeout_s=60, interval_s=1.0, what="the task's files synced to the master")
        download = tmp_path / "download"
        listed = await owner.json("buyer", "files", task["id"], "--download", download, "--json")
        entry = next(f for f in listed["files"] if f["path"] == "answer.txt")
        assert entry["sha256"] == hashlib.sha256(ANSWER).hexdigest()
        assert (download / "answer.txt").read_bytes() == ANSWER
        shown = await owner.json("buyer", "task", "show", task["id"], "--json")
        assert shown["state"] == "Completed" and shown["replicas"][0]["exit_code"] == 0

        status = await prime.json("devnet", "status", "--state-dir", state, "--json")
        assert {p["name"]: p["state"] for p in status["processes"]} == {
            "anvil": "alive", "discovery": "alive", "validator": "alive", "master": "alive", "miner": "alive"}
        assert node_containers(docker_client, node), "the task's container should still be there before down"

        down = await prime.run("devnet", "down", "--state-dir", state)
        downed = True
        assert "is down" in down.stdout, down.stdout

        leftovers = processes_mentioning(str(state))
        assert not leftovers, f"processes of the devnet still running after down: {[(p.pid, p.info['cmdline']) for p in leftovers]}"
        assert not node_containers(docker_client, node), "containers of the devnet's node remain after down"
        again = await prime.json("devnet", "status", "--state-dir", state, "--json")
        assert all(p["state"] != "alive" for p in again["processes"]), again["processes"]
    finally:
        if not downed and state.exists():
            await prime.run("devnet", "down", "--state-dir", state, check=False)
        for proc in processes_mentioning(str(state)):  # only processes of this test's devnet
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if node is not None:
            remove_containers(docker_client, node_containers(docker_client, node))
