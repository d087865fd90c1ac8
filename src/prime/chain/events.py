"""Follow registry events with eth_getLogs from a saved block cursor.

The cursor is the next block to read. ``poll()`` reads at most ``max_blocks`` blocks from it
(providers cap eth_getLogs ranges) up to the head minus ``confirmations``; the cursor moves
only when the caller ``commit()``s the batch after handling it. So a process that dies while
handling a batch sees the same batch again after a restart (handlers must be idempotent for
that batch) and never skips one; a committed batch is never delivered again. An empty range is
committed at once: there is nothing to handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from prime.chain.client import RegistryClient, event_topic
from prime.chain.types import ChainEvent
from prime.errors import PrimeError
from prime.files import write_text_atomic

__all__ = [
    "ChainEvent",
    "CursorStore",
    "EventFollower",
    "JsonFileCursor",
    "MemoryCursor",
    "SqliteCursor",
    "read_run_events",
]

log = logging.getLogger(__name__)


class CursorStore(Protocol):
    """Where a follower keeps the next block to read (None: never saved)."""

    def get(self) -> int | None: ...

    def set(self, block: int) -> None: ...


class MemoryCursor:
    """A cursor that lives as long as the object (tests, one-shot scans)."""

    def __init__(self, block: int | None = None) -> None:
        self.block = block

    def get(self) -> int | None:
        return self.block

    def set(self, block: int) -> None:
        self.block = block


class JsonFileCursor:
    """Cursors in a small JSON file ({name: next_block}); written atomically (temp file + rename)."""

    def __init__(self, path: str | os.PathLike, name: str = "registry") -> None:
        self.path = Path(path)
        self.name = name

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise PrimeError(f"The event cursor file {self.path} is unreadable ({exc.__class__.__name__}); fix or delete it to rescan from the deployment block.") from None
        return data if isinstance(data, dict) else {}

    def get(self) -> int | None:
        value = self._read().get(self.name)
        return int(value) if value is not None else None

    def set(self, block: int) -> None:
        data = self._read()
        data[self.name] = int(block)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(data))

class SqliteCursor:
    """Cursors in a SQLite table ``chain_cursors(name, next_block)`` (a role's own database file)."""

    def __init__(self, path: str | os.PathLike, name: str = "registry") -> None:
        self.path = str(path)
        self.name = name
        with contextlib.closing(self._connect()) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS chain_cursors (name TEXT PRIMARY KEY, next_block INTEGER NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        # Short-lived connections: the cursor is written once per batch, and sqlite3's own
        # context manager commits but does not close, hence contextlib.closing around it.
        return sqlite3.connect(self.path, timeout=10)

    def get(self) -> int | None:
        with contextlib.closing(self._connect()) as db:
            row = db.execute("SELECT next_block FROM chain_cursors WHERE name = ?", (self.name,)).fetchone()
        return int(row[0]) if row else None

    def set(self, block: int) -> None:
        with contextlib.closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO chain_cursors (name, next_block) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET next_block = excluded.next_block",
                (self.name, int(block)),
            )


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


Handler = Callable[[list[ChainEvent]], Awaitable[None] | None]


class EventFollower:
    """Reads registry events in order, batch by batch, from a cursor that survives restarts.

    ``cursor`` is a CursorStore; or give ``cursor_get``/``cursor_set`` callables (sync or async).
    With no saved cursor the follower starts at ``start_block`` (default: the deployment block).
    """

    def __init__(
        self,
        client: RegistryClient,
        event_names: Sequence[str] | None,
        cursor: CursorStore | None = None,
        *,
        cursor_get: Callable[[], Any] | None = None,
        cursor_set: Callable[[int], Any] | None = None,
        confirmations: int = 0,
        start_block: int | None = None,
        max_blocks: int = 2000,
    ) -> None:
        get: Callable[[], Any]
        put: Callable[[int], Any]
        if cursor is None and cursor_get is not None and cursor_set is not None:
            get, put = cursor_get, cursor_set
        else:  # a cursor store wins over the callables; neither given: one in memory
            store = cursor if cursor is not None else MemoryCursor()
            get, put = store.get, store.set
        if max_blocks < 1 or confirmations < 0:
            raise ValueError("max_blocks must be >= 1 and confirmations >= 0.")
        self.client = client
        self.event_names = list(event_names) if event_names else None
        for name in self.event_names or []:
            event_topic(name)  # unknown names fail here, not at the first poll
        self._get = get
        self._set = put
        self.confirmations = confirmations
        self.start_block = start_block if start_block is not None else int(getattr(client.deployment, "block", 0))
        self.max_blocks = max_blocks
        self._pending_next: int | None = None
        self.caught_up = False
        self.last_poll_at: float | None = None  # monotonic time of the last successful poll (liveness)

    async def cursor(self) -> int:
        """The next block this follower will read."""
        saved = await _maybe_await(self._get())
        return int(saved) if saved is not None else self.start_block

    async def poll(self) -> list[ChainEvent]:
        """The next batch of events (ordered by block, log index); call ``commit`` once handled.

        Polling again without committing returns the same batch (plus nothing newer).
        """
        start = await self.cursor()
        head = await self.client.block_number() - self.confirmations
        self.last_poll_at = time.monotonic()
        if head < start:
            self._pending_next = None
            self.caught_up = True
            return []
        end = min(head, start + self.max_blocks - 1)
        events = await self.client.get_logs(start, end, self.event_names)
        self.caught_up = end >= head
        self._pending_next = end + 1
        if not events:
            await self.commit()
        return events

    async def commit(self, events: Sequence[ChainEvent] | None = None) -> None:
        """Mark the last polled batch as handled: the cursor moves past its block range."""
        if self._pending_next is None:
            return
        if events and events[-1].block >= self._pending_next:
            raise ValueError("commit() got events from beyond the last polled range.")
        await _maybe_await(self._set(self._pending_next))
        self._pending_next = None

    async def poll_once(self, handler: Handler) -> int:
        """Poll, hand the batch to ``handler`` (sync or async), commit; returns how many events."""
        events = await self.poll()
        if events:
            await _maybe_await(handler(events))
            await self.commit(events)
        return len(events)

    async def run(self, handler: Handler, *, interval_s: float = 1.0, stop: asyncio.Event | None = None) -> None:
        """Follow until ``stop`` is set. A failing poll or handler is logged and retried after
        ``interval_s`` with the same batch (the cursor did not move)."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.poll_once(handler)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep following: the next round retries the same batch
                log.warning("event follower: %s", exc)
                self.caught_up = True
            if self.caught_up:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=interval_s)
                except asyncio.TimeoutError:
                    pass


async def read_run_events(
    client: RegistryClient, run_id: int, event_names: Sequence[str], *, from_block: int | None = None,
    to_block: int | None = None, max_blocks: int = 2000,
) -> tuple[list[ChainEvent], int]:
    """Every event of ``run_id`` named in ``event_names`` from ``from_block`` (default: the deployment
    block) to ``to_block`` (default: the head), read ``max_blocks`` at a time with the run id filtered
    by the RPC (a master rebuilds the run's membership from them at start). Returns (events, to_block)."""
    start = from_block if from_block is not None else int(getattr(client.deployment, "block", 0))
    end = to_block if to_block is not None else await client.block_number()
    events: list[ChainEvent] = []
    block = start
    while block <= end:
        last = min(end, block + max_blocks - 1)
        events.extend(await client.get_logs(block, last, event_names, run_id=run_id))
        block = last + 1
    return events, end
