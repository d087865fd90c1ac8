"""The discovery app in-process, with a stub in place of the chain permissions (unit test of app.py):
the order of checks, what a chain outage answers, and the record's timestamps. Signatures are real."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from eth_account import Account

from prime.errors import ChainError
from prime.roles.discovery.app import build_app
from prime.roles.discovery.store import DiscoveryStore
from tests.support.signing import signed, signed_service

NODE = Account.create()
MASTER = Account.create()
VALIDATOR = Account.create()
STRANGER = Account.create()
RUN = 7


DISCOVERY = Account.create()  # the service's own key


class StubPermissions:
    """NODE is registered for RUN, MASTER masters RUN, VALIDATOR validates; ``down`` simulates an RPC outage."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.down = False

    def _ask(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise ChainError("The chain RPC at http://127.0.0.1:1 is unreachable; check --rpc-url.")

    async def is_validator(self, addr: str) -> bool:
        self._ask("is_validator")
        return addr == VALIDATOR.address

    async def is_master(self, run_id: int, addr: str) -> bool:
        self._ask("is_master")
        return run_id == RUN and addr == MASTER.address

    async def is_registered_node(self, run_id: int, addr: str) -> bool:
        self._ask("is_registered_node")
        return run_id == RUN and addr == NODE.address

    async def node_run_id(self, addr: str) -> int | None:
        self._ask("node_run_id")
        return RUN if addr == NODE.address else None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[str, StubPermissions, Clock, DiscoveryStore]]:
    permissions, clock, store = StubPermissions(), Clock(), DiscoveryStore.open(tmp_path)
    server = TestServer(build_app(store, permissions, signed_service(DISCOVERY), clock=clock), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), permissions, clock, store
    finally:
        await server.close()
        store.close()


async def send(url: str, account: Any, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    body = b"" if payload is None else json.dumps(payload).encode()
    headers = {**signed(account, method, path, body, to=DISCOVERY.address), "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session, session.request(method, url + path, data=body, headers=headers) as answer:
        return answer.status, await answer.json(content_type=None)


async def test_bad_input_is_refused_before_the_chain_is_asked(service) -> None:
    url, permissions, _, store = service
    status, answer = await send(url, STRANGER, "PUT", "/nodes", {"ip": "1.2.3.4", "port": 0, "run_id": RUN})
    assert status == 400 and "port" in json.dumps(answer["detail"])
    status, _ = await send(url, STRANGER, "GET", "/nodes/0xnope")
    assert status == 400
    assert permissions.calls == [] and store.count() == 0


async def test_reannounce_updates_the_record_and_its_time(service) -> None:
    url, _, clock, store = service
    status, first = await send(url, NODE, "PUT", "/nodes", {"ip": "10.0.0.1", "port": 8001, "run_id": RUN})
    assert status == 200 and first["updated_at"] == 1000.0
    clock.now = 1060.0
    status, second = await send(url, NODE, "PUT", "/nodes", {"ip": "10.0.0.2", "port": 8002, "run_id": RUN})
    assert status == 200
    assert (second["ip"], second["port"], second["updated_at"]) == ("10.0.0.2", 8002, 1060.0)
    assert store.count() == 1
    status, read = await send(url, VALIDATOR, "GET", f"/nodes/{NODE.address}")
    assert status == 200 and read == second


async def test_unknown_node_is_404_for_its_runs_master_and_403_for_strangers(service) -> None:
    url, *_ = service
    assert (await send(url, MASTER, "GET", f"/nodes/{NODE.address}"))[0] == 404
    assert (await send(url, VALIDATOR, "GET", f"/nodes/{STRANGER.address}"))[0] == 404
    assert (await send(url, STRANGER, "GET", f"/nodes/{NODE.address}"))[0] == 403
    # a node the chain does not know has no run, so no master may read it
    assert (await send(url, MASTER, "GET", f"/nodes/{STRANGER.address}"))[0] == 403


async def test_chain_outage_answers_503_and_stores_nothing(service) -> None:
    url, permissions, _, store = service
    permissions.down = True
    status, answer = await send(url, NODE, "PUT", "/nodes", {"ip": "10.0.0.1", "port": 8001, "run_id": RUN})
    assert status == 503 and answer["error"] == "chain_unavailable" and "unreachable" in answer["detail"]
    assert store.count() == 0
    assert (await send(url, MASTER, "GET", f"/runs/{RUN}/nodes"))[0] == 503
