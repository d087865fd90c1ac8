"""Real aiohttp servers on loopback for the auth tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from eth_account import Account
from eth_account.signers.local import LocalAccount


@pytest_asyncio.fixture(loop_scope="session")
async def serve() -> AsyncIterator[Callable[[web.Application], Awaitable[TestServer]]]:
    """``server = await serve(app)``: the app listening on 127.0.0.1; stopped after the test."""
    servers: list[TestServer] = []

    async def start(app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def alice() -> LocalAccount:
    return Account.create()


@pytest.fixture
def mallory() -> LocalAccount:
    return Account.create()
