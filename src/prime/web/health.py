"""Background loops that tick, back off on errors and show up in ``/health``, and the
dependencies (the chain) whose outages they, or permission checks, report there."""

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

from prime.errors import ChainError, PrimeError
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


class DependencyHealth(msgspec.Struct):
    """One dependency of the service in ``/health`` (today: "chain", the RPC)."""

    ok: bool
    since: float | None  # unix time it went down (ok: false) or came back (ok: true); None: never down
    error: str | None  # the latest failure while down
    reporters: list[str]  # who sees it down: "permissions", "loop:<name>"


class Identity(msgspec.Struct, frozen=True):
    """Who a service is: the address it signs answers with and the network (chain id, registry)
    its signed requests must be addressed to. Public, so an operator's CLI given only a URL can
    learn whom to address; every answer after that must be signed by ``address``."""

    address: str
    chain_id: int
    registry: str


class HealthAnswer(msgspec.Struct):
    """``GET /health``: "ok" (200) when every loop succeeded recently, "stale" (503) otherwise.

    ``dependencies`` names what the service depends on and whether it answers: {"chain": {"ok":
    false, "since": ..., "error": "...", "reporters": [...]}} while the chain RPC fails (a down
    dependency alone does not make the service stale: it may still answer, e.g. from the last
    known chain state)."""

    status: Literal["ok", "stale"]
    service: str
    loops: dict[str, LoopReport]
    identity: Identity | None = None  # absent on a service that takes no signed requests
    dependencies: dict[str, DependencyHealth] = {}


@dataclass
class LoopState:
    name: str
    stale_after_s: float
    last_ok: float  # monotonic time of the last successful iteration (registration at first)
    runs: int = 0
    failures: int = 0  # consecutive
    last_error: str | None = None


@dataclass
class DependencyState:
    name: str
    down: dict[str, str] = field(default_factory=dict)  # reporter -> its latest error
    since: float | None = None  # wall-clock time of the last change
    error: str | None = None


@dataclass
class LoopHealth:
    """Background loops tick here; a loop silent for longer than its ``stale_after_s`` is stale.

    Dependencies: a reporter (a loop, the permission checks) says ``dependency_down(name,
    reporter, error)`` when its call to it failed and ``dependency_up`` when one succeeded. The
    dependency is down from a failure until the next success of a reporter that saw it fail
    (one answer means it answers again; a reporter that makes no calls after an outage, e.g.
    permission checks nobody asks for, would otherwise keep it "down" forever), and it lists
    the reporters that saw it fail since.
    """

    clock: Callable[[], float] = time.monotonic
    loops: dict[str, LoopState] = field(default_factory=dict)
    dependencies: dict[str, DependencyState] = field(default_factory=dict)
    wall_clock: Callable[[], float] = time.time

    def dependency(self, name: str) -> DependencyState:
        """The dependency ``name`` (listed, ok, from now on)."""
        state = self.dependencies.get(name)
        if state is None:
            state = self.dependencies[name] = DependencyState(name)
        return state

    def dependency_down(self, name: str, reporter: str, error: str) -> None:
        state = self.dependency(name)
        if not state.down:
            state.since = self.wall_clock()
        state.down[reporter] = error
        state.error = error

    def dependency_up(self, name: str, reporter: str) -> None:
        state = self.dependencies.get(name)
        # Only a reporter that saw it fail can tell it is back (a loop that never calls the chain
        # succeeds through an outage); its success clears the others too.
        if state is None or reporter not in state.down:
            return
        state.down.clear()
        state.since = self.wall_clock()

    def dependency_report(self) -> dict[str, Any]:
        return {
            state.name: {"ok": not state.down, "since": state.since, "error": state.error if state.down else None,
                         "reporters": sorted(state.down)}
            for state in self.dependencies.values()
        }

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


def _chain_outage(exc: BaseException) -> bool:
    """A chain call that got no answer (unreachable, stalled, erroring RPC), not a revert."""
    return isinstance(exc, ChainError) and not hasattr(exc, "error_name")


def expected_failure(exc: BaseException) -> bool:
    """A failure the world causes (a peer or the chain unreachable, a full disk, Docker away:
    ``PrimeError``, ``OSError``, a timeout), logged as one line; anything else is a bug, logged
    with its traceback."""
    return isinstance(exc, PrimeError | OSError | TimeoutError) or type(exc).__module__.startswith("aiohttp")


def _log_loop_failure(name: str, exc: BaseException, failures: int, logged: str | None) -> str:
    """Log a failed step once per kind of failure (and every 10th in a row); returns what was logged."""
    message = f"{type(exc).__name__}: {exc}"
    if message != logged:
        if expected_failure(exc):
            log.warning("loop %s failed (retrying with backoff): %s", name, str(exc) or type(exc).__name__)
        else:
            log.error("loop %s failed; retrying with backoff", name, exc_info=exc)
    elif failures % 10 == 0:
        log.warning("loop %s still failing (%d in a row): %s", name, failures, str(exc) or type(exc).__name__)
    return message


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
        logged: str | None = None  # the failure last logged (logged once, not at every retry)
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                health.failed(name, f"{type(exc).__name__}: {exc}")
                if _chain_outage(exc):
                    health.dependency_down("chain", f"loop:{name}", str(exc))
                logged = _log_loop_failure(name, exc, failures, logged)
                delay = min(interval_s * 2 ** min(failures, 16), max(max_backoff_s, interval_s))
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                continue
            if logged is not None:
                log.info("loop %s works again", name)
            failures, logged = 0, None
            health.tick(name)
            health.dependency_up("chain", f"loop:{name}")
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
