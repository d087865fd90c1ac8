"""Who may do what, answered by the chain and cached for a few seconds.

A master answering thousands of heartbeats per second must not make one RPC per
request; a revoked right must not live long either. Answers (positive and negative)
are kept for ``ttl_s`` seconds, and concurrent askers of the same question share one
RPC. Errors are not cached: the next caller asks again.

Chain outages: every RPC of a permission check ends within ``call_timeout_s`` (a stalled
RPC accepts the connection and never answers). While the RPC fails or stalls, an answer
the chain gave at most ``max_stale_s`` seconds ago (default 10 minutes) is served from
the last known chain state; a question never answered before, or one whose last answer is
older than that bound, fails (``require`` answers 503 chain_unavailable). During an outage
known answers are given at once and the RPC is tried again at most every ``retry_s`` seconds
(a question never answered is always asked); once it answers,
every answer is fresh again (a right revoked meanwhile is revoked at once). One WARNING
when stale answers start, one INFO when the chain is back; the "chain" dependency of
``/health`` (``attach(health)``) says which.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

from prime.errors import ChainError

log = logging.getLogger(__name__)

DEFAULT_MAX_STALE_S = 600.0  # the stated bound: a stale answer is at most 10 minutes old
DEFAULT_CALL_TIMEOUT_S = 3.0
DEPENDENCY = "chain"  # the name in /health's dependencies

# NodeStatus values (prime.chain.types.NodeStatus is an IntEnum with these numbers).
_REGISTERED, _APPROVED, _ACTIVE = 1, 2, 4
_NONE = 0
MEMBER_STATUSES = frozenset({_REGISTERED, _APPROVED, _ACTIVE})


class RegistryView(Protocol):
    """The read side of ``prime.chain.client.RegistryClient`` that permissions need."""

    async def is_validator(self, address: str) -> bool: ...
    async def is_master(self, run_id: int, address: str) -> bool: ...
    async def get_run(self, run_id: int) -> Any: ...  # RunInfo: .owner
    async def get_node(self, node: str) -> Any: ...  # NodeInfo: .run_id, .status


class Entry(NamedTuple):
    expires: float
    fetched: float  # when the value was read (the age of a stale answer counts from here)
    value: Any


class TTLCache:
    """Async memo with expiry, a size cap, and one in-flight lookup per key.

    An expired entry is kept ``keep_s`` seconds after it was fetched (at least ``ttl_s``),
    so it can still be ``peek``-ed as a stale answer.
    """

    def __init__(
        self, ttl_s: float, *, max_entries: int = 100_000, keep_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.keep_s = max(ttl_s, keep_s)
        self.max_entries = max_entries
        self._clock = clock
        self._values: OrderedDict[Any, Entry] = OrderedDict()
        self._pending: dict[Any, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()

    def peek(self, key: Any) -> Entry | None:
        """The stored entry, fresh or expired (not yet dropped), without fetching."""
        return self._values.get(key)

    async def get(self, key: Any, fetch: Callable[[], Awaitable[Any]]) -> Any:
        now = self._clock()
        hit = self._values.get(key)
        if hit is not None and hit.expires > now:
            return hit.value
        pending = self._pending.get(key)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.cancelled() and task is not None and not task.cancelling():
                    return await self.get(key, fetch)  # the asker we waited on was cancelled, not us
                raise
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            value = await fetch()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            self._pending.pop(key, None)
        future.set_result(value)
        self._store(key, value, self._clock())
        return value

    def _store(self, key: Any, value: Any, now: float) -> None:
        self._values.pop(key, None)
        self._values[key] = Entry(now + self.ttl_s, now, value)
        # Same keep for all, so insertion order is drop order: drop from the front.
        while self._values:
            oldest_key, oldest = next(iter(self._values.items()))
            if oldest.fetched + self.keep_s > now and len(self._values) <= self.max_entries:
                break
            del self._values[oldest_key]


def _addr(address: str) -> str:
    return address.lower()


def is_outage(exc: BaseException) -> bool:
    """A chain failure that is no answer (RPC unreachable, stalled, erroring), unlike a revert."""
    return isinstance(exc, ChainError) and not hasattr(exc, "error_name")


class DependencyReport(Protocol):
    """Where chain outages are reported (``prime.web.health.LoopHealth``)."""

    def dependency_down(self, name: str, reporter: str, error: str) -> None: ...
    def dependency_up(self, name: str, reporter: str) -> None: ...


class ChainPermissions:
    """Permission questions about addresses, answered from the registry with a short TTL cache,
    and from the last known chain state (at most ``max_stale_s`` old) while the RPC is down."""

    def __init__(
        self,
        registry: RegistryView,
        ttl_s: float = 5.0,
        *,
        max_stale_s: float = DEFAULT_MAX_STALE_S,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        retry_s: float | None = None,
        health: DependencyReport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.cache = TTLCache(ttl_s, keep_s=max_stale_s, clock=clock)
        self.max_stale_s = max_stale_s
        self.call_timeout_s = call_timeout_s
        self.retry_s = retry_s if retry_s is not None else max(ttl_s, 1.0)
        self.health: DependencyReport | None = None
        if health is not None:
            self.attach(health)
        self._clock = clock
        self.down_since: float | None = None  # clock time the current outage was first seen
        self.last_error: str | None = None
        self.stale_answers = 0  # answers served from the last known state (all outages)
        self._next_probe = 0.0

    def attach(self, health: DependencyReport) -> None:
        """Report outages into ``health`` (a role's ``app[HEALTH]``), where "chain" is listed from now on."""
        self.health = health
        listed = getattr(health, "dependency", None)
        if listed is not None:
            listed(DEPENDENCY)

    async def _ask(self, key: Any, call: Callable[[], Awaitable[Any]]) -> Any:
        now = self._clock()
        entry = self.cache.peek(key)
        if entry is not None and entry.expires > now:
            return entry.value
        if entry is not None and self.down_since is not None and now < self._next_probe and now - entry.fetched <= self.max_stale_s:
            return self._stale(entry)  # the chain was just found down: do not wait on it again yet
        try:
            value = await self.cache.get(key, lambda: self._timed(call))
        except ChainError as exc:
            if not is_outage(exc):
                raise
            self._down(exc)
            entry = self.cache.peek(key)
            if entry is not None and self._clock() - entry.fetched <= self.max_stale_s:
                return self._stale(entry)
            raise ChainError(
                f"{str(exc).rstrip('.')}; no answer to this permission question from the last "
                f"{self.max_stale_s:.0f} s is known, so it cannot be checked until the chain answers."
            ) from None
        self._up()
        return value

    async def _timed(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await asyncio.wait_for(call(), self.call_timeout_s)
        except TimeoutError:
            raise ChainError(f"The chain RPC did not answer within {self.call_timeout_s:g} s.") from None

    def _stale(self, entry: Entry) -> Any:
        self.stale_answers += 1
        return entry.value

    def _down(self, exc: BaseException) -> None:
        now = self._clock()
        self._next_probe = now + self.retry_s
        self.last_error = str(exc)
        if self.down_since is None:
            self.down_since = now
            log.warning("the chain does not answer permission checks (%s); answering from the last known chain state "
                        "(at most %.0f s old) until it does", exc, self.max_stale_s)
        if self.health is not None:
            self.health.dependency_down(DEPENDENCY, "permissions", str(exc))

    def _up(self) -> None:
        if self.down_since is None:
            return
        log.info("the chain answers permission checks again after %.1f s (%d stale answers served meanwhile)",
                 self._clock() - self.down_since, self.stale_answers)
        self.down_since = None
        self.last_error = None
        if self.health is not None:
            self.health.dependency_up(DEPENDENCY, "permissions")

    async def is_validator(self, addr: str) -> bool:
        return bool(await self._ask(("validator", _addr(addr)), lambda: self.registry.is_validator(addr)))

    async def is_master(self, run_id: int, addr: str) -> bool:
        return bool(await self._ask(("master", run_id, _addr(addr)), lambda: self.registry.is_master(run_id, addr)))

    async def _run(self, run_id: int) -> Any:
        """The run, or None if the chain says it does not exist (a cached, definite answer)."""

        async def fetch() -> Any:
            try:
                return await self.registry.get_run(run_id)
            except ChainError as exc:
                # getRun reverts for an unknown run id; RevertError carries the contract's
                # error name. Anything else (RPC down) is not an answer and propagates.
                if hasattr(exc, "error_name"):
                    return None
                raise

        return await self._ask(("run", run_id), fetch)

    async def _node(self, addr: str) -> Any:
        return await self._ask(("node", _addr(addr)), lambda: self.registry.get_node(addr))

    async def is_run_owner(self, run_id: int, addr: str) -> bool:
        run = await self._run(run_id)
        owner = getattr(run, "owner", None)
        return isinstance(owner, str) and owner.lower() == _addr(addr)

    async def is_registered_node(self, run_id: int, addr: str) -> bool:
        """Registered for ``run_id`` and not rejected, gone or ejected (Registered/Approved/Active)."""
        node = await self._node(addr)
        return int(node.status) in MEMBER_STATUSES and int(node.run_id) == int(run_id)

    async def is_active_node(self, run_id: int, addr: str) -> bool:
        """Joined ``run_id`` and still in it (status Active)."""
        node = await self._node(addr)
        return int(node.status) == _ACTIVE and int(node.run_id) == int(run_id)

    async def node_run_id(self, addr: str) -> int | None:
        """The run this node registered for (in any state since), or None if never registered."""
        node = await self._node(addr)
        if int(node.status) == _NONE:
            return None
        return int(node.run_id)

    def forget(self) -> None:
        """Drop every cached answer (e.g. right after this process changed chain state)."""
        self.cache.clear()
