"""Heartbeats to the master, and converging the node's containers on what it asks for.

Each beat reports the node's replicas (from Docker, through the executor), a sample of
its GPUs and its load; the master answers with the full list of replicas the node should
run and when to beat next. Converging on that list runs in the background (an image pull
can take minutes, heartbeats must not wait for it): a newer list replaces an older one
that has not been started yet.

GPU indices in the master's messages are positions in the GPUs this node offers
(``--gpu``: the master only knows a count), mapped here to the NVML indices of the cards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psutil

from prime import hardware
from prime.errors import PeerError
from prime.protocol.errors import ValidationError
from prime.protocol.heartbeat import DesiredReplica, GpuSample, HeartbeatRequest, HeartbeatResponse, ReplicaReport
from prime.protocol.tasks import MAX_ERROR_LENGTH, MAX_REPLICAS, MAX_REPORTED_TASKS, ReplicaState, is_task_id
from prime.roles.miner.executor import InvalidTaskSpec, ProgressCallback, TaskState, TaskStatus
from prime.roles.miner.executor import TaskSpec as ExecutorSpec
from prime.roles.miner.state import MinerState, StateFile
from prime.web import LoopHealth

log = logging.getLogger(__name__)

Key = tuple[str, int]
LOOP_NAME = "heartbeat"


# --- pure conversions --------------------------------------------------------------------------


def physical_gpus(positions: Sequence[int], node_gpus: Sequence[int]) -> list[int]:
    """The NVML indices for the master's GPU positions; ``InvalidTaskSpec`` if one is not offered."""
    out = []
    for position in positions:
        if not 0 <= position < len(node_gpus):
            raise InvalidTaskSpec(
                f"The master assigned GPU {position} but this node offers only {len(node_gpus)} GPU(s)."
            )
        out.append(node_gpus[position])
    return out


def executor_spec(desired: DesiredReplica, node_gpus: Sequence[int]) -> ExecutorSpec:
    """The executor's spec for one desired replica (``InvalidTaskSpec`` if it cannot run here).

    The attempt goes into the environment: a replica placed here again after it was
    rescheduled is a new container, never the old one brought back.
    """
    spec = desired.spec
    env = dict(spec.env)
    env["PRIME_ATTEMPT"] = str(desired.attempt)
    return ExecutorSpec(
        task_id=desired.id,
        image=spec.image,
        command=list(spec.command),
        env=env,
        gpus=physical_gpus(desired.gpu_indices, node_gpus),
        replica=desired.replica,
        persistent=spec.persistent,
        cpu_limit=spec.cpu_limit,
        memory_limit_mib=spec.memory_limit_mib,
        restart=spec.restart.value,
    )


def report_state(status: TaskStatus, spec: ExecutorSpec | None) -> ReplicaState:
    """The state to report; a failed container that will be restarted (on-failure) is not final yet."""
    if status.state is TaskState.FAILED and spec is not None and spec.restart == "on-failure":
        if spec.max_restarts is None or status.restarts < spec.max_restarts:
            return ReplicaState.PULLING
    return ReplicaState(status.state.value)


def replica_reports(
    statuses: Iterable[TaskStatus], specs: Iterable[ExecutorSpec], invalid: dict[Key, str] | None = None
) -> list[ReplicaReport]:
    """Heartbeat entries for the node's replicas (only those the master's wire can name)."""
    by_key = {spec.key: spec for spec in specs}
    reports: dict[Key, ReplicaReport] = {}
    for status in statuses:
        key = (status.task_id, status.replica)
        if not is_task_id(status.task_id) or not 0 <= status.replica < MAX_REPLICAS:
            continue  # not a task of the master's (its id could not be named on the wire)
        error = status.reason[:MAX_ERROR_LENGTH] if status.reason else None
        reports[key] = ReplicaReport(status.task_id, status.replica, report_state(status, by_key.get(key)), status.exit_code, error)
    for (task_id, replica), reason in (invalid or {}).items():
        if (task_id, replica) not in reports and is_task_id(task_id) and 0 <= replica < MAX_REPLICAS:
            reports[(task_id, replica)] = ReplicaReport(task_id, replica, ReplicaState.FAILED, None, reason[:MAX_ERROR_LENGTH])
    return sorted(reports.values(), key=lambda r: (r.id, r.replica))[:MAX_REPORTED_TASKS]


def gpu_samples(node_gpus: Sequence[int]) -> tuple[GpuSample, ...]:
    """One sample per offered GPU, indexed by its position (as the master knows it)."""
    if not node_gpus:
        return ()
    samples = hardware.gpu_sample(list(node_gpus))
    return tuple(
        GpuSample(position, _clamp(s.utilization_pct, 0, 100), _clamp(s.memory_used_mib, 0, None), _clamp(s.temperature_c, -100, 300))
        for position, s in enumerate(samples)
    )


def _clamp(value: int | None, low: float, high: float | None) -> float | None:
    if value is None:
        return None
    value = max(low, float(value))
    return min(high, value) if high is not None else value


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
    """Brings the node's containers to the master's desired list, in the background.

    Undesired replicas that still run are stopped; undesired ones that finished are kept
    for ``retention_s`` (their logs stay readable to the master) and then removed. A replica
    the master pushed (POST /tasks) is not stopped for ``push_grace_s`` even if a heartbeat
    answer computed before the push does not list it yet.
    """

    def __init__(
        self,
        executor: Any,
        node_gpus: Sequence[int],
        *,
        retention_s: float = 3600.0,
        push_grace_s: float = 30.0,
        on_progress: ProgressCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.executor = executor
        self.node_gpus = list(node_gpus)
        self.retention_s = retention_s
        self.push_grace_s = push_grace_s
        self.on_progress = on_progress
        self.clock = clock
        self.invalid: dict[Key, str] = {}  # desired replicas that cannot run here, and why
        self._finished_since: dict[Key, float] = {}
        self._pushed_at: dict[Key, float] = {}
        self._pending: list[DesiredReplica] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.rounds = 0

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
            except Exception:  # Docker down, ...: the next heartbeat tries again
                log.exception("converging on the master's desired tasks failed")

    def specs_for(self, desired: Sequence[DesiredReplica]) -> dict[Key, ExecutorSpec]:
        specs: dict[Key, ExecutorSpec] = {}
        for entry in desired:
            key = (entry.id, entry.replica)
            try:
                specs[key] = executor_spec(entry, self.node_gpus)
                self.invalid.pop(key, None)
            except (InvalidTaskSpec, ValueError) as exc:
                self.invalid[key] = str(exc)
        return specs

    async def converge(self, desired: Sequence[DesiredReplica]) -> list[TaskStatus]:
        wanted = self.specs_for(desired)
        wanted_keys = set(wanted) | {(d.id, d.replica) for d in desired}
        for key in list(self.invalid):
            if key not in wanted_keys:
                del self.invalid[key]
        now = self.clock()
        known = {spec.key: spec for spec in self.executor.known_specs()}
        for status in await self.executor.list_states():
            key = (status.task_id, status.replica)
            if key in wanted:
                self._finished_since.pop(key, None)
                continue
            pushed = self._pushed_at.get(key)
            if pushed is not None and now - pushed < self.push_grace_s:
                continue
            self._pushed_at.pop(key, None)
            spec = known.get(key)
            finished = status.state in (TaskState.COMPLETED, TaskState.FAILED)
            restartable = spec is not None and spec.restart == "on-failure"
            if finished and not restartable:
                since = self._finished_since.setdefault(key, now)
                if now - since < self.retention_s:
                    continue  # keep its container (and logs) a while
            log.info("stopping task %s replica %d: the master no longer lists it", status.task_id, status.replica)
            await self.executor.stop(status.task_id, status.replica)
            self._finished_since.pop(key, None)
        results = await asyncio.gather(
            *(self.executor.ensure_running(spec, self.on_progress) for spec in wanted.values()), return_exceptions=True
        )
        statuses = []
        for spec, result in zip(wanted.values(), results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                log.warning("task %s replica %d could not be started: %s", spec.task_id, spec.replica, result)
                self.invalid[spec.key] = str(result) or type(result).__name__
                continue
            statuses.append(result)
        self.rounds += 1
        return statuses

    def push(self, desired: DesiredReplica) -> ExecutorSpec:
        """Start one replica now (master's POST /tasks); ``InvalidTaskSpec`` if it cannot run here."""
        spec = executor_spec(desired, self.node_gpus)
        self._pushed_at[spec.key] = self.clock()
        self.invalid.pop(spec.key, None)
        task = asyncio.create_task(self._push(spec), name=f"miner:push:{spec.task_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return spec

    async def _push(self, spec: ExecutorSpec) -> None:
        try:
            await self.executor.ensure_running(spec, self.on_progress)
        except Exception as exc:
            log.warning("pushed task %s replica %d could not be started: %s", spec.task_id, spec.replica, exc)
            self.invalid[spec.key] = str(exc) or type(exc).__name__

    def forget_push(self, task_id: str) -> None:
        for key in [k for k in self._pushed_at if k[0] == task_id]:
            del self._pushed_at[key]

    async def close(self) -> None:
        tasks = [t for t in (self._worker, *self._background) if t is not None and not t.done()]
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
        executor: Any,
        converger: Converger,
        state: MinerState,
        state_file: StateFile,
        health: LoopHealth,
        idle_interval_s: float = 2.0,
        default_interval_s: float = 5.0,
        max_backoff_s: float = 60.0,
        min_stale_s: float = 120.0,
        counter: Any = None,
    ) -> None:
        self.client = client
        self.executor = executor
        self.converger = converger
        self.state = state
        self.state_file = state_file
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

    def wake(self) -> None:
        """Beat now (e.g. right after an invite was accepted)."""
        self._wake.set()

    def build_request(self, statuses: Sequence[TaskStatus]) -> HeartbeatRequest:
        reports = replica_reports(statuses, self.executor.known_specs(), self.converger.invalid)
        return HeartbeatRequest(tuple(reports), gpu_samples(self.converger.node_gpus), load_sample())

    async def beat(self) -> HeartbeatResponse | None:
        """One heartbeat (None when there is no master yet); raises on failure."""
        url = self.state.master_url
        if not url or not self.active:
            return None
        request = self.build_request(await self.executor.list_states())
        answer = await self.client.request("POST", f"{url}/heartbeat", json=request.to_json())
        try:
            response = HeartbeatResponse.from_json(answer)
        except ValidationError as exc:
            raise PeerError(f"The master at {url} answered the heartbeat with a malformed body ({exc}).") from None
        self.converger.submit(response.desired)
        self.interval_s = response.interval_s
        self.beats += 1
        self.state.last_heartbeat_at = time.time()
        self.state.last_heartbeat_error = None
        self.state.heartbeat_interval_s = response.interval_s
        self.state.tasks = [r.to_json() for r in request.tasks]
        self.state_file.save(self.state)
        if self.on_beat is not None:
            self.on_beat(response)
        return response

    def _stale_after(self) -> float:
        return max(self.min_stale_s, 3 * self.interval_s + 30.0)

    async def run(self) -> None:
        """Beat forever; failures back off exponentially (with jitter) up to ``max_backoff_s``."""
        import random

        self.health.register(LOOP_NAME, self._stale_after())
        failures = 0
        try:
            while True:
                self._wake.clear()
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
                        log.warning("heartbeat to %s failed (%d in a row): %s", self.state.master_url, failures, message)
                    self.state.last_heartbeat_error = message
                    with contextlib.suppress(OSError):
                        self.state_file.save(self.state)
                    delay = min(self.max_backoff_s, self.interval_s * 2 ** min(failures, 16)) * random.uniform(0.8, 1.2)
                else:
                    if failures:
                        log.info("heartbeats to %s work again", self.state.master_url)
                    failures = 0
                    if response is not None and self.counter is not None:
                        self.counter.labels("ok").inc()
                    self.health.tick(LOOP_NAME)
                    self.health.loops[LOOP_NAME].stale_after_s = self._stale_after()
                    delay = self.interval_s if response is not None else self.idle_interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
        finally:
            self.health.unregister(LOOP_NAME)
