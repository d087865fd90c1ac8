"""A miner closes the connections to the Docker engine it opened, and only those.

Every in-process miner of the test suite used to leave its engine client open (a pool of unix
sockets each), and a followed stream (engine events, logs) kept its connection for as long as its
response object lived: real engine, real miner (MinerNode) on a real anvil.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

import docker
import psutil
import pytest

from prime.roles.miner.executor import DockerExecutor
from tests.support.miner_env import create_run, running_node

pytestmark = [pytest.mark.docker]


def engine_sockets() -> int:
    """This process's connections to the Docker engine: its unix sockets whose peer (SO_PEERCRED) is
    dockerd. Socket pairs of its own event loops have itself as the peer and do not count."""
    count = 0
    for conn in psutil.Process().net_connections(kind="unix"):
        with contextlib.suppress(OSError, psutil.Error):
            with socket.fromfd(conn.fd, socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a dup, closed here
                cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            peer = struct.unpack("3i", cred)[0]
            if peer > 0 and psutil.Process(peer).name() == "dockerd":
                count += 1
    return count


async def test_an_executor_closes_the_client_it_made(docker_client: docker.DockerClient, docker_node_address: str,
                                                     tmp_path: Path) -> None:
    before = engine_sockets()
    made = DockerExecutor(None, tmp_path / "made", docker_node_address, network_mode="none")
    assert await made.snapshot() == []
    assert engine_sockets() > before
    await made.close()
    assert engine_sockets() == before
    await made.close()  # twice is harmless
    assert await made.snapshot() == []  # and a later call connects again
    await made.close()
    assert engine_sockets() == before


async def test_an_executor_leaves_a_client_it_was_given_open(docker_client: docker.DockerClient, docker_node_address: str,
                                                             tmp_path: Path) -> None:
    given = DockerExecutor(docker_client, tmp_path / "given", docker_node_address, network_mode="none")
    await given.snapshot()
    await given.close()
    assert docker_client.ping()  # still the giver's, still open
    assert await given.snapshot() == []


async def test_a_closed_miner_holds_no_connection_to_the_engine(anvil, deployment, chain_client, discovery, fresh_account,
                                                                tmp_path: Path) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    before = engine_sockets()
    async with running_node(anvil, deployment, run_id, fresh_account(), tmp_path / "miner") as miner:
        await miner.executor.snapshot()
        assert engine_sockets() > before
    assert engine_sockets() == before
