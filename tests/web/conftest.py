from __future__ import annotations

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer


@pytest_asyncio.fixture(loop_scope="session")
async def start():
    servers: list[TestServer] = []

    async def run(app: web.Application) -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield run
    for server in servers:
        await server.close()
