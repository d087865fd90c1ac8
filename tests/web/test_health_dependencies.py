"""/health names the dependency that is down: chain outages reported by loops and permission checks."""

from __future__ import annotations

import asyncio

from prime.auth.permissions import ChainPermissions
from prime.errors import ChainError
from prime.web import HEALTH, LoopHealth, add_loop
from tests.auth.test_permissions import VALIDATOR, FakeRegistry
from tests.web.support import build_app, fetch


class Reverted(ChainError):
    error_name = "Nope"


def test_a_dependency_is_down_from_a_failure_until_any_reporter_succeeds() -> None:
    wall = [1000.0]
    health = LoopHealth(wall_clock=lambda: wall[0])
    assert health.dependency_report() == {}
    health.dependency_down("chain", "loop:chain", "RPC down")
    wall[0] = 1005.0
    health.dependency_down("chain", "permissions", "RPC stalled")
    assert health.dependency_report() == {
        "chain": {"ok": False, "since": 1000.0, "error": "RPC stalled", "reporters": ["loop:chain", "permissions"]}
    }
    # One answer means the RPC answers again, though the permission checks have made no call since
    # (nobody asked them anything): the latest report decides.
    wall[0] = 1010.0
    health.dependency_up("chain", "loop:chain")
    assert health.dependency_report() == {"chain": {"ok": True, "since": 1010.0, "error": None, "reporters": []}}
    health.dependency_up("chain", "never-reported")  # a no-op
    assert health.dependency_report()["chain"]["since"] == 1010.0
    wall[0] = 1020.0
    health.dependency_down("chain", "permissions", "RPC stalled again")
    assert health.dependency_report()["chain"] == {"ok": False, "since": 1020.0, "error": "RPC stalled again",
                                                  "reporters": ["permissions"]}


async def test_a_loop_whose_chain_calls_fail_marks_the_chain_down_until_it_succeeds(serve) -> None:
    app = build_app()
    outcomes: list[BaseException | None] = [ChainError("Cannot reach the chain RPC at http://x"), Reverted("reverted"), None]
    done = asyncio.Event()

    async def step() -> None:
        outcome = outcomes.pop(0) if outcomes else None
        if not outcomes:
            done.set()
        if outcome is not None:
            raise outcome

    add_loop(app, "chain", step, interval_s=0.01, max_backoff_s=0.01)
    server = await serve(app)
    await asyncio.sleep(0.005)
    _, body, _ = await fetch(server, "GET", "/health")
    chain = body["dependencies"]["chain"]
    assert chain["ok"] is False and "Cannot reach" in chain["error"] and chain["reporters"] == ["loop:chain"]
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.sleep(0.05)
    status, body, _ = await fetch(server, "GET", "/health")
    assert status == 200 and body["dependencies"]["chain"]["ok"] is True


async def test_permission_outages_show_in_health(serve) -> None:
    app = build_app()
    registry = FakeRegistry()
    perms = ChainPermissions(registry, ttl_s=0.0, health=app[HEALTH])
    server = await serve(app)
    _, body, _ = await fetch(server, "GET", "/health")
    assert body["dependencies"] == {"chain": {"ok": True, "since": None, "error": None, "reporters": []}}
    assert await perms.is_validator(VALIDATOR)
    registry.fail = True
    assert await perms.is_validator(VALIDATOR)  # stale
    status, body, _ = await fetch(server, "GET", "/health")
    assert status == 200  # still answering: not stale, but the chain is named
    assert body["dependencies"]["chain"]["ok"] is False and body["dependencies"]["chain"]["reporters"] == ["permissions"]
    registry.fail = False
    perms._next_probe = 0.0
    assert await perms.is_validator(VALIDATOR)
    _, body, _ = await fetch(server, "GET", "/health")
    assert body["dependencies"]["chain"]["ok"] is True
