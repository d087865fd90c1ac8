"""`prime devnet up|status|logs|miner|down` as a person runs them: real processes, real anvil,
real role services, real Docker; `down` leaves nothing of the devnet alive and nothing else touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import docker.errors
import psutil
import pytest
from eth_account import Account

from prime.chain.client import RegistryClient
from prime.devnet.keys import dev_account
from prime.devnet.processes import ProcessRecord, is_alive, scan_processes_mentioning
from prime.devnet.state import DevnetPaths
from tests.fixtures.processes import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


def prime(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    env["COLUMNS"] = "200"
    return subprocess.run([sys.executable, "-m", "prime.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def port_args() -> list[str]:
    # Explicit free ports: other suites on this machine may hold the defaults (8545, 8090...).
    args = []
    for name in ("anvil", "discovery", "validator", "master", "miner"):
        args += [f"--{name}-port", str(free_port())]
    return args


def alive_pids(paths: DevnetPaths) -> dict[str, int]:
    pids = {}
    for name in ("anvil", "discovery", "validator", "master", "miner"):
        record = ProcessRecord.load(paths, name)
        if is_alive(record):
            pids[name] = record.pid
    return pids


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


async def test_up_twice_status_logs_miner_down(tmp_path: Path, docker_client, busybox_image):
    state = tmp_path / "devnet"
    paths = DevnetPaths.at(state)
    other_node = Account.create().address
    containers = []
    foreground_miner: subprocess.Popen | None = None
    try:
        # --- up ---------------------------------------------------------------------------
        first = prime("devnet", "up", "--state-dir", str(state), "--json", *port_args())
        assert first.returncode == 0, first.stderr + first.stdout
        info = json.loads(first.stdout)
        assert info["already_up"] is False
        pids = alive_pids(paths)
        assert set(pids) == {"anvil", "discovery", "validator", "master"}
        for name in ("discovery", "validator", "master"):
            with urllib.request.urlopen(info["services"][name]["url"] + "/health", timeout=5) as answer:
                assert answer.status == 200

        # The chain as `up` left it: a run owned by the owner key, with the master and discovery.
        async with await RegistryClient.connect(info["rpc_url"], info["deployment"]) as chain:
            run = await chain.get_run(info["run_id"])
            assert run.owner == dev_account("owner").address
            assert run.masters == [dev_account("master").address]
            # the discovery URI names the key discovery signs its answers with
            assert run.discovery_uri == f"{info['services']['discovery']['url']}#{dev_account('discovery').address}"
            assert await chain.is_validator(dev_account("validator").address)
        env_file = (state / "env").read_text()
        assert f"PRIME_MASTER_URL={info['services']['master']['url']}" in env_file

        # --- up again: says so, changes nothing ------------------------------------------------
        saved = paths.info.read_bytes()
        second = prime("devnet", "up", "--state-dir", str(state))
        assert second.returncode == 0, second.stderr
        assert "is already up" in second.stdout and "nothing was changed" in second.stdout
        assert paths.info.read_bytes() == saved
        assert alive_pids(paths) == pids

        # --- status and logs ------------------------------------------------------------------
        status = prime("devnet", "status", "--state-dir", str(state), "--json")
        rows = {row["name"]: row for row in json.loads(status.stdout)["processes"]}
        assert {n: r["state"] for n, r in rows.items()} == {
            "anvil": "alive", "discovery": "alive", "validator": "alive", "master": "alive", "miner": "not started",
        }
        assert rows["master"]["pid"] == pids["master"]
        table = prime("devnet", "status", "--state-dir", str(state))
        assert "alive" in table.stdout and info["services"]["master"]["url"] in table.stdout
        logs = prime("devnet", "logs", "master", "--tail", "5", "--state-dir", str(state))
        assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr

        # --- the foreground miner of `make watch-miner`: same pid after exec, stopped by `down`
        foreground_miner = subprocess.Popen(
            [sys.executable, "-m", "prime.cli", "devnet", "miner", "--state-dir", str(state), "--task-network", "none"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.startswith("PRIME_")},
        )
        wait_for(lambda: is_alive(ProcessRecord.load(paths, "miner")), 60, "the miner's pid file")
        assert ProcessRecord.load(paths, "miner").pid == foreground_miner.pid
        wait_for(lambda: _healthy(info["services"]["miner"]["url"]), 60, "the miner's /health")
        again = prime("devnet", "miner", "--state-dir", str(state))
        assert again.returncode != 0 and "already running" in again.stderr and "Traceback" not in again.stderr

        assert scan_processes_mentioning(str(paths.root))

        # --- down: every process of the devnet, the foreground miner included ---------------------
        down = prime("devnet", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr + down.stdout
        assert "is down" in down.stdout
        foreground_miner.wait(15)
        for pid in [*pids.values(), foreground_miner.pid]:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
        assert scan_processes_mentioning(str(paths.root)) == []

        # --- task containers of this devnet's node go with `down` (a miner stopped with Ctrl-C
        # leaves its containers running); containers of any other node stay -------------------------
        for node in (info["node_address"], other_node):
            containers.append(docker_client.containers.run(
                busybox_image, ["sleep", "300"], detach=True, network_mode="none",
                labels={"prime.node": node, "prime.task_id": "devnet-test"},
            ))
        down_again = prime("devnet", "down", "--state-dir", str(state))
        assert down_again.returncode == 0, down_again.stderr
        assert "removed 1 task container" in down_again.stdout
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(containers[0].id)
        assert docker_client.containers.get(containers[1].id).status == "running"

        after = prime("devnet", "status", "--state-dir", str(state), "--json")
        assert {r["name"]: r["state"] for r in json.loads(after.stdout)["processes"]}["master"] == "stopped"
    finally:
        if foreground_miner is not None and foreground_miner.poll() is None:
            foreground_miner.kill()
        prime("devnet", "down", "--state-dir", str(state))
        for container in containers:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_commands_without_a_devnet_are_one_sentence(tmp_path: Path):
    for args in (("status",), ("logs",), ("miner",)):
        result = prime("devnet", *args, "--state-dir", str(tmp_path / "none"))
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    nothing = prime("devnet", "down", "--state-dir", str(tmp_path / "none"))
    assert nothing.returncode == 0 and "nothing to stop" in nothing.stdout
    bad_skip = prime("devnet", "up", "--state-dir", str(tmp_path / "x"), "--skip", "anvil")
    assert bad_skip.returncode != 0 and "--skip anvil is not a devnet service" in bad_skip.stderr
