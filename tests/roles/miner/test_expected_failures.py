"""Expected conditions are logged once at WARNING, without a traceback (issue 13: an announce
failure or a full disk logged a traceback at ERROR every second); a bug still gets its traceback.

The miner's announce loop as node.py wires it (``add_loop`` over an ``Announcer``) with discovery
refusing, and its converger with a disk that is full whenever a replica's start writes to it."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import Any

import pytest

from prime.errors import PeerError
from prime.protocol.heartbeat import DesiredReplica
from prime.roles.miner.announce import Announcer
from prime.roles.miner.heartbeat import Converger
from prime.web import add_loop, make_app
from tests.support.miner_env import MemoryExecutor, wait_until


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def test_an_announce_that_keeps_failing_is_one_warning_without_a_traceback(serve, caplog) -> None:
    calls = []

    async def announce(ip: str, port: int) -> None:
        calls.append(ip)
        raise PeerError("discovery at http://127.0.0.1:9 is not reachable")

    app = make_app(name="miner")
    add_loop(app, "announce", Announcer(announce, lambda: "127.0.0.1", 8093, every_s=60).step,
             interval_s=0.005, max_backoff_s=0.01)
    with caplog.at_level(logging.DEBUG):
        await serve(app)
        await wait_until(lambda: len(calls) >= 12, timeout_s=10, interval_s=0.01, what="retries")
    logged = _records(caplog, "loop announce")
    assert logged and all(r.levelno == logging.WARNING and r.exc_info is None for r in logged), logged
    assert len(_records(caplog, "not reachable")) == 2  # once, then once at the 10th in a row
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_bug_in_a_loop_keeps_its_traceback(serve, caplog) -> None:
    calls = []

    async def step() -> None:
        calls.append(1)
        raise KeyError("oops")

    app = make_app(name="miner")
    add_loop(app, "buggy", step, interval_s=0.005, max_backoff_s=0.01)
    with caplog.at_level(logging.INFO):
        await serve(app)
        await wait_until(lambda: len(calls) >= 3, timeout_s=10, interval_s=0.01, what="retries")
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.exc_info is not None and "loop buggy failed" in error.getMessage()


class FullDisk(MemoryExecutor):
    async def start(self, placement: Any, on_progress: Any = None, *, replace: bool = False) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root / "tasks"))


class EngineAway(MemoryExecutor):
    async def snapshot(self) -> list[Any]:
        from prime.roles.miner.executor import ExecutorError

        raise ExecutorError("the Docker engine at unix:///var/run/docker.sock is not reachable")


def _desired() -> DesiredReplica:
    return DesiredReplica.from_json({"id": "t", "replica": 0, "attempt": 0, "gpu_indices": [],
                                     "spec": {"image": "busybox:1", "command": ["true"]}})


@pytest.mark.parametrize("executor", [FullDisk, EngineAway])
async def test_a_full_disk_or_an_engine_away_is_one_warning_at_every_heartbeat(executor: type, tmp_path: Path,
                                                                               caplog) -> None:
    converger = Converger(executor(tmp_path), [], watch_engine=False)
    try:
        with caplog.at_level(logging.DEBUG, logger="prime.roles.miner.heartbeat"):
            for _ in range(10):  # ten heartbeats, each with the master's list
                converger.submit([_desired()])
                await asyncio.sleep(0)
                assert converger._worker is not None
                await converger._worker
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING and warnings[0].exc_info is None, warnings
        assert "No space left" in warnings[0].getMessage() or "not reachable" in warnings[0].getMessage()
    finally:
        await converger.close()
