"""/health: background loops tick, back off on failures, and go stale (503)."""

from __future__ import annotations

import asyncio

from prime.web import HEALTH, LoopHealth, add_loop
from tests.web.support import build_app, fetch


def test_loop_health_goes_stale_and_recovers() -> None:
    now = [0.0]
    health = LoopHealth(clock=lambda: now[0])
    health.register("chain", stale_after_s=10)
    assert health.report()[0]
    now[0] = 11
    ok, loops = health.report()
    assert not ok and not loops["chain"]["ok"]
    health.failed("chain", "RPC down")
    assert health.report()[1]["chain"]["last_error"] == "RPC down"
    health.tick("chain")
    ok, loops = health.report()
    assert ok and loops["chain"]["runs"] == 1 and loops["chain"]["last_error"] is None


async def test_health_is_503_when_a_loop_is_stale(serve) -> None:
    app = build_app()
    now = [0.0]
    app[HEALTH].clock = lambda: now[0]
    app[HEALTH].register("heartbeats", stale_after_s=30)
    server = await serve(app)
    status, body, _ = await fetch(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["service"] == "unit"
    now[0] = 31
    status, body, _ = await fetch(server, "GET", "/health")
    assert status == 503 and body["status"] == "stale" and body["loops"]["heartbeats"]["ok"] is False


async def test_add_loop_runs_ticks_and_survives_failures(serve) -> None:
    app = build_app()
    calls = {"good": 0, "bad": 0}

    async def good() -> None:
        calls["good"] += 1

    async def bad() -> None:
        calls["bad"] += 1
        raise ConnectionError("peer down")

    add_loop(app, "good", good, interval_s=0.01)
    add_loop(app, "bad", bad, interval_s=0.01, stale_after_s=0.05, max_backoff_s=0.02)
    server = await serve(app)
    await asyncio.sleep(0.3)
    assert calls["good"] >= 3 and calls["bad"] >= 2  # the failing loop keeps retrying
    status, body, _ = await fetch(server, "GET", "/health")
    assert status == 503
    assert body["loops"]["good"]["ok"] and body["loops"]["good"]["runs"] >= 3
    assert not body["loops"]["bad"]["ok"]
    assert body["loops"]["bad"]["last_error"] == "ConnectionError: peer down"
    assert body["loops"]["bad"]["consecutive_failures"] >= 2
