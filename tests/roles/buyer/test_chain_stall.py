"""The owner API through a chain stall: a real master on its own anvil, SIGSTOPped for 40 s.

`prime buyer tasks` and `prime buyer logs` keep answering within seconds (permissions from the
last known chain state), the master's /health names the chain as the dependency that is down,
and everything is fresh again once the chain returns.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from prime.auth.permissions import ChainPermissions
from tests.fixtures.processes import RoleProcesses
from tests.roles.buyer.conftest import KEY_PASSWORD, arun_prime
from tests.roles.buyer.real_master import start_real_master
from tests.roles.master.fake_miner import eventually
from tests.support.stalled_chain import own_chain, stalled

pytestmark = [pytest.mark.e2e]

STALL_S = 40.0  # longer than the master's RPC timeout (30 s): its chain loop fails meanwhile


class _MinerChecks:
    """The fake node's chain view with its master check cached like a real miner's (ChainPermissions):
    the node a master asks for logs checks the master's right, and that too must survive the stall."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self._permissions = ChainPermissions(registry)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)

    async def is_master(self, run_id: int, address: str) -> bool:
        return await self._permissions.is_master(run_id, address)


def _health(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 503 (a loop stale) still has the body
        return json.loads(exc.read())


async def test_tasks_and_logs_keep_answering_while_the_chain_is_stalled(role_processes: RoleProcesses, key_file_for, tmp_path: Path):
    async with own_chain(tmp_path) as (chain, deployment):
        world = await start_real_master(chain, deployment, role_processes, tmp_path)
        try:
            env = {"PRIME_MASTER_URL": world.url, "PRIME_KEY_FILE": str(key_file_for(world.owner)), "PRIME_KEY_PASSWORD": KEY_PASSWORD}
            task = await world.create({"image": "busybox"})
            await world.wait_states(task["id"], ["Assigned"])
            world.node.report(task["id"], 0, "Running")
            world.node.logs[(task["id"], 0)] = [{"stream": "stdout", "line": "still here", "ts": 1.0}]
            world.node._chain = _MinerChecks(world.node._chain)
            for warm in (("buyer", "tasks"), ("buyer", "logs", task["id"])):  # the rights involved are known
                assert (await arun_prime(*warm, env=env)).returncode == 0

            with stalled(chain):
                stalled_at = time.monotonic()
                rounds = 0
                while time.monotonic() - stalled_at < STALL_S:
                    for command in (("buyer", "tasks"), ("buyer", "logs", task["id"])):
                        started = time.monotonic()
                        result = await arun_prime(*command, env=env, timeout=30)
                        took = time.monotonic() - started
                        assert result.returncode == 0, (command, result.stderr)
                        assert took < 10, (command, took)
                        if command[1] == "tasks":
                            assert task["id"] in result.stdout
                        else:
                            assert "still here" in result.stdout
                    rounds += 1
                health = _health(world.url)
                chain_dependency = health["dependencies"]["chain"]
                assert chain_dependency["ok"] is False and "loop:chain" in chain_dependency["reporters"], health
            assert rounds >= 3

            async def chain_back() -> bool:
                return _health(world.url)["dependencies"]["chain"]["ok"] is True

            await eventually(chain_back, timeout_s=60, what="the chain dependency ok again")
            assert (await arun_prime("buyer", "tasks", env=env)).returncode == 0
            assert "last known chain state" in world.master.logs()
        finally:
            await world.close()
