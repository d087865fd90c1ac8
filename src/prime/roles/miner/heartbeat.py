"""Heartbeats to the master, and converging the node's containers on what it asks for.

Each beat reports the node's replicas (from Docker, through the executor), a sample of
its GPUs and its load; the master answers with the full list of replicas the node should
run and when to beat next. Converging on that list runs in the background (an image pull
can take minutes, heartbeats must not wait for it): a newer list replaces an older one
that has not been started yet.

What to do with each replica is decided in ``core.py``; the converger here takes the
snapshot, asks the core, has the executor carry the actions out and feeds failures back.
GPU indices in the master's messages are positions in the GPUs this node offers
(``--gpu``: the master only knows a count), mapped by the core to the cards' NVML indices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import psutil

from prime import hardware
from prime.errors import PeerError
from prime.protocol.errors import ValidationError
from prime.protocol.heartbeat import DesiredReplica, GpuSample, HeartbeatRequest, HeartbeatResponse, ReplicaReport
from prime.roles.miner import core, engine_watch, exits
from prime.roles.miner.core import Key
from prime.roles.miner.executor import DockerExecutor, ExecutorError
from prime.roles.miner.images import ProgressCallback
from prime.roles.miner.state import MinerStore
from prime.web import LoopHealth
from prime.web.health import expected_failure

log = logging.getLogger(__name__)

LOOP_NAME = "heartbeat"


# --- samples -----------------------------------------------------------------------------------


def gpu_samples(node_gpus: Sequence[int]) -> tuple[GpuSample, ...]:
    """One sample per offered GPU, indexed by its position (as the master knows it)."""
    if not node_gpus:
        return ()
    samples = hardware.gpu_sample(list(node_gpus))
    return tuple(
        GpuSample(index=position, util=_clamp(s.utilization_pct, 0, 100), mem_used_mib=_clamp(s.memory_used_mib, 0, None),
                  temp_c=_clamp(s.temperature_c, -100, 300))
        for position, s in enumerate(samples)
    )


def _clamp(value: int | None, low: float, high: float | None) -> float | None:
    if value is None:
        return None
    clamped = max(low, float(value))
    return min(high, clamped) if high is not None else clamped


def load_sample() -> dict[str, float]:
    memory = psutil.virtual_memory()
    load = {
        "cpu_pct": float(psutil.cpu_percent(interval=None)),
        "mem_used_mib": float((memory.total - memory.available) // hardware.MIB),
        "mem_total_mib": float(memory.total // hardware.MIB),
    }
    with contextlib.suppress(OSError, AttributeError):
        load["load1"] = float(os.getloadavg()[0])
    return load


# --- converging --------------------------------------------------------------------------------


class Converger:
    """Brings the node's containers to the master's desired list, in the background:
    snapshot (executor) → decisions (``core.plan``) → actions carried out (executor) → failures
    fed back into the book.

    Undesired replicas that still run are stopped; undesired ones that finished are kept for
    ``policy.retention_s`` (their logs stay readable to the master) and then removed. A replica
    the master pushed (POST /tasks) is not stopped for ``policy.push_grace_s`` even if a
    heartbeat answer computed before the push does not list it yet. ``supervise()`` applies
    restart policies between lists (also while no master answers).

    An exit the engine caused is reported Lost (``exits.py``): the core records every stop it
    asks for, and the converger feeds it the engine's outside signals and outages, from the
    engine's event stream (``watch_engine``: followed from the first round on; by default when
    the executor is a Docker one) and from snapshots that fail while the engine is away.
    """

    def __init__(
        self,
        executor: Any,
        node_gpus: Sequence[int],
        *,
        policy: core.Policy = core.Policy(),
        on_progress: ProgressCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        watch_engine: bool | None = None,
        task_ports: core.PortRange | None = None,
    ) -> None:
        self.executor = executor
        self.node_gpus = list(node_gpus)
        self.task_ports = task_ports  # --task-ports: where group members may listen (None: none here)
        self.policy = policy
        self.on_progress = on_progress
        self.clock = clock
        self.book = core.Book()
        self._pending: list[DesiredReplica] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.rounds = 0
        if watch_engine is None:
            watch_engine = isinstance(executor, DockerExecutor)
        self.watch_engine = watch_engine
        self._watcher: asyncio.Task[None] | None = None
        self.engine_seen_at: float | None = None  # the engine (its event stream) last came up, wall clock
        self._closed = False
        self._logged: dict[Key | None, str] = {}  # failures logged (None: a whole round), not logged again

    @property
    def invalid(self) -> Mapping[Key, str]:
        """Desired replicas that cannot run here (or whose start raised), and why."""
        return self.book.invalid

    def submit(self, desired: Sequence[DesiredReplica]) -> None:
        """Converge on ``desired`` soon (the latest list wins over one not yet started)."""
        self._pending = list(desired)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="miner:converge")

    async def _work(self) -> None:
        while self._pending is not None:
            desired, self._pending = self._pending, None
            try:
                await self.converge(desired)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Docker down, a full disk, ...: the next heartbeat tries again
                self._failed_once(None, "converging on the master's desired tasks failed (retried at every heartbeat)",
                                  exc)
            else:
                if self._logged.pop(None, None) is not None:
                    log.info("converging on the master's desired tasks works again")

    async def converge(self, desired: Sequence[DesiredReplica] | None) -> core.Plan:
        """One round: decide on a fresh snapshot, carry the actions out. ``None``: supervise only."""
        self._ensure_watcher()
        try:
            snapshot = await self.executor.snapshot()
        except ExecutorError:  # the engine is not reachable: what exits meanwhile is the engine's doing
            self.engine_away(time.time())
            raise
        if self.book.marks.away_since is not None:
            self.engine_back(time.time(), None)
        plan = core.plan(desired, snapshot, self.book, self.clock(), self.policy, self.node_gpus, self.task_ports)
        self.book = plan.book  # no await since the snapshot: a push meanwhile is in the book it started from
        for stop in plan.of(core.Stop):
            log.info("stopping task %s replica %d: %s", stop.key[0], stop.key[1], stop.why)
            await self.executor.stop(*stop.key)
        starts = [a for a in plan.actions if isinstance(a, core.Start | core.Resume | core.Restart)]
        results = await asyncio.gather(*(self._carry_out(a) for a in starts), return_exceptions=True)
        for action, result in zip(starts, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                self._failed_once(action.key, f"task {action.key[0]} replica {action.key[1]} could not be started",
                                  result)
                if isinstance(action, core.Start):
                    self.book = core.start_failed(self.book, action.key, str(result) or type(result).__name__)
            else:
                self._logged.pop(action.key, None)
        if desired is not None:
            self.rounds += 1
        return plan

    def _failed_once(self, key: Key | None, what: str, exc: BaseException) -> None:
        """Log a failure once while it repeats (every heartbeat retries it): one WARNING line for
        what the world causes (Docker away, a full disk: ``expected_failure``), a traceback only
        for a bug."""
        message = f"{type(exc).__name__}: {exc}"
        if self._logged.get(key) == message:
            log.debug("%s again: %s", what, exc)
            return
        self._logged[key] = message
        if expected_failure(exc):
            log.warning("%s: %s", what, str(exc) or type(exc).__name__)
        else:
            log.error("%s", what, exc_info=exc)

    # -- what the engine did (exits.py)

    def engine_signal(self, key: Key | None, container_id: str, signal: str | None) -> None:
        """A ``kill`` of one of this miner's containers; kept when the miner did not ask for it."""
        marks = exits.engine_signal(self.book.marks, key, container_id, signal, self.clock())
        if marks is not self.book.marks:
            log.warning("container %s of task %s was sent signal %s by someone other than the miner",
                        container_id[:12], key[0] if key else "?", signal)
            self.book = replace(self.book, marks=marks)

    def engine_away(self, wall: float) -> None:
        self.book = replace(self.book, marks=exits.engine_away(self.book.marks, wall))

    def engine_back(self, wall: float, last_seen: float | None) -> None:
        self.engine_seen_at = wall
        self.book = replace(self.book, marks=exits.engine_back(self.book.marks, wall, last_seen))

    def _ensure_watcher(self) -> None:
        if self._closed:
            return  # a round after close() (a loop not stopped yet) starts no watcher thread again
        if self.watch_engine and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.create_task(
                engine_watch.watch(self.executor, self.engine_signal, self.engine_away, self.engine_back),
                name="miner:engine-events")

    async def supervise(self) -> core.Plan:
        """Apply restart policies to the node's containers (the ``supervise`` loop's body)."""
        return await self.converge(None)

    async def _carry_out(self, action: core.Action) -> Any:
        if isinstance(action, core.Start):
            return await self.executor.start(action.placement, self.on_progress, replace=action.replace)
        if isinstance(action, core.Restart):
            log.info("task %s replica %d failed; restart %d", action.key[0], action.key[1], action.count)
            return await self.executor.restart(action.key, action.container_id)
        if isinstance(action, core.Resume):
            return await self.executor.resume(action.key, action.container_id)
        return None

    def push(self, desired: DesiredReplica) -> core.Placement:
        """Start one replica now (master's POST /tasks); ``core.Unplaceable`` if it cannot run here."""
        placement = core.place(desired, self.node_gpus, self.task_ports)
        self.book = core.pushed(self.book, placement, self.clock())
        task = asyncio.create_task(self._push(placement), name=f"miner:push:{placement.task_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return placement

    async def _push(self, placement: core.Placement) -> None:
        try:
            await self.executor.start(placement, self.on_progress)
        except Exception as exc:
            log.warning("pushed task %s replica %d could not be started: %s", placement.task_id, placement.replica, exc)
            self.book = core.start_failed(self.book, placement.key, str(exc) or type(exc).__name__)

    async def stop_task(self, task_id: str) -> bool:
        """The master's DELETE /tasks/{id}: every replica goes now, and nothing of it is remembered."""
        self.book = core.forget_task(self.book, task_id)
        intent = exits.stop_asked(self.book.marks, (task_id, exits.ALL_REPLICAS), self.clock())
        self.book = replace(self.book, marks=intent)
        return bool(await self.executor.stop(task_id))

    def restarts(self, key: Key) -> int:
        return self.book.restart_count(key)

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._worker, self._watcher, *self._background) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# --- the loop ----------------------------------------------------------------------------------


class HeartbeatLoop:
    """Beats to the master in the miner's state while the node is active in the run (else idles)."""

    def __init__(
        self,
        *,
        client: Any,
        converger: Converger,
        store: MinerStore,
        health: LoopHealth,
        idle_interval_s: float = 2.0,
        default_interval_s: float = 5.0,
        max_backoff_s: float = 60.0,
        min_stale_s: float = 120.0,
        counter: Any = None,
        still_master: Callable[[str], Awaitable[bool]] | None = None,
        stale_reports_s: float | None = None,
    ) -> None:
        self.client = client
        # Asked before an answer is obeyed: is the master that signed it still a master of the run
        # on chain (ChainPermissions.is_master, briefly cached)? None: not checked (unit tests).
        self.still_master = still_master
        self.converger = converger
        self.store = store
        self.health = health
        self.idle_interval_s = idle_interval_s
        self.interval_s = default_interval_s
        self.max_backoff_s = max_backoff_s
        self.min_stale_s = min_stale_s
        self.counter = counter
        self._wake = asyncio.Event()
        self.beats = 0
        # Set by the node when the chain (or an accepted invite) says it is active in the run:
        # a master URL left over from an earlier membership is not a reason to beat.
        self.active = False
        self.on_beat: Callable[[HeartbeatResponse], None] | None = None
        # A slow or unreachable engine does not hold heartbeats back: a beat waits for the node's
        # snapshot at most half an interval, then sends the last reports, while they are at most
        # ``stale_reports_s`` old (default: 3 intervals, at least 30 s); after that it fails, so a
        # node whose engine is gone for good goes Dead at the master and its replicas move.
        self.stale_reports_s = stale_reports_s
        self._snapshot: asyncio.Future[Any] | None = None
        self._last_reports: tuple[tuple[ReplicaReport, ...], float] | None = None
        self._stale_logged = False

    def wake(self) -> None:
        """Beat now (e.g. right after an invite was accepted)."""
        self._wake.set()

    def _request(self, reports: tuple[ReplicaReport, ...]) -> HeartbeatRequest:
        return HeartbeatRequest(tasks=reports, gpus=gpu_samples(self.converger.node_gpus), load=load_sample(),
                                task_ports=self.converger.task_ports)

    async def reports(self) -> tuple[ReplicaReport, ...]:
        """The node's replica reports from a fresh snapshot, or (Docker slow or away) the last ones."""
        if self._snapshot is None:
            self._snapshot = asyncio.ensure_future(self.converger.executor.snapshot())
        wait = max(0.2, self.interval_s / 2)
        done, _ = await asyncio.wait({self._snapshot}, timeout=wait)
        problem: BaseException
        if done:
            task, self._snapshot = self._snapshot, None
            try:
                snapshot = task.result()
            except Exception as exc:  # the engine is not reachable
                problem = exc
            else:
                reports = tuple(core.reports(snapshot, self.converger.book))
                self._last_reports = (reports, time.monotonic())
                if self._stale_logged:
                    log.info("the node's containers are listed again; heartbeats report them fresh")
                self._stale_logged = False
                return reports
        else:
            problem = TimeoutError(f"listing the node's containers took more than {wait:g} s")
        limit = self.stale_reports_s if self.stale_reports_s is not None else max(30.0, 3 * self.interval_s)
        if self._last_reports is None or time.monotonic() - self._last_reports[1] > limit:
            raise PeerError(f"the node's containers could not be listed for a heartbeat ({str(problem) or type(problem).__name__})")
        if not self._stale_logged:
            log.warning("heartbeats carry the last known replica states (for at most %g s): %s", limit,
                        str(problem) or type(problem).__name__)
            self._stale_logged = True
        return self._last_reports[0]

    async def beat(self) -> HeartbeatResponse | None:
        """One heartbeat (None when there is no master yet); raises on failure."""
        url, master = self.store.state.master_url, self.store.state.master
        if not url or not master or not self.active:
            return None
        request = self._request(await self.reports())
        # Addressed to the master the node joined, and its answer (which containers to run) must
        # be signed by that same key: nobody on the path can make this node run anything.
        answer = await self.client.request("POST", f"{url}/heartbeat", audience=master, json=request.to_json())
        if self.still_master is not None and not await self.still_master(master):
            raise PeerError(f"{master} is no longer a master of this run on chain; its heartbeat answer is not obeyed.")
        try:
            response = HeartbeatResponse.from_json(answer)
        except ValidationError as exc:
            raise PeerError(f"The master at {url} answered the heartbeat with a malformed body ({exc}).") from None
        self.converger.submit(response.desired)
        self.interval_s = response.interval_s
        self.beats += 1
        await self.store.heartbeat_ok(time.time(), response.interval_s, [r.to_json() for r in request.tasks])
        if self.on_beat is not None:
            self.on_beat(response)
        return response

    def _stale_after(self) -> float:
        return max(self.min_stale_s, 3 * self.interval_s + 30.0)

    async def run(self) -> None:
        """Beat forever; failures are retried sooner at first, then every interval (never slower)."""
        import random

        self.health.register(LOOP_NAME, self._stale_after())
        failures = 0
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wake.clear()
                began = loop.time()
                try:
                    response = await self.beat()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    message = str(exc) or type(exc).__name__
                    if self.counter is not None:
                        self.counter.labels("failed").inc()
                    self.health.failed(LOOP_NAME, message)
                    if failures == 1 or failures % 10 == 0:
                        log.warning("heartbeat to %s failed (%d in a row): %s", self.store.state.master_url, failures, message)
                    with contextlib.suppress(OSError):
                        await self.store.heartbeat_failed(message)
                    # Quick first retries, then one try per heartbeat interval, never slower: a master
                    # that comes back (or a path that heals) hears from this node within one interval,
                    # so it is never judged dead for this node's own backoff.
                    delay = min(self.max_backoff_s, self.interval_s, self.interval_s / 8 * 2 ** min(failures, 16))
                    delay *= random.uniform(0.8, 1.0)
                else:
                    if failures:
                        log.info("heartbeats to %s work again", self.store.state.master_url)
                    failures = 0
                    if response is not None and self.counter is not None:
                        self.counter.labels("ok").inc()
                    self.health.tick(LOOP_NAME)
                    self.health.loops[LOOP_NAME].stale_after_s = self._stale_after()
                    delay = next_beat_in(self.interval_s, loop.time() - began) if response is not None \
                        else self.idle_interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
        finally:
            self.health.unregister(LOOP_NAME)
            if self._snapshot is not None:
                self._snapshot.cancel()


def next_beat_in(interval_s: float, took_s: float) -> float:
    """Seconds until the next heartbeat: one interval after the last one began (the time a beat
    takes is not added to the interval the master counts missed heartbeats in)."""
    return min(interval_s, max(0.0, interval_s - took_s))
