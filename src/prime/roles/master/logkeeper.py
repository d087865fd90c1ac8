"""The master follows every placed replica attempt's logs and keeps them (``logstore.LogStore``).

Every ``step`` (the "logs" loop, once a second) makes sure each attempt the master placed, and
each attempt the store lists as not done (one from before a restart, or one a replica left), has
one follower. A follower reads ``GET {miner}/tasks/{id}/logs?follow=1&replica=R&attempt=A&offset=N``
from its node, N being how many of that attempt's lines the store already holds: the miner skips
those (and says so in ``X-Prime-Log-Offset``; a miner that does not is read from its first line
and the keeper skips them itself), so a reconnect or a master restart stores no line twice.

- A stream that ends while the replica still runs (a restart of an ``on-failure`` container, a
  miner that closed it) is reopened after ``reconnect_s``; a failure (node unreachable, an error
  answer) with backoff up to ``max_backoff_s``; a 404 (no container yet) likewise.
- Once the replica finished or moved on (another attempt), one last ``follow=0`` read takes
  the tail and the attempt is ``done``. A node that stays unreachable after that is given up
  after ``give_up_after`` failures, with a note (stream "error") in the store.
- Bounded per line: a line of the miner's NDJSON longer than ``MAX_RAW_LINE`` is stored cut
  and the rest of it skipped as it arrives (an endless line never sits in memory); a line's text
  is cut at ``MAX_LINE_CHARS``. A line that is not the miner's JSON is stored as text; a stream
  other than stdout/stderr is stored as stdout (a miner cannot forge the master's notes).
- A silent miner holds only its own follower: each has its own connection, from a client of
  its own (the log streams never take the peer client's connections), and a followed stream of
  a finished replica that stays silent is closed after ``finish_grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import quote

from msgspec import Meta

from prime.auth.client import SignedClient
from prime.errors import PeerError
from prime.protocol.codec import Answer, ValidationError, decode
from prime.protocol.tasks import Task, Time
from prime.roles.master.locator import NodeLocator
from prime.roles.master.logstore import AttemptKey, AttemptRecord, LogStore, NewLine
from prime.web.openapi import ascii_int

log = logging.getLogger(__name__)

MAX_RAW_LINE = 1024 * 1024
MAX_LINE_CHARS = 64 * 1024
OFFSET_HEADER = "X-Prime-Log-Offset"
MAX_OFFSET = 2**53
MAX_NOTES = 16  # distinct notes per attempt and keeper run (a miner failing in new ways each time adds no more)


class MinerLogLine(Answer, frozen=True):
    """One NDJSON line of a miner's ``GET /tasks/{id}/logs`` as the master reads it (fields a
    newer miner adds are ignored; a line that is not one of these is kept as text)."""

    stream: Annotated[str, Meta(max_length=64)] = "stdout"
    line: str = ""
    ts: Annotated[str, Meta(max_length=64)] | Time | None = None


class LineSplitter:
    """NDJSON lines out of chunks, each at most ``limit`` bytes: a longer one comes out cut
    (``True``) once, and the rest of it is skipped as it arrives. Blank lines are not lines."""

    def __init__(self, limit: int = MAX_RAW_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[tuple[bytes, bool]]:
        out: list[tuple[bytes, bool]] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self._skipping:
                room = self.limit - len(self._buffer)
                if len(piece) > room:
                    self._buffer += piece[:room]
                    out.append((bytes(self._buffer), True))
                    self._buffer.clear()
                    self._skipping = True
                else:
                    self._buffer += piece
            if end < 0:
                return out
            if not self._skipping and self._buffer.strip():
                out.append((bytes(self._buffer), False))
            self._buffer.clear()
            self._skipping = False
            start = end + 1

    def close(self) -> list[tuple[bytes, bool]]:
        rest = bytes(self._buffer) if not self._skipping and self._buffer.strip() else b""
        self._buffer.clear()
        self._skipping = False
        return [(rest, False)] if rest else []


def parse_line(raw: bytes, cut: bool, seq: int, arrived: float) -> NewLine:
    """One of the miner's NDJSON lines as stored: its stream (stdout/stderr), text and time."""
    if not cut:
        try:
            # typed: a line of the miner's shape, its strings checked (no lone surrogates), no depth to nest in
            item = decode(raw, MinerLogLine)
        except ValidationError:
            pass
        else:
            stream = item.stream if item.stream in ("stdout", "stderr") else "stdout"
            ts = item.ts if isinstance(item.ts, (str, int, float)) and not isinstance(item.ts, bool) else None
            return NewLine(stream, _cut_text(item.line, False), ts, seq, arrived)
    return NewLine("stdout", _cut_text(raw.decode("utf-8", "replace").strip(), cut), None, seq, arrived)


def _cut_text(text: str, cut: bool) -> str:
    if len(text) > MAX_LINE_CHARS:
        text, cut = text[:MAX_LINE_CHARS], True
    return text + f" … [cut: the line was longer than the master keeps ({MAX_LINE_CHARS} characters)]" if cut else text


class _Missing(Exception):
    """The miner has no container of this attempt (404)."""


@dataclass(eq=False)
class _Follower:
    key: AttemptKey
    node: str
    received: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    fresh: asyncio.Event = field(default_factory=asyncio.Event)  # set: what the miner sent so far is stored
    idle: bool = False
    moved_at: float | None = None
    notes: set[str] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class LogKeeper:
    def __init__(
        self,
        client: SignedClient,
        locator: NodeLocator,
        store: LogStore,
        tasks: Callable[[], Iterable[Task]],
        task: Callable[[str], Task | None],
        *,
        on_stored: Callable[[str], None] = lambda task_id: None,
        reconnect_s: float = 1.0,
        max_backoff_s: float = 30.0,
        missing_max_s: float = 5.0,
        give_up_after: int = 5,
        finish_grace_s: float = 10.0,
        flush_s: float = 0.1,
        flush_lines: int = 500,
        idle_check_s: float = 2.0,
        max_followers: int = 4096,
    ) -> None:
        self.client = client
        self.locator = locator
        self.store = store
        self._tasks = tasks
        self._task = task
        self._on_stored = on_stored
        self.reconnect_s = reconnect_s
        self.max_backoff_s = max_backoff_s
        self.missing_max_s = missing_max_s
        self.give_up_after = give_up_after
        self.finish_grace_s = finish_grace_s
        self.flush_s = flush_s
        self.flush_lines = flush_lines
        self.idle_check_s = idle_check_s
        self.max_followers = max_followers
        self._followers: dict[AttemptKey, _Follower] = {}
        self._done: set[AttemptKey] = set()
        self._loaded = False
        self._closed = False
        self._stepping = asyncio.Lock()

    # --- supervision ------------------------------------------------------------------------

    async def step(self) -> None:
        """Start a follower for every attempt that has none and is not done (the "logs" loop)."""
        async with self._stepping:  # the loop and a reader's settle(): never two followers for one attempt
            await self._step()

    async def _step(self) -> None:
        if self._closed:
            return
        wanted: dict[AttemptKey, str] = {}
        if not self._loaded:
            for kept in await asyncio.to_thread(self.store.attempts):
                if kept.done:
                    self._done.add(kept.key)
                elif kept.node is not None:
                    wanted[kept.key] = kept.node
            self._loaded = True
        for task in list(self._tasks()):
            for replica in task.replicas:
                if replica.node is not None:
                    wanted.setdefault(AttemptKey(task.id, replica.index, replica.attempt), replica.node)
        for key, node in wanted.items():
            if key in self._done or key in self._followers or len(self._followers) >= self.max_followers:
                continue
            record: AttemptRecord | None = await asyncio.to_thread(self.store.attempt, key)
            if record is not None and record.done:
                self._done.add(key)
                continue
            follower = _Follower(key, record.node or node if record is not None else node,
                                 record.received if record is not None else 0)
            self._followers[key] = follower
            follower.task = asyncio.get_running_loop().create_task(self._run(follower), name=f"prime-logs-{key.task_id}")

    def active(self, task_id: str) -> bool:
        """Whether some attempt of the task is still followed (its last lines may still come)."""
        return any(key.task_id == task_id for key in self._followers)

    async def settle(self, task_id: str, timeout_s: float = 3.0) -> None:
        """Have each follower of the task read what its miner has now (a follower waiting to retry
        tries at once), and wait up to ``timeout_s`` until they did. A replica placed since the last
        step gets its follower now."""
        await self.step()
        followers = [f for f in self._followers.values() if f.key.task_id == task_id]
        for follower in followers:
            if not follower.idle:
                follower.fresh.clear()
                follower.wake.set()
        waits = [asyncio.ensure_future(f.fresh.wait()) for f in followers]
        if not waits:
            return
        try:
            await asyncio.wait(waits, timeout=timeout_s)
        finally:
            for wait in waits:
                wait.cancel()

    async def close(self) -> None:
        self._closed = True
        tasks = [f.task for f in self._followers.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- one attempt ------------------------------------------------------------------------

    def _moved(self, follower: _Follower) -> bool:
        """The replica finished, or this attempt is not the replica's (its last lines are all there is)."""
        task = self._task(follower.key.task_id)
        replica = None if task is None else next((r for r in task.replicas if r.index == follower.key.replica), None)
        moved = replica is None or replica.attempt != follower.key.attempt or replica.is_final
        if moved and follower.moved_at is None:
            follower.moved_at = time.monotonic()
        return moved

    async def _run(self, follower: _Follower) -> None:
        failures = missing = 0
        done = False
        try:
            while not done:
                moved = self._moved(follower)
                try:
                    await self._read(follower, follow=not moved)
                except asyncio.CancelledError:
                    raise
                except _Missing:
                    missing += 1
                    if moved:
                        done = True
                        continue
                    delay = min(self.missing_max_s, self.reconnect_s * 2 ** min(missing - 1, 8))
                except Exception as exc:  # a broken stream or an unreachable node: noted once, retried
                    failures += 1
                    await self._note(follower, _describe(follower.node, exc))
                    if moved and failures >= self.give_up_after:
                        await self._note(follower, f"the master gave up reading attempt {follower.key.attempt}'s logs "
                                                   f"from node {follower.node} after {failures} failures; "
                                                   f"{follower.received} lines were read")
                        done = True
                        continue
                    delay = min(self.max_backoff_s, self.reconnect_s * 2 ** min(failures - 1, 8))
                else:
                    failures = missing = 0
                    if moved:
                        done = True
                        continue
                    delay = self.reconnect_s
                follower.fresh.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(follower.wake.wait(), delay)
                follower.wake.clear()
            await asyncio.to_thread(self.store.mark_done, follower.key)
            self._done.add(follower.key)
        finally:
            follower.fresh.set()
            self._followers.pop(follower.key, None)
            if done:
                self._on_stored(follower.key.task_id)

    async def _read(self, follower: _Follower, *, follow: bool) -> None:
        key = follower.key
        params: dict[str, Any] = {"follow": "1" if follow else "0", "replica": key.replica, "attempt": key.attempt}
        if follower.received:
            params["offset"] = follower.received
        url = await self.locator.url_for(follower.node)
        target = f"{url}/tasks/{quote(key.task_id, safe='')}/logs"
        # A followed stream has no read timeout, but its headers must come (the miner sends them at once).
        open_s = self.client.timeout_s * (self.client.retries + 1) + 5.0
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(open_s):
                    resp = await stack.enter_async_context(self.client.stream(
                        "GET", target, audience=follower.node, params=params,
                        read_timeout_s=None if follow else self.client.timeout_s))
                start = ascii_int(resp.headers.get(OFFSET_HEADER, ""), maximum=MAX_OFFSET)
                await self._consume(follower, resp, 0 if start is None else start, follow=follow)
        except PeerError as exc:
            if exc.status == 404:
                raise _Missing() from None
            raise
        finally:
            follower.idle = False

    async def _consume(self, follower: _Follower, resp: Any, position: int, *, follow: bool) -> None:
        splitter = LineSplitter()
        pending: list[NewLine] = []
        last_flush = last_data = time.monotonic()
        while True:
            # Stored what came, and the miner has been quiet a moment (or keeps sending): "fresh".
            quick = pending or not follower.fresh.is_set()
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), self.flush_s if quick else self.idle_check_s)
            except asyncio.TimeoutError:
                now = time.monotonic()
                if pending:
                    position = await self._flush(follower, pending, position)
                    last_flush = now
                    continue
                follower.idle = True
                follower.fresh.set()
                if not follow and now - last_data > self.client.timeout_s:
                    raise PeerError(f"node {follower.node} sent no log line for {self.client.timeout_s:g} s") from None
                elif follow and self._moved(follower) and follower.moved_at is not None \
                        and now - follower.moved_at > self.finish_grace_s:
                    return  # a finished replica's stream that stays open and silent: read the tail instead
                continue
            last_data = time.monotonic()
            follower.idle = False
            if not chunk:
                break
            now = time.time()
            for raw, cut in splitter.feed(chunk):
                if position >= follower.received:
                    pending.append(parse_line(raw, cut, position, now))
                position += 1
            if len(pending) >= self.flush_lines or time.monotonic() - last_flush >= self.flush_s:
                position = await self._flush(follower, pending, position)
                last_flush = time.monotonic()
        now = time.time()
        for raw, cut in splitter.close():
            if position >= follower.received:
                pending.append(parse_line(raw, cut, position, now))
            position += 1
        await self._flush(follower, pending, position)

    async def _flush(self, follower: _Follower, pending: list[NewLine], position: int) -> int:
        received = max(follower.received, position)
        if pending or received != follower.received:
            await asyncio.to_thread(self.store.append, follower.key, follower.node, list(pending), received=received)
            follower.received = received
            pending.clear()
            self._on_stored(follower.key.task_id)
        follower.fresh.set()
        return position

    async def _note(self, follower: _Follower, message: str) -> None:
        """A line of the master's own about this attempt (stored once per keeper run and message)."""
        if message in follower.notes or len(follower.notes) >= MAX_NOTES:
            return
        follower.notes.add(message)
        line = NewLine("error", message, time.time(), None, time.time())
        await asyncio.to_thread(self.store.append, follower.key, follower.node, [line])
        self._on_stored(follower.key.task_id)


def _describe(node: str, exc: Exception) -> str:
    if isinstance(exc, PeerError):
        return str(exc)
    return f"reading logs from node {node} failed ({type(exc).__name__}: {exc})"
