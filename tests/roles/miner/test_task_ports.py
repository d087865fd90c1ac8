"""``prime miner start --task-ports FIRST-LAST`` (issue 15): parsed and refused in one sentence, every
port checked free at start (but those the miner's own running members hold), and carried in heartbeats."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from rich.console import Console
from typer.testing import CliRunner

from prime.errors import ConfigError, PrimeError
from prime.protocol.heartbeat import HeartbeatRequest
from prime.roles.miner.node import MinerNode, build_task_runtime
from prime.roles.miner.preflight import MAX_TASK_PORTS, check_task_ports, parse_task_ports, task_ports_preflight
from prime.roles.miner.state import MinerState, MinerStore, StateFile
from prime.web import LoopHealth
from tests.fixtures.processes import _child_env, free_port, prime_command
from tests.support.miner_env import (
    MemoryExecutor,
    MemoryMaster,
    free_port_range,
    miner_args,
    miner_env,
    node_options,
    write_keystore,
)

# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(("text", "expected"), [
    (None, None), ("", None), ("29500-29509", (29500, 29509)), (" 29500 - 29501 ", (29500, 29501)),
    ("1-2", (1, 2)), ("65534-65535", (65534, 65535)), (f"1000-{1000 + MAX_TASK_PORTS - 1}", (1000, 1000 + MAX_TASK_PORTS - 1)),
])
def test_task_ports_parse(text: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_task_ports(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("29500", "is not a port range; write FIRST-LAST"),
    ("a-b", "is not a port range"),
    ("29500-29509-1", "is not a port range"),
    ("-5-10", "is not a port range"),
    ("1.5-10", "is not a port range"),
    ("²-5", "is not a port range"),
    ("0-10", "1 <= FIRST <= LAST <= 65535"),
    ("29509-29500", "1 <= FIRST <= LAST <= 65535"),
    ("65535-65536", "1 <= FIRST <= LAST <= 65535"),
    ("29500-29500", "holds 1 port(s); a group member needs 2"),
    ("1000-2024", "holds 1025 ports; give at most 1024"),
])
def test_bad_task_ports_are_one_sentence(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_task_ports(text)
    assert says in refused.value.message and "--task-ports" in refused.value.message
    assert refused.value.message.count(". ") == 0 and refused.value.message.endswith(".")


def test_the_cli_shows_and_checks_the_flag(tmp_path: Path) -> None:
    from prime.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["miner", "start", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "--task-ports" in shown.output and "PRIME_TASK_PORTS" in shown.output
    deployment = tmp_path / "deployment.json"
    deployment.write_text("{}")
    for argv, env in ((["--task-ports", "29500"], {}), ([], {"PRIME_TASK_PORTS": "70000-70010"})):
        refused = runner.invoke(
            app, ["miner", "start", "--run-id", "1", "--deployment", str(deployment), "--data-dir", str(tmp_path / "d"), *argv], env=env
        )
        assert refused.exit_code != 0
        assert isinstance(refused.exception, ConfigError) and "--task-ports" in str(refused.exception)


def test_prime_refuses_a_bad_range_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    key_file = write_keystore(tmp_path / "node.json", Account.create())
    command = prime_command("miner", "start", *miner_args(
        run_id=1, port=free_port(), key_file=key_file, data_dir=tmp_path / "miner", anvil=_NoAnvil(), deployment=_NoDeployment(tmp_path),
    ))
    done = subprocess.run(command, check=False, env=_child_env({**miner_env(tmp_path / "home"), "PRIME_TASK_PORTS": "29509-29500"}),
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "--task-ports '29509-29500'" in lines[0]


class _NoAnvil:
    rpc_url = "http://127.0.0.1:9"  # nothing listens: never reached


class _NoDeployment:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "no-deployment.json"


def test_miner_args_pass_task_ports(tmp_path: Path) -> None:
    args = miner_args(run_id=1, port=1, key_file=tmp_path, data_dir=tmp_path, anvil=_NoAnvil(), deployment=_NoDeployment(tmp_path),
                      task_ports=(29500, 29509))
    assert args[args.index("--task-ports") + 1] == "29500-29509"
    assert "--task-ports" not in miner_args(run_id=1, port=1, key_file=tmp_path, data_dir=tmp_path, anvil=_NoAnvil(),
                                            deployment=_NoDeployment(tmp_path))


# ---------------------------------------------------------------- preflight


def _listener(port: int, host: str = "0.0.0.0") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: the check must still see it
    sock.bind((host, port))
    sock.listen(1)
    return sock


@pytest.mark.parametrize(("bound_on", "miner_host"), [("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "0.0.0.0")])
def test_a_busy_task_port_is_refused_by_name(bound_on: str, miner_host: str) -> None:
    first, last = free_port_range(6)
    assert check_task_ports((first, last), miner_host, free_port()) is None
    with _listener(first + 3, bound_on):
        assert check_task_ports((first, last), miner_host, free_port()) == \
            f"Port {first + 3} of --task-ports {first}-{last} is in use; free it or choose another range."
        # Held by this miner's own running member (a restart that adopts it): not refused.
        assert check_task_ports((first, last), miner_host, free_port(), held={first + 3}) is None
    assert check_task_ports((first, last), miner_host) is None  # closed at once: nothing left bound


def test_a_bound_but_not_listening_socket_counts_as_busy() -> None:
    first, last = free_port_range(2)
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", last))
        assert check_task_ports((first, last)) == f"Port {last} of --task-ports {first}-{last} is in use; free it or choose another range."


def test_a_closed_connection_in_time_wait_does_not_hold_the_range() -> None:
    first, last = free_port_range(2)
    server = _listener(first, "127.0.0.1")
    client = socket.create_connection(("127.0.0.1", first))
    accepted, _ = server.accept()
    accepted.close()  # the member's side closes first: its port's connection waits in TIME_WAIT
    client.close()
    server.close()
    assert check_task_ports((first, last)) is None


def test_the_miners_own_port_must_lie_outside_the_range() -> None:
    assert check_task_ports((29500, 29509), "127.0.0.1", 29505) == \
        "The miner's own --port 29505 lies inside --task-ports 29500-29509; choose a port or a range that do not overlap."


async def test_the_start_check_asks_the_executor_for_its_members_ports() -> None:
    first, last = free_port_range(4)

    class Holding(MemoryExecutor):
        async def held_ports(self) -> set[int]:
            return {first}

    assert await task_ports_preflight(Holding(), None, "127.0.0.1", free_port()) is None
    with _listener(first):
        assert await task_ports_preflight(Holding(), (first, last), "127.0.0.1", free_port()) is None
        assert "Port %d of" % first in (await task_ports_preflight(MemoryExecutor(), (first, last), "127.0.0.1", free_port()) or "")


@pytest.mark.docker
async def test_a_starting_miner_refuses_a_busy_task_port_before_any_stake(anvil: Any, deployment: Any, tmp_path: Path) -> None:
    first, last = free_port_range(4)
    options = node_options(anvil, deployment, 1, tmp_path / "miner", task_ports=(first, last))
    node = MinerNode(options, Account.create(), console=Console(file=io.StringIO(), width=200))
    try:
        with _listener(first + 1), pytest.raises(PrimeError) as refused:
            await node.prepare()
    finally:
        await node.close()
    assert refused.value.message == f"Port {first + 1} of --task-ports {first}-{last} is in use; free it or choose another range."
    assert node.registration_tx is None


# ---------------------------------------------------------------- heartbeats


@pytest.mark.parametrize("task_ports", [(29500, 29509), None])
async def test_heartbeats_carry_the_task_ports(tmp_path: Path, task_ports: tuple[int, int] | None) -> None:
    master = MemoryMaster()
    store = MinerStore(StateFile(tmp_path), MinerState(node="0x" + "11" * 20, run_id=1, master_url="http://master.invalid",
                                                       master="0x" + "22" * 20))
    runtime = build_task_runtime(MemoryExecutor(tmp_path), store, master, [], LoopHealth(), task_ports=task_ports)
    runtime.heartbeat.active = True
    assert runtime.converger.task_ports == task_ports
    await runtime.heartbeat.beat()
    (body,) = master.heartbeats
    assert HeartbeatRequest.from_json(body).task_ports == task_ports  # the master's own strict parser
    assert body.get("task_ports") == (None if task_ports is None else list(task_ports))
    assert ("task_ports" in body) == (task_ports is not None)  # an ordinary node's beat reads as before
    await runtime.converger.close()
    await asyncio.sleep(0)
