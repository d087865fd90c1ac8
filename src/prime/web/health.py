"""Background loops that tick, back off on errors and show up in ``/health``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
from aiohttp import web

from prime.web.keys import APP_NAME, HEALTH

log = logging.getLogger("prime.web")


class LoopReport(msgspec.Struct):
    """One background loop in ``/health``."""

    ok: bool
    seconds_since_success: float
    stale_after_s: float
    runs: int
    consecutive_failures: int
    last_error: str | None


class Identity(msgspec.Struct, frozen=True):
    """Who a service is: the address it signs answers with and the network (chain id, registry)
    its signed requests must be addressed to. Public, so an operator's CLI given only a URL can
    learn whom to address; every answer after that must be signed by ``address``."""

    address: str
    chain_id: int
    registry: str


class HealthAnswer(msgspec.Struct):
    """``GET /health``: "ok" (200) when every loop succeeded recently, "stale" (503) otherwise."""

    status: Literal["ok", "stale"]
    service: str
    loops: dict[str, LoopReport]
    identity: Identity | None = None  # absent on a service that takes no signed requests


@dataclass
class LoopState:
    name: str
    stale_after_s: float
    last_ok: float  # monotonic time of the last successful iteration (registration at first)
    runs: int = 0
    failures: int = 0  # consecutive
    last_error: str | None = None


@dataclass
class LoopHealth:
    """Background loops tick here; a loop silent for longer than its ``stale_after_s`` is stale."""

    clock: Callable[[], float] = time.monotonic
    loops: dict[str, LoopState] = field(default_factory=dict)

    def register(self, name: str, stale_after_s: float) -> None:
        self.loops[name] = LoopState(name, stale_after_s, self.clock())

    def tick(self, name: str) -> None:
        """One successful iteration of loop ``name``."""
        state = self.loops.get(name)
        if state is None:
            raise KeyError(f"loop {name!r} was never registered")
        state.last_ok = self.clock()
        state.runs += 1
        state.failures = 0
        state.last_error = None

    def failed(self, name: str, error: str) -> None:
        state = self.loops[name]
        state.failures += 1
        state.last_error = error

    def unregister(self, name: str) -> None:
        self.loops.pop(name, None)

    def report(self) -> tuple[bool, dict[str, Any]]:
        now = self.clock()
        loops: dict[str, Any] = {}
        healthy = True
        for state in self.loops.values():
            age = now - state.last_ok
            ok = age <= state.stale_after_s
            healthy &= ok
            loops[state.name] = {
                "ok": ok,
                "seconds_since_success": round(age, 3),
                "stale_after_s": state.stale_after_s,
                "runs": state.runs,
                "consecutive_failures": state.failures,
                "last_error": state.last_error,
            }
        return healthy, loops


def add_loop(
    app: web.Application,
    name: str,
    step: Callable[[], Awaitable[Any]],
    *,
    interval_s: float,
    stale_after_s: float | None = None,
    max_backoff_s: float = 60.0,
) -> None:
    """Run ``await step()`` every ``interval_s`` while the app runs; ticks ``/health``.

    A failing step is logged and retried with exponential backoff (plus jitter); it never
    ends the loop. The loop is stale (``/health`` 503) after ``stale_after_s`` without a
    successful step (default: three intervals plus 10 s).
    """
    health = app[HEALTH]
    stale = stale_after_s if stale_after_s is not None else 3 * interval_s + 10.0

    async def run() -> None:
        failures = 0
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                health.failed(name, f"{type(exc).__name__}: {exc}")
                if failures == 1:
                    log.exception("loop %s failed; retrying with backoff", name)
                else:
                    log.warning("loop %s failed again (%d in a row): %s", name, failures, exc)
                delay = min(interval_s * 2 ** min(failures, 16), max(max_backoff_s, interval_s))
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                continue
            failures = 0
            health.tick(name)
            await asyncio.sleep(interval_s)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        health.register(name, stale)
        task = asyncio.create_task(run(), name=f"{app[APP_NAME]}:{name}")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        health.unregister(name)

    app.cleanup_ctx.append(lifecycle)
