"""The buyer's MasterClient against the master's real app in this process, over InProcessTransport.

No process, no chain: the app is the one tests/web/roles.py builds with the master's own
``new_app``/``add_routes`` and a real ``MasterService`` (permissions stubbed: OWNER owns the
run). Every call is signed by the client and checked by the master's signature middleware and
owner guard, so this is the quick check of the same wire the process tests in
test_master_commands.py drive through the CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account

from prime.auth.transport import InProcessTransport
from prime.errors import PrimeError
from prime.roles.buyer.master_client import (
    MasterClient,
    MasterRefused,
    MasterUnreachable,
)
from tests.web.roles import DOMAIN, MASTER, NODE, OWNER, close_all, master_app, miner_app, serve_app

MASTER_URL = "http://master.test:8092"


@pytest.fixture
async def transport(tmp_path: Path):
    miner, _executor, converger = miner_app(tmp_path)
    miner_served = await serve_app("miner", miner)  # the master's log merger reads the miner over loopback
    app, service, closers = master_app(tmp_path, miner_served.url)
    transport = InProcessTransport({"master.test:8092": app})
    transport.service = service  # type: ignore[attr-defined]
    try:
        yield transport
    finally:
        await transport.close()
        await miner_served.server.close()
        await converger.close()
        await close_all(closers)


async def test_owner_calls_reach_the_real_routes(transport) -> None:
    async with MasterClient.open(OWNER, MASTER_URL, transport=transport) as master:
        assert master.base_url == MASTER_URL
        created = await master.create_task({"image": "busybox:latest", "command": ["sh", "-c", "echo hi"], "replicas": 2})
        assert created["spec"]["command"] == ["sh", "-c", "echo hi"]
        assert transport.service.task(created["id"]) is not None  # in the real service's state
        assert [t["id"] for t in await master.list_tasks()] == [created["id"]]
        assert (await master.get_task(created["id"]))["replicas"][1]["state"] == "Pending"
        assert await master.nodes() == []
        stopped = await master.stop_task(created["id"])
        assert stopped is not None and stopped["stop_requested"]


async def test_refusals_are_one_sentence(transport) -> None:
    stranger = Account.create()
    async with MasterClient.open(stranger, MASTER_URL, transport=transport) as master:
        with pytest.raises(MasterRefused, match=f"{stranger.address} is not the owner of its run"):
            await master.list_tasks()
    async with MasterClient.open(OWNER, MASTER_URL, transport=transport) as master:
        with pytest.raises(PrimeError, match="The master refused to create the task: image: "):
            await master.create_task({"image": ""})
        with pytest.raises(PrimeError, match="cannot read task nosuchtask"):
            await master.get_task("nosuchtask")
    async with MasterClient.open(OWNER, "http://elsewhere.test:1", transport=transport, retries=0) as master:
        with pytest.raises(MasterUnreachable, match="Cannot reach the master at http://elsewhere.test:1"):
            await master.nodes()


async def test_a_node_heartbeat_then_the_owner_sees_it(transport) -> None:
    from prime.auth.client import SignedClient

    beat = {"tasks": [], "gpus": [{"index": 0, "util": 10.0, "mem_used_mib": 100, "temp_c": 40.0}], "load": {"cpu": 0.5}}
    async with SignedClient(NODE, domain=DOMAIN, transport=transport) as node:
        answer = await node.request("POST", f"{MASTER_URL}/heartbeat", audience=MASTER.address, json=beat)
    assert "desired" in answer
    async with MasterClient.open(OWNER, MASTER_URL, transport=transport) as master:
        assert [n["address"] for n in await master.nodes()] == [NODE.address]
