"""A real validator process against registered miners whose challenge answers are hostile (issue 11).

Each miner is the real challenge service behind the real signed-request middleware (answers
signed by the node key), with its answer to POST /challenge or /open replaced: nested too
deeply, a 401-digit ``elapsed_s``, padded towards 1 GiB (streamed, so the test allocates
nothing). Each node must be judged and rejected on chain for its answer ("response check
failed"), never crash the validator nor be deferred as the validator's own fault; the
validator keeps answering /health and judging the next node.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from prime.auth.middleware import signed_request_middleware
from prime.chain.types import NodeStatus
from prime.challenge.prover import MatmulProver, NumpyBackend
from prime.challenge.service import add_challenge_routes
from prime.web import bound_port, make_app, serve
from tests.fixtures.processes import RoleProcesses
from tests.roles.validator.conftest import World
from tests.roles.validator.support import (
    InProcessMiner,
    announce,
    by_node,
    domain_of_world,
    new_node,
    register,
    reports,
    wait_validated,
)
from tests.roles.validator.test_service import start_validator

pytestmark = pytest.mark.e2e

GIB = 1 << 30
CHUNK = 1 << 20
Rewrite = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


class HostileMiner(InProcessMiner):
    """The real challenge routes; ``rewrite`` replaces the honest answer to ``path_end``."""

    def __init__(self, node, permissions, path_end: str, rewrite: Rewrite) -> None:
        super().__init__(node, MatmulProver(NumpyBackend()), permissions)
        self.path_end = path_end
        self.rewrite = rewrite
        self.streamed = 0  # bytes of a padded answer that got onto the wire

    async def start(self) -> HostileMiner:
        app = make_app(name="hostile-miner", middlewares=[signed_request_middleware(self.node, domain_of_world())])
        add_challenge_routes(app, self.service, self._guard)

        @web.middleware
        async def replace(request: web.Request, handler) -> web.StreamResponse:
            answer = await handler(request)
            if request.path.endswith(self.path_end) and answer.status == 200 and isinstance(answer, web.Response):
                assert isinstance(answer.body, bytes)
                return await self.rewrite(request, answer.body)
            return answer

        app.middlewares.append(replace)  # inside the signing middleware: what it answers is signed
        self._runner = await serve(app, host="127.0.0.1", port=0)
        self.port = bound_port(self._runner)
        return self


def whole(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


async def deep(request: web.Request, honest: bytes) -> web.StreamResponse:
    return whole(b"[" * 100_000 + b"]" * 100_000)  # ~200 KB, what killed the validator


async def deep_within_the_limit(request: web.Request, honest: bytes) -> web.StreamResponse:
    return whole(b'{"id": ' + b"[" * 1500 + b"]" * 1500 + b"}")  # < 4096 bytes: it gets parsed


async def huge_elapsed(request: web.Request, honest: bytes) -> web.StreamResponse:
    text = honest.decode()
    value = json.loads(text)["elapsed_s"]
    return whole(text.replace(f'"elapsed_s":{value}', '"elapsed_s":' + "9" * 401).encode())


def padded(miner_of: Callable[[], HostileMiner]) -> Rewrite:
    async def answer(request: web.Request, honest: bytes) -> web.StreamResponse:
        miner = miner_of()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            await response.write(honest[:-1])
            while miner.streamed < GIB:
                await response.write(b" " * CHUNK)
                miner.streamed += CHUNK
        except (ConnectionError, RuntimeError):
            pass  # the validator hung up
        return response

    return answer


async def test_hostile_answers_are_judged_and_the_validator_survives(
        world: World, role_processes: RoleProcesses, tmp_path: Path) -> None:
    validator = await start_validator(world, role_processes, tmp_path / "validator", "--challenge-timeout", "30")
    miners: dict[str, tuple[HostileMiner, str]] = {}
    holder: dict[str, HostileMiner] = {}
    cases: list[tuple[str, str, Rewrite, str]] = [
        ("deep commitment", "/challenge", deep, "longer than"),
        ("deep commitment within the byte limit", "/challenge", deep_within_the_limit, "malformed"),
        ("401-digit elapsed_s", "/challenge", huge_elapsed, "malformed"),
        ("commitment padded to 1 GiB", "/challenge", padded(lambda: holder["commit"]), "longer than"),
        ("opening padded to 1 GiB", "/open", padded(lambda: holder["open"]), "longer than"),
    ]
    started: list[HostileMiner] = []
    try:
        for name, path_end, rewrite, words in cases:
            miner = await HostileMiner(new_node(), world.permissions, path_end, rewrite).start()
            started.append(miner)
            if name == "commitment padded to 1 GiB":
                holder["commit"] = miner
            if name == "opening padded to 1 GiB":
                holder["open"] = miner
            miners[name] = (miner, words)
            await register(world.provider, world.run_id, miner.node)
            await announce(miner.node, world.discovery.base_url, miner.port, world.run_id)

        for name, (miner, words) in miners.items():
            info = await wait_validated(world.reader, miner.address)
            assert info.status == NodeStatus.REJECTED, name
        rows = by_node(await reports(tmp_path / "validator"))
        for name, (miner, words) in miners.items():
            (row,) = rows[miner.address]
            assert row["failed_check"] == "response", (name, row)
            assert row["reason"].startswith("response check failed: ") and words in row["reason"], (name, row["reason"])
            assert row["state"] == "reported" and row["tx_hash"], (name, row)
        for key in ("commit", "open"):  # read no further than a real answer can be (plus socket buffers)
            assert holder[key].streamed < 256 * CHUNK, (key, holder[key].streamed)

        assert validator.running
        async with aiohttp.ClientSession() as session, session.get(validator.base_url + "/health") as answer:
            assert answer.status == 200
        assert "Traceback" not in validator.logs()
    finally:
        for miner in started:
            await miner.stop()
