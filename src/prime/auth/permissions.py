"""Who may do what, answered by the chain and cached for a few seconds.

A master answering thousands of heartbeats per second must not make one RPC per
request; a revoked right must not live long either. Answers (positive and negative)
are kept for ``ttl_s`` seconds, and concurrent askers of the same question share one
RPC. Errors are not cached: the next caller asks again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from prime.errors import ChainError

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


class TTLCache:
    """Async memo with expiry, a size cap, and one in-flight lookup per key."""

    def __init__(self, ttl_s: float, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._values: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._pending: dict[Any, asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()

    async def get(self, key: Any, fetch: Callable[[], Awaitable[Any]]) -> Any:
        now = self._clock()
        hit = self._values.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
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
        self._values[key] = (now + self.ttl_s, value)
        # Same TTL for all, so insertion order is expiry order: drop from the front.
        while self._values:
            oldest_key, (expires, _) = next(iter(self._values.items()))
            if expires > now and len(self._values) <= self.max_entries:
                break
            del self._values[oldest_key]


def _addr(address: str) -> str:
    return address.lower()


class ChainPermissions:
    """Permission questions about addresses, answered from the registry with a short TTL cache."""

    def __init__(self, registry: RegistryView, ttl_s: float = 5.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.cache = TTLCache(ttl_s, clock=clock)

    async def is_validator(self, addr: str) -> bool:
        return bool(await self.cache.get(("validator", _addr(addr)), lambda: self.registry.is_validator(addr)))

    async def is_master(self, run_id: int, addr: str) -> bool:
        return bool(await self.cache.get(("master", run_id, _addr(addr)), lambda: self.registry.is_master(run_id, addr)))

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

        return await self.cache.get(("run", run_id), fetch)

    async def _node(self, addr: str) -> Any:
        return await self.cache.get(("node", _addr(addr)), lambda: self.registry.get_node(addr))

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
