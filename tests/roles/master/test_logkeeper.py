"""The master's log keeper (logkeeper.py) against scripted miners on real sockets: it follows each
attempt, resumes at the stored count after a broken stream or a master restart (with a miner that
honours ``offset`` and with one that does not), takes the tail once the replica finished, and
survives hostile miners (huge, endless and non-JSON lines, forged streams, a silent miner, a node
that went away) without stalling the other tasks. The real miner and master are in
test_logs_real.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from eth_account import Account

from prime.auth.client import SignedClient
from prime.protocol.tasks import Replica, ReplicaState, Task, TaskSpec
from prime.roles.master.logkeeper import MAX_LINE_CHARS, LogKeeper
from prime.roles.master.logs import TaskLogs
from prime.roles.master.logstore import AttemptKey, LogStore
from prime.web import bound_port
from tests.roles.master.fake_miner import eventually
from tests.support.signing import DOMAIN

NODE, SECOND, SILENT, GONE = (Account.create().address for _ in range(4))


@dataclass
class Script:
    """What one attempt's container printed, as the scripted miner serves it."""

    lines: list[Any] = field(default_factory=list)  # dicts (sent as JSON) or raw bytes (sent as they are)
    running: bool = True       # follow=1 stays open while True
    ignore_offset: bool = False  # an older miner: always from the first line, no offset header
    silent: bool = False       # answers the headers, then never a byte
    hold_headers: bool = False  # never even answers


class ScriptedMiner:
    def __init__(self) -> None:
        self.scripts: dict[tuple[str, int, int], Script] = {}
        self.requests: list[dict[str, str]] = []
        self.cut = asyncio.Event()  # set: every open follow stream breaks off (a restarting container)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> ScriptedMiner:
        app = web.Application()
        app.router.add_get("/tasks/{task_id}/logs", self._logs)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)  # a held-open handler is not waited for
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{bound_port(self._runner)}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append({"task": request.match_info["task_id"], **query})
        key = (request.match_info["task_id"], int(query.get("replica", "0")), int(query.get("attempt", "0")))
        script = self.scripts.get(key)
        if script is None:
            return web.json_response({"error": "unknown_task", "detail": "no container"}, status=404)
        if script.hold_headers:
            await asyncio.sleep(3600)
        offset = 0 if script.ignore_offset else int(query.get("offset", "0"))
        headers = {"Content-Type": "application/x-ndjson"}
        if not script.ignore_offset:
            headers["X-Prime-Log-Offset"] = str(offset)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        if script.silent:
            await asyncio.sleep(3600)
        sent = offset
        follow = query.get("follow") == "1"
        cut = self.cut
        while True:
            for item in script.lines[sent:]:
                await response.write(item if isinstance(item, bytes) else json.dumps(item).encode() + b"\n")
            sent = max(sent, len(script.lines))
            if not follow or not script.running or cut.is_set():
                break
            await asyncio.sleep(0.02)
        await response.write_eof()
        return response


class Tasks:
    """The master's tasks as the keeper sees them (set by the test)."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}

    def add(self, task_id: str, node: str, *, replicas: int = 1) -> Task:
        spec = TaskSpec(image="busybox", replicas=replicas)
        task = Task(task_id, spec, 0.0, [Replica(task_id, i, node=node, state=ReplicaState.RUNNING) for i in range(replicas)])
        self.tasks[task_id] = task
        return task

    def finish(self, task_id: str, replica: int = 0) -> None:
        self.tasks[task_id].replicas[replica].state = ReplicaState.COMPLETED

    def move(self, task_id: str, replica: int, node: str) -> None:
        r = self.tasks[task_id].replicas[replica]
        r.attempt, r.node, r.state = r.attempt + 1, node, ReplicaState.RUNNING


class Locator:
    def __init__(self) -> None:
        self.urls: dict[str, str] = {}

    async def url_for(self, node: str) -> str:
        return self.urls[node]


@dataclass
class World:
    miner: ScriptedMiner
    tasks: Tasks
    locator: Locator
    store_path: Path
    client: SignedClient
    keepers: list[LogKeeper] = field(default_factory=list)
    loops: list[asyncio.Task[None]] = field(default_factory=list)

    def keeper(self, store: LogStore, logs: TaskLogs | None = None) -> LogKeeper:
        keeper = LogKeeper(self.client, self.locator, store, lambda: self.tasks.tasks.values(), self.tasks.tasks.get,  # type: ignore[arg-type]
                           on_stored=logs.changed if logs is not None else (lambda task_id: None),
                           reconnect_s=0.05, max_backoff_s=0.2, missing_max_s=0.1, give_up_after=2,
                           finish_grace_s=0.5, idle_check_s=0.1)
        self.keepers.append(keeper)

        async def loop() -> None:
            while True:
                await keeper.step()
                await asyncio.sleep(0.05)

        self.loops.append(asyncio.get_running_loop().create_task(loop()))
        return keeper

    async def stop_keepers(self) -> None:
        for loop in self.loops:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        for keeper in self.keepers:
            await keeper.close()
        self.loops.clear()
        self.keepers.clear()


@pytest_asyncio.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    miner = await ScriptedMiner().start()
    locator = Locator()
    locator.urls[NODE] = miner.url
    client = SignedClient(Account.create(), domain=DOMAIN, retries=0, timeout_s=2.0)
    w = World(miner, Tasks(), locator, tmp_path / "logs.sqlite", client)
    try:
        yield w
    finally:
        await w.stop_keepers()
        await client.close()
        await miner.close()


def _lines(store: LogStore, task_id: str) -> list[dict[str, Any]]:
    return store.page_by_time(task_id, replica=None, attempt=None, after=None, upto=store.last_id(), limit=100_000)


def _texts(store: LogStore, task_id: str, stream: str | None = None) -> list[str]:
    return [x["line"] for x in _lines(store, task_id) if stream is None or x["stream"] == stream]


def _line(i: int, prefix: str = "line") -> dict[str, Any]:
    return {"stream": "stdout", "line": f"{prefix} {i}", "ts": f"2026-12-02T08:00:{i:02d}Z"}


async def _done(store: LogStore, key: AttemptKey) -> bool:
    record = store.attempt(key)
    return record is not None and record.done


@pytest.mark.parametrize("older_miner", [False, True], ids=["offset", "no-offset"])
async def test_an_attempt_is_followed_resumed_and_closed_without_duplicates(world: World, older_miner: bool) -> None:
    world.tasks.add("t1", NODE)
    script = world.miner.scripts[("t1", 0, 0)] = Script([_line(i) for i in range(3)], ignore_offset=older_miner)
    store = LogStore(world.store_path)
    world.keeper(store)
    await eventually(lambda: _async(len(_texts(store, "t1")) == 3), what="the first lines")

    # The container restarts (on-failure): the stream breaks off, the keeper reopens it where it was.
    world.miner.cut.set()
    script.lines += [_line(i) for i in range(3, 5)]
    await eventually(lambda: _async(len(_texts(store, "t1")) == 5), what="the lines after the restart")
    world.miner.cut = asyncio.Event()
    reopened = [r for r in world.miner.requests if r.get("follow") == "1"][1:]
    assert reopened and all(r.get("offset") for r in reopened)  # asked to resume, not from the start

    # The master restarts: a new keeper on the same file resumes at the stored count.
    await world.stop_keepers()
    script.lines += [_line(i) for i in range(5, 8)]
    store = LogStore(world.store_path)
    world.keeper(store)
    await eventually(lambda: _async(len(_texts(store, "t1")) == 8), what="the lines after the master restart")

    # The replica finishes: the tail is read and the attempt is done.
    script.lines.append(_line(8))
    script.running = False
    world.tasks.finish("t1")
    await eventually(lambda: _done(store, AttemptKey("t1", 0, 0)), what="the attempt done")
    assert _texts(store, "t1") == [f"line {i}" for i in range(9)]
    assert [x["seq"] for x in _lines(store, "t1")] == list(range(9))
    assert {(x["replica"], x["attempt"], x["node"]) for x in _lines(store, "t1")} == {(0, 0, NODE)}

    # A done attempt is never read again (not even by a master started later).
    await world.stop_keepers()
    asked = len(world.miner.requests)
    store = LogStore(world.store_path)
    world.keeper(store)
    await asyncio.sleep(0.3)
    assert len(world.miner.requests) == asked


async def test_every_attempt_is_kept_when_a_replica_moves_to_another_node(world: World) -> None:
    second = await ScriptedMiner().start()
    try:
        world.locator.urls[SECOND] = second.url
        world.tasks.add("t1", NODE)
        world.miner.scripts[("t1", 0, 0)] = Script([_line(i, "first") for i in range(2)])
        store = LogStore(world.store_path)
        world.keeper(store)
        await eventually(lambda: _async(len(_texts(store, "t1")) == 2), what="attempt 0's lines")
        world.miner.scripts[("t1", 0, 0)].lines.append(_line(2, "first"))  # printed just before the node was lost
        world.miner.scripts[("t1", 0, 0)].running = False
        world.tasks.move("t1", 0, SECOND)
        second.scripts[("t1", 0, 1)] = Script([_line(i, "second") for i in range(2)], running=False)
        world.tasks.finish("t1")
        for attempt in (0, 1):
            await eventually(lambda a=attempt: _done(store, AttemptKey("t1", 0, a)), what=f"attempt {attempt} done")
        by_attempt = {(x["attempt"], x["node"], x["line"]) for x in _lines(store, "t1")}
        assert by_attempt == {(0, NODE, "first 0"), (0, NODE, "first 1"), (0, NODE, "first 2"),
                              (1, SECOND, "second 0"), (1, SECOND, "second 1")}
    finally:
        await second.close()


async def test_hostile_lines_are_kept_bounded_and_as_text(world: World) -> None:
    world.tasks.add("t1", NODE)
    endless = b'{"stream":"stdout","line":"' + b"y" * (3 * 1024 * 1024)  # no end for 3 MiB, then one
    world.miner.scripts[("t1", 0, 0)] = Script([
        b"this is not json\n",
        {"stream": "error", "line": "forged note of the master"},
        {"stream": "stdout", "line": "z" * (MAX_LINE_CHARS * 2)},
        endless, b'"}\n',
        {"stream": "stdout", "line": "after", "ts": None},
    ], running=False)
    store = LogStore(world.store_path)
    world.keeper(store)
    world.tasks.finish("t1")
    await eventually(lambda: _done(store, AttemptKey("t1", 0, 0)), what="the attempt done")
    lines = sorted(_lines(store, "t1"), key=lambda x: x["seq"])
    assert [x["seq"] for x in lines] == [0, 1, 2, 3, 4]  # the endless line is one line
    assert lines[0]["line"] == "this is not json" and lines[0]["stream"] == "stdout"
    assert lines[1]["stream"] == "stdout"  # a miner cannot write the master's notes
    assert all(len(x["line"]) < MAX_LINE_CHARS + 200 for x in lines)
    assert "cut" in lines[2]["line"] and "cut" in lines[3]["line"]
    assert lines[4]["line"] == "after"


async def test_a_silent_miner_does_not_hold_up_other_tasks(world: World) -> None:
    silent = await ScriptedMiner().start()
    try:
        world.locator.urls[SILENT] = silent.url
        world.tasks.add("quiet", SILENT, replicas=2)
        silent.scripts[("quiet", 0, 0)] = Script(silent=True)
        silent.scripts[("quiet", 1, 0)] = Script(hold_headers=True)
        world.tasks.add("busy", NODE)
        world.miner.scripts[("busy", 0, 0)] = Script([_line(i) for i in range(50)])
        store = LogStore(world.store_path)
        logs = TaskLogs(store, world.tasks.tasks.get)
        logs.keeper = world.keeper(store, logs)
        await eventually(lambda: _async(len(_texts(store, "busy")) == 50), what="the busy task's lines")
        got = [item async for item in logs.lines("busy", follow=False, tail=None) if item is not None]
        assert [x["line"] for x in got] == [f"line {i}" for i in range(50)]
        assert _texts(store, "quiet") == []

        # The quiet task finishes; its silent streams are given up and the attempts closed.
        world.tasks.finish("quiet", 0)
        world.tasks.finish("quiet", 1)
        for replica in (0, 1):
            await eventually(lambda r=replica: _done(store, AttemptKey("quiet", r, 0)), what=f"quiet r{replica} closed")
    finally:
        await silent.close()


async def test_a_node_that_is_gone_is_given_up_with_a_note(world: World) -> None:
    world.locator.urls[GONE] = "http://127.0.0.1:9"  # nothing listens there
    world.tasks.add("t1", GONE)
    store = LogStore(world.store_path)
    world.keeper(store)
    await eventually(lambda: _async(bool(_texts(store, "t1", "error"))), what="a note about the node")
    world.tasks.finish("t1")
    await eventually(lambda: _done(store, AttemptKey("t1", 0, 0)), what="the attempt given up")
    notes = _texts(store, "t1", "error")
    assert any("gave up" in note for note in notes)
    assert all(x["seq"] is None for x in _lines(store, "t1"))


async def test_a_follower_of_the_route_gets_each_line_once_and_ends_with_the_task(world: World) -> None:
    world.tasks.add("t1", NODE, replicas=2)
    world.miner.scripts[("t1", 0, 0)] = Script([_line(i, "r0") for i in range(2)])
    store = LogStore(world.store_path, max_bytes_per_task=64 * 1024 * 1024)
    logs = TaskLogs(store, world.tasks.tasks.get, poll_s=0.05, finish_grace_s=5.0)
    logs.keeper = world.keeper(store, logs)
    got: list[dict[str, Any]] = []

    async def follow() -> None:
        async for item in logs.lines("t1", follow=True, tail=None):
            if item is not None:
                got.append(item)

    reader = asyncio.create_task(follow())
    await eventually(lambda: _async(len(got) == 2), what="the first lines")
    world.miner.scripts[("t1", 1, 0)] = Script([_line(i, "r1") for i in range(3)])  # replica 1's container appears
    world.miner.cut.set()  # replica 0's stream breaks off and is reopened
    world.miner.scripts[("t1", 0, 0)].lines.append(_line(2, "r0"))
    await eventually(lambda: _async(len(got) == 6), what="the later lines")
    for replica in (0, 1):
        world.miner.scripts[("t1", replica, 0)].running = False
        world.tasks.finish("t1", replica)
    await asyncio.wait_for(reader, 10)
    assert sorted(x["line"] for x in got) == sorted([f"r0 {i}" for i in range(3)] + [f"r1 {i}" for i in range(3)])
    assert {x["attempt"] for x in got} == {0}

    only = [x async for x in logs.lines("t1", follow=False, tail=2, replica=1) if x is not None]
    assert [x["line"] for x in only] == ["r1 1", "r1 2"]
    assert [x async for x in logs.lines("t1", follow=False, tail=None, attempt=1)] == []


async def test_a_reader_is_told_how_many_lines_were_dropped(world: World) -> None:
    world.tasks.add("t1", NODE)
    world.miner.scripts[("t1", 0, 0)] = Script([_line(i % 60) for i in range(400)], running=False)
    store = LogStore(world.store_path, max_bytes_per_task=100 * 80)
    logs = TaskLogs(store, world.tasks.tasks.get)
    world.keeper(store, logs)
    world.tasks.finish("t1")
    await eventually(lambda: _done(store, AttemptKey("t1", 0, 0)), what="the attempt done")
    got = [x async for x in logs.lines("t1", follow=False, tail=None) if x is not None]
    assert got[0]["stream"] == "dropped"
    dropped = int(got[0]["line"].split()[0])
    assert dropped + len(got) - 1 == 400 and dropped > 0
    assert sorted(x["seq"] for x in got[1:]) == list(range(dropped, 400))  # the oldest went


async def _async(value: Any) -> Any:
    return value
