"""A task's logs merged from every replica's miner.

Each replica placed on a node gets one reader of ``GET {miner}/tasks/{id}/logs?replica=R``
(NDJSON ``{"stream","line","ts"}``); lines come out tagged with ``replica`` and ``node``.

- follow=0: every reader runs to its end; the lines are merged by timestamp.
- follow=1: lines are passed on as they arrive; replicas placed later (or moved to another node)
  get a reader when they appear; a reader that breaks off while its replica still runs is
  reopened without backlog. The stream ends when every replica is finished and its reader is
  done (or ``finish_grace_s`` after that), or when the client goes away (the caller stops
  iterating). ``None`` items are idle ticks that let the caller notice a departed client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any
from urllib.parse import quote

from msgspec import Meta

from prime.auth.client import SignedClient
from prime.errors import PeerError
from prime.protocol.codec import Answer, ValidationError, decode
from prime.protocol.tasks import Task, Time
from prime.roles.master.locator import NodeLocator

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1024 * 1024


class MinerLogLine(Answer, frozen=True):
    """One NDJSON line of a miner's ``GET /tasks/{id}/logs`` as the master reads it (fields a
    newer miner adds are ignored; a line that is not one of these is passed on as text)."""

    stream: Annotated[str, Meta(max_length=64)] = "stdout"
    line: str = ""
    ts: Annotated[str, Meta(max_length=64)] | Time | None = None
_DONE = object()


def _sort_key(item: dict[str, Any]) -> tuple[int, Any]:
    ts = item.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return (0, float(ts))
    return (1, str(ts) if ts is not None else "")


class LogMerger:
    def __init__(
        self,
        client: SignedClient,
        locator: NodeLocator,
        task: Callable[[str], Task | None],
        *,
        poll_s: float = 1.0,
        reconnect_s: float = 1.0,
        finish_grace_s: float = 5.0,
    ) -> None:
        self.client = client
        self.locator = locator
        self._task = task
        self.poll_s = poll_s
        self.reconnect_s = reconnect_s
        self.finish_grace_s = finish_grace_s

    async def lines(self, task_id: str, *, follow: bool, tail: int | None) -> AsyncGenerator[dict[str, Any] | None, None]:
        if follow:
            async for item in self._follow(task_id, tail):
                yield item
        else:
            items = await self._snapshot(task_id, tail)
            for item in items:
                yield item

    # --- follow=0 -------------------------------------------------------------------------

    async def _snapshot(self, task_id: str, tail: int | None) -> list[dict[str, Any]]:
        task = self._task(task_id)
        if task is None:
            return []
        queue: asyncio.Queue[Any] = asyncio.Queue()
        readers = [
            asyncio.create_task(self._read(queue, task_id, r.index, r.node, follow=False, tail=tail))
            for r in task.replicas if r.node is not None
        ]
        try:
            await asyncio.gather(*readers)
        finally:
            for reader in readers:
                reader.cancel()
        items = []
        while not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, dict):
                items.append(item)
        items.sort(key=_sort_key)  # stable: each replica's own order is kept for equal stamps
        if tail is not None:
            items = items[-tail:] if tail else []
        return items

    # --- follow=1 -------------------------------------------------------------------------

    async def _follow(self, task_id: str, tail: int | None) -> AsyncIterator[dict[str, Any] | None]:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=10_000)
        readers: dict[tuple[int, int, str], asyncio.Task[None]] = {}
        opened: set[Any] = set()                  # readers whose miner answered (their backlog was read)
        failures: dict[Any, int] = {}             # reopen backoff per reader
        reopen_at: dict[tuple[int, int, str], float] = {}
        errors: set[tuple[Any, str]] = set()      # error lines already passed on (not repeated on every reopen)
        finished_since: float | None = None
        try:
            while True:
                task = self._task(task_id)
                now = time.monotonic()
                if task is not None:
                    for r in task.replicas:
                        if r.node is None:
                            continue
                        key = (r.index, r.attempt, r.node)
                        reader = readers.get(key)
                        if reader is not None and not reader.done():
                            continue
                        if reader is not None and (r.is_final or now < reopen_at.get(key, 0.0)):
                            continue
                        # A reopened reader of a stream that was read asks for no backlog (lines would repeat).
                        backlog = 0 if key in opened else tail
                        readers[key] = asyncio.create_task(
                            self._read(queue, task_id, r.index, r.node, follow=True, tail=backlog, key=key, opened=opened)
                        )
                active = [k for k, t in readers.items() if not t.done()]
                if task is None or task.is_final:
                    finished_since = finished_since or now
                    if not active and queue.empty():
                        return
                    if now - finished_since > self.finish_grace_s and queue.empty():
                        return
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=self.poll_s)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if isinstance(item, tuple) and len(item) == 2 and item[0] is _DONE:
                    failures[item[1]] = failures.get(item[1], 0) + 1
                    reopen_at[item[1]] = time.monotonic() + min(30.0, self.reconnect_s * 2 ** (failures[item[1]] - 1))
                    continue
                if item.get("stream") == "error":
                    seen = ((item["replica"], item["node"]), item["line"])
                    if seen in errors:
                        continue
                    errors.add(seen)
                yield item
        finally:
            for reader in readers.values():
                reader.cancel()
            for reader in readers.values():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    # --- one replica ------------------------------------------------------------------------

    async def _read(
        self, queue: asyncio.Queue[Any], task_id: str, replica: int, node: str, *, follow: bool,
        tail: int | None, key: Any = None, opened: set[Any] | None = None,
    ) -> None:
        params: dict[str, Any] = {"follow": "1" if follow else "0", "replica": replica}
        if tail is not None:
            params["tail"] = tail
        try:
            url = await self.locator.url_for(node)
            target = f"{url}/tasks/{quote(task_id, safe='')}/logs"
            async with self.client.stream(
                "GET", target, audience=node, params=params, read_timeout_s=None if follow else self.client.timeout_s
            ) as resp:
                if opened is not None:
                    opened.add(key)
                while True:
                    raw = await resp.content.readline()
                    if not raw:
                        break
                    item = self._parse(raw, replica, node)
                    if item is not None:
                        await queue.put(item)
        except asyncio.CancelledError:
            raise
        except PeerError as exc:
            if exc.status != 404:  # 404: the miner has no logs for it (never started, or removed)
                await queue.put(self._error(replica, node, str(exc)))
        except Exception as exc:  # a broken stream is one error line, never a failed response
            await queue.put(self._error(replica, node, f"reading logs from node {node} failed ({type(exc).__name__}: {exc})"))
        finally:
            if follow:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait((_DONE, key))

    @staticmethod
    def _parse(raw: bytes, replica: int, node: str) -> dict[str, Any] | None:
        raw = raw.strip()
        if not raw:
            return None
        try:
            # typed: a line of the miner's shape, its strings checked (no lone surrogates), no depth to nest in
            line = decode(raw[:MAX_LINE_BYTES], MinerLogLine)
        except ValidationError:  # not a miner log line: passed on as text
            return {"replica": replica, "node": node, "stream": "stdout",
                    "line": raw[:MAX_LINE_BYTES].decode("utf-8", "replace"), "ts": None}
        return {"replica": replica, "node": node, "stream": line.stream, "line": line.line, "ts": line.ts}

    @staticmethod
    def _error(replica: int, node: str, message: str) -> dict[str, Any]:
        return {"replica": replica, "node": node, "stream": "error", "line": message, "ts": time.time()}
