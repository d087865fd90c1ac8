"""The remote crash of issue 11, against a real `prime master start` process on loopback.

Server side: a signed body of ~200 KB nested 100,000 deep (from a key with no role, and from the run's
owner) used to kill the process (SIGSEGV: py_ecc's recursion limit let the JSON decoder
overflow the C stack). Now each is a 4xx JSON answer and the process keeps answering /health
and signed requests, with its task list unchanged. Client side: a node answering the master's
invite with such a body is one failed invite of that node; the master lives on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account

from prime.auth.signing import Domain
from tests.fixtures.processes import RoleProcesses
from tests.roles.master.fake_miner import FakeMiner, eventually, make_world
from tests.support.signing import signed

pytestmark = pytest.mark.e2e

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
BODIES = [DEEP, DEEP_OBJECT, b'{"load": ' + DEEP + b"}", b'{"tasks": ' + DEEP + b"}", b'{"image": "a", "env": ' + DEEP + b"}"]


async def send(url: str, account: Any, method: str, path: str, body: bytes, *, to: str, domain: Domain) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **signed(account, method, path, body, to=to, domain=domain)}
    async with aiohttp.ClientSession() as session, session.request(method, url + path, data=body, headers=headers) as answer:
        return answer.status, await answer.json(content_type=None)


async def test_a_real_master_survives_100000_deep_bodies(anvil, deployment, role_processes: RoleProcesses,
                                                         tmp_path: Path) -> None:
    world = await make_world(anvil, deployment, role_processes, tmp_path)
    try:
        master, to, domain = world.master, world.master_account.address, Domain.of(deployment)
        status, before = await send(master.base_url, world.owner, "GET", "/tasks", b"", to=to, domain=domain)
        assert status == 200, before
        stranger = Account.create()
        for body in BODIES:
            for account, path in ((stranger, "/heartbeat"), (world.owner, "/tasks"), (stranger, "/tasks")):
                status, answer = await send(master.base_url, account, "POST", path, body, to=to, domain=domain)
                assert 400 <= status < 500 and set(answer) == {"error", "detail"}, (path, status, answer)
                assert master.running, master.logs(tail_lines=40)
        async with aiohttp.ClientSession() as session, session.get(master.base_url + "/health") as health:
            assert health.status == 200
        status, after = await send(master.base_url, world.owner, "GET", "/tasks", b"", to=to, domain=domain)
        assert status == 200 and after == before
        assert "Segmentation" not in master.logs() and "Traceback" not in master.logs()
    finally:
        await world.close()


class DeepAnsweringMiner(FakeMiner):
    """A registered node whose (signed) answer to the master's invite is 100,000 levels deep."""

    async def _invite(self, request: web.Request) -> web.Response:
        self.received.invites.append({"deep": True})
        return web.Response(body=DEEP, content_type="application/json")


async def test_a_real_master_survives_a_miners_100000_deep_answer(anvil, deployment, role_processes: RoleProcesses,
                                                                  tmp_path: Path) -> None:
    """The client side: the master reads a node's answer (SignedClient's JSON parse) and must
    count it as that node's failed invite, not die of it."""
    world = await make_world(anvil, deployment, role_processes, tmp_path)
    try:
        node, provider = Account.create(), Account.create()
        anvil.set_balance(provider.address, 10 * 10**18)
        miner = await DeepAnsweringMiner(node, provider, world.run_id, world.rpc_url, world.deployment).start()
        world.miners.append(miner)
        await miner.register_and_announce(world.validator_client, world.discovery_uri)

        async def failed_invite() -> dict[str, Any] | None:
            record = (await world.nodes()).get(node.address)
            return record if record and record["invite_failures"] >= 1 else None

        record = await eventually(failed_invite, timeout_s=60, what="the master to count the deep answer as a failed invite")
        assert miner.received.invites, "the master never invited the node"
        assert record["state"] == "Approved" and record["last_error"], record
        assert world.master.running, world.master.logs(tail_lines=40)
        async with aiohttp.ClientSession() as session, session.get(world.master.base_url + "/health") as health:
            assert health.status == 200
        assert "Segmentation" not in world.master.logs()
    finally:
        await world.close()
