"""Start the devnet's miner (node + provider dev keys): in the foreground for `make watch-miner`,
or in the background with a pid file and a log for `demo`."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from prime.devnet.processes import ProcessRecord, child_env, is_alive, record_current_process, start_process, wait_until_healthy
from prime.devnet.state import DevnetInfo, DevnetPaths
from prime.devnet.up import ROLE_ENV, expected_services, miner_command, process_states
from prime.errors import PrimeError

AUTO = "auto"


def resolve_task_network(task_network: str) -> str | None:
    """'auto': what the local engine can give containers ('bridge', or 'none' without a bridge);
    None leaves the miner's own default when Docker cannot be asked (its preflight will say why)."""
    if task_network != AUTO:
        return task_network
    from prime.devnet.images import docker_client, task_network_mode

    try:
        client = docker_client()
    except PrimeError:
        return None
    try:
        return task_network_mode(client)
    finally:
        client.close()


def check_ready_for_miner(paths: DevnetPaths, info: DevnetInfo) -> None:
    states = process_states(paths)
    record, alive = states["miner"]
    if alive and record is not None:  # alive means its pid file record names a live process
        raise PrimeError(f"A miner of this devnet is already running (pid {record.pid}); stop it with Ctrl-C in its terminal or `prime devnet down`.")
    dead = [name for name in expected_services(info) if not states[name][1]]
    if dead:
        raise PrimeError(f"The devnet in {paths.root} is not up ({', '.join(dead)} not running); run `prime devnet up` (make up) first.")


def exec_foreground(paths: DevnetPaths, info: DevnetInfo, *, gpu: str, task_network: str, task_ports: str | None = None) -> NoReturn:
    """Replace this process with `prime miner start …`: Ctrl-C reaches the miner directly, and the
    pid file names this pid, so `devnet down` can stop it from another terminal."""
    check_ready_for_miner(paths, info)
    argv = miner_command(info, paths, gpu=gpu, task_network=resolve_task_network(task_network), task_ports=task_ports)
    env = child_env(paths, ROLE_ENV)
    record_current_process(paths, "miner", argv, port=info.services["miner"].port, url=info.url("miner"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
    raise AssertionError("unreachable")  # execve does not return


def start_background(paths: DevnetPaths, info: DevnetInfo, *, gpu: str, task_network: str, timeout_s: float = 120.0,
                     task_ports: str | None = None) -> tuple[ProcessRecord, bool]:
    """(record, started_now): the running miner, started now unless one already runs."""
    existing = ProcessRecord.load(paths, "miner")
    if is_alive(existing):
        return existing, False
    check_ready_for_miner(paths, info)
    argv = miner_command(info, paths, gpu=gpu, task_network=resolve_task_network(task_network), task_ports=task_ports)
    record = start_process(paths, "miner", argv, env=child_env(paths, ROLE_ENV), port=info.services["miner"].port, url=info.url("miner"))
    wait_until_healthy(record, f"{record.url}/health", timeout_s=timeout_s, what="miner")
    return record, True
