"""A task's logs as the master serves them: what ``logkeeper.LogKeeper`` stored, then new lines.

Lines come out as ``{replica, attempt, node, stream, line, ts, seq}`` (``seq``: the line's place in
its attempt's output; None on the master's own "error" notes and "dropped" notices). A group task's
lines (issue 15) also carry ``rank`` (= replica): its members' output merged, each line naming its rank.

- follow=0: the stored lines of the selection (every replica and attempt, or ``replica=R``
  and/or ``attempt=A``) in time order, ties in arrival order; ``tail=N`` the last N of them.
  Before reading, the keeper is asked to fetch what the miners have now (``settle``), so a
  line printed a moment ago is there.
- follow=1: the same backlog, then each line as the keeper stores it, in arrival order; no line
  comes twice (the backlog and the live part are split at one row id). The stream ends when the
  task is finished and the keeper follows none of its attempts any more (or ``finish_grace_s``
  after it finished), or when the client goes away (the caller stops iterating). ``None`` items
  are idle ticks that let the caller notice a departed client.

An attempt whose oldest lines the store dropped (its task went over the bound) starts with one
notice line (stream "dropped") saying how many.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from prime.protocol.tasks import Task
from prime.roles.master.logstore import LogStore


class TaskLogs:
    def __init__(
        self,
        store: LogStore,
        task: Callable[[str], Task | None],
        *,
        keeper: Any = None,
        poll_s: float = 1.0,
        finish_grace_s: float = 5.0,
        settle_s: float = 3.0,
    ) -> None:
        self.store = store
        self.keeper = keeper  # a LogKeeper (None: only what is stored, e.g. in tests without miners)
        self._task = task
        self.poll_s = poll_s
        self.finish_grace_s = finish_grace_s
        self.settle_s = settle_s
        self._changed: dict[str, set[asyncio.Event]] = {}

    def changed(self, task_id: str) -> None:
        """The keeper stored lines of the task: wake its followers."""
        for event in self._changed.get(task_id, ()):
            event.set()

    def _active(self, task_id: str) -> bool:
        return self.keeper is not None and self.keeper.active(task_id)

    async def lines(self, task_id: str, *, follow: bool, tail: int | None, replica: int | None = None,
                    attempt: int | None = None) -> AsyncGenerator[dict[str, Any] | None, None]:
        task = self._task(task_id)
        if self.keeper is not None and task is not None:  # a finished task's last lines may still be on their way
            await self.keeper.settle(task_id, self.settle_s)
        event = asyncio.Event()
        if follow:
            self._changed.setdefault(task_id, set()).add(event)
        grouped = task is not None and task.spec.group is not None
        try:
            async for item in self._lines(task_id, event, follow=follow, tail=tail, replica=replica, attempt=attempt):
                if grouped and item is not None:
                    item["rank"] = item["replica"]
                yield item
        finally:
            waiters = self._changed.get(task_id, set())
            waiters.discard(event)
            if not waiters:
                self._changed.pop(task_id, None)

    async def _lines(self, task_id: str, event: asyncio.Event, *, follow: bool, tail: int | None, replica: int | None,
                     attempt: int | None) -> AsyncGenerator[dict[str, Any] | None, None]:
        upto = await asyncio.to_thread(self.store.last_id)
        for notice in await self._dropped(task_id, replica, attempt):
            yield notice
        async for item in self._backlog(task_id, tail, replica, attempt, upto):
            yield item
        if not follow:
            return
        last = upto
        finished_since: float | None = None
        while True:
            event.clear()
            page = await asyncio.to_thread(self.store.page_by_arrival, task_id, replica=replica, attempt=attempt,
                                           after_id=last)
            for item in page:
                last = item["_id"]
                yield _public(item)
            if page:
                continue
            task = self._task(task_id)
            now = time.monotonic()
            if task is None or task.is_final:
                finished_since = finished_since or now
                if not self._active(task_id) or now - finished_since > self.finish_grace_s:
                    if not await asyncio.to_thread(self.store.page_by_arrival, task_id, replica=replica,
                                                   attempt=attempt, after_id=last, limit=1):
                        return
                    continue
            try:
                await asyncio.wait_for(event.wait(), self.poll_s)
            except asyncio.TimeoutError:
                yield None

    async def _backlog(self, task_id: str, tail: int | None, replica: int | None, attempt: int | None,
                       upto: int) -> AsyncGenerator[dict[str, Any], None]:
        if tail == 0:
            return
        after: tuple[float, int] | None = None
        inclusive = False
        if tail is not None:
            after = await asyncio.to_thread(self.store.start_of_tail, task_id, tail, replica=replica, attempt=attempt, upto=upto)
            inclusive = after is not None
        while True:
            page = await asyncio.to_thread(self.store.page_by_time, task_id, replica=replica, attempt=attempt,
                                           after=after, upto=upto, inclusive=inclusive)
            if not page:
                return
            for item in page:
                yield _public(item)
            after, inclusive = page[-1]["_key"], False

    async def _dropped(self, task_id: str, replica: int | None, attempt: int | None) -> list[dict[str, Any]]:
        records = await asyncio.to_thread(self.store.attempts, task_id)
        notices = []
        for record in records:
            if record.dropped <= 0:
                continue
            if (replica is not None and record.key.replica != replica) or (attempt is not None and record.key.attempt != attempt):
                continue
            notices.append({
                "replica": record.key.replica, "attempt": record.key.attempt, "node": record.node, "stream": "dropped",
                "line": f"{record.dropped} earlier lines of replica {record.key.replica} attempt {record.key.attempt} were "
                        f"dropped: the master keeps at most {_size(self.store.max_bytes_per_task)} of logs per task",
                "ts": None, "seq": None,
            })
        return notices


def _public(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _size(count: int) -> str:
    return f"{count / 2**20:g} MiB" if count >= 2**20 else f"{count} bytes"
