"""The master service: drives the pure core (``state.handle``) and carries out what it says.

Every change goes through ``MasterService.apply(event)``: ``handle`` updates the state, the
changes are flushed to SQLite at once (so kill -9 loses nothing; see ``apply``), then the
instructions are carried out. Transitions are logged and counted; network work (invites, task
pushes, storage syncs) runs as background tasks under one concurrency limit, so no peer can
stall the loop or a heartbeat, and the event an effect produced (InviteSent, SyncFailed ...) is
applied in turn. ``apply`` never awaits: handlers and loops on the one event loop cannot
interleave inside it.

The effects come in at construction (``MasterEffects``): ``server.py`` wires the real ones
(signed HTTP to miners, the blob store, the chain); a test passes in-memory ones and runs the
whole service, HTTP API included, in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prime.chain.types import Specs
from prime.errors import PeerError, PrimeError
from prime.protocol.heartbeat import DesiredReplica, HeartbeatRequest, HeartbeatResponse
from prime.protocol.tasks import Task
from prime.roles.master.metrics import MasterMetrics
from prime.roles.master.state import (
    Event,
    HeartbeatReceived,
    HeartbeatRefused,
    Instruction,
    InviteFailed,
    InviteSent,
    MasterState,
    NodeJoinedOnChain,
    NodeUrlResolved,
    RecordGroupTransition,
    RecordReplicaTransition,
    RecordTransition,
    RecordViewGap,
    RunEnded,
    SendInvite,
    StartReplica,
    StateConfig,
    StopReplica,
    SyncFailed,
    SyncRound,
    SyncStorage,
    SyncSucceeded,
    TaskCreated,
    TaskRefused,
    TaskStopRequested,
    Tick,
    desired_entry,
    handle,
    heartbeat_refusal,
    heartbeat_response,
    invite_is_current,
)
from prime.roles.master.store import MasterStore

log = logging.getLogger("prime.master")

# Heartbeats that change nothing but recency are written together, at most this long after.
HEARTBEAT_FLUSH_S = 1.0


@dataclass(frozen=True)
class MasterSettings:
    run_id: int
    public_url: str
    data_dir: Path
    state: StateConfig = StateConfig()
    sync_interval_s: float = 10.0
    poll_interval_s: float = 2.0
    peer_timeout_s: float = 10.0
    concurrency: int = 32
    eject_after_s: float = 300.0  # a node Dead this long is ejected on chain (ejection.py); 0: never

    @property
    def tick_interval_s(self) -> float:
        """How often node health is re-judged: half the heartbeat interval, at most every 0.4 s (a
        node is judged Dead well within 0.5 s of its window: the goal is within 3 intervals + 1 s)."""
        return max(0.2, min(0.4, self.state.heartbeat_interval_s / 2))


class HeartbeatDenied(PrimeError):
    """The signer may not heartbeat to this master (not a member of the run)."""


class MasterEffects(Protocol):
    """What the service does to the world. Each effect that the core waits for returns the event
    it produced; pushes are best effort (PeerError on failure: the next heartbeat brings it)."""

    async def send_invite(self, ins: SendInvite) -> InviteSent | InviteFailed:
        """Sign the invite, find the node, POST it, check the signed ack."""
        ...

    async def push_start(self, node: str, desired: DesiredReplica) -> None:
        """POST {miner}/tasks with the replica's desired entry."""
        ...

    async def push_stop(self, node: str, task_id: str) -> None:
        """DELETE {miner}/tasks/{id} (every replica of the task on that node)."""
        ...

    async def sync_storage(self, ins: SyncStorage) -> SyncSucceeded | SyncFailed:
        """Copy the replica's manifest and missing blobs into the blob store."""
        ...

    async def chain_member(self, node: str) -> Specs | None:
        """The node's specs when the chain says it is an active member of this run, else None
        (ChainError when the chain cannot be read)."""
        ...


class MasterService:
    def __init__(
        self,
        settings: MasterSettings,
        state: MasterState,
        store: MasterStore,
        metrics: MasterMetrics,
        effects: MasterEffects,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.state = state
        self.store = store
        self.metrics = metrics
        self.effects = effects
        self.clock = clock
        self._limit = asyncio.Semaphore(settings.concurrency)
        self._background: set[asyncio.Task[Any]] = set()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._batching = False

    @property
    def run_id(self) -> int:
        return self.settings.run_id

    # --- the one way state changes ------------------------------------------------------------

    def apply(self, event: Event) -> list[Instruction]:
        """Apply ``event``, store the result, carry out the instructions (network work in the background).

        Every change is written at once, with one exception: a heartbeat that changed nothing but
        the node's last-heartbeat time and sample is written within ``HEARTBEAT_FLUSH_S`` together
        with the others of that moment (one SQLite commit for many heartbeats). A crash loses at most
        that much heartbeat recency, which decides nothing: a restarted master judges health from its
        own start (MasterStarted) and the next heartbeat.
        """
        instructions = handle(self.state, event)
        if self._batching:
            pass  # written by whoever opened the batch (the chain watcher, with its cursor)
        elif instructions or not isinstance(event, HeartbeatReceived):
            self.flush()
        else:
            self._flush_soon()
        for ins in instructions:
            self._carry_out(ins)
        return instructions

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Apply many events with no write of their own: the caller writes them all at once after.

        The chain watcher catching up on thousands of events moves its cursor (which writes the
        state in the same transaction) right after the batch; one commit per event would make a
        new master on a large run spend a minute in SQLite.
        """
        self._batching = True
        try:
            yield
        finally:
            self._batching = False

    def flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self.store.flush(self.state)

    def _flush_soon(self) -> None:
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(HEARTBEAT_FLUSH_S, self.flush)

    def _carry_out(self, ins: Instruction) -> None:
        if isinstance(ins, RecordTransition):
            log.info("node %s: %s -> %s (%s)", ins.node, ins.old.value if ins.old else "new", ins.new.value, ins.reason)
            self.metrics.node_transition(ins.old, ins.new)
        elif isinstance(ins, RecordReplicaTransition):
            log.info("task %s replica %d on %s: %s -> %s (%s)", ins.task_id, ins.replica, ins.node or "-",
                     ins.old.value, ins.new.value, ins.reason)
            self.metrics.replica_transition(ins.old, ins.new)
        elif isinstance(ins, RecordGroupTransition):
            log.info("task %s group attempt %d: %s -> %s (%s)", ins.task_id, ins.attempt, ins.old.value, ins.new.value,
                     ins.reason)
        elif isinstance(ins, SendInvite):
            self.spawn(f"invite {ins.node}", self._invite(ins))
        elif isinstance(ins, StartReplica):
            self.spawn(f"start {ins.task_id}/{ins.replica}", self._push_start(ins))
        elif isinstance(ins, StopReplica):
            self.spawn(f"stop {ins.task_id}/{ins.replica}", self._push_stop(ins))
        elif isinstance(ins, SyncStorage):
            # Syncs may move a lot of data: they wait for a slot of their own (StorageSync's limit),
            # never for one of the invites and pushes.
            self.spawn(f"sync {ins.task_id}/{ins.replica}", self._sync(ins), limited=False)
        elif isinstance(ins, RecordViewGap):
            log.warning("the master's own view had a gap of %.1f s (stalled, paused or the clock jumped): "
                        "node health windows restart now", ins.until - ins.since)
        elif isinstance(ins, (HeartbeatRefused, TaskRefused)):
            pass  # the HTTP layer answers it

    # --- background work ----------------------------------------------------------------------

    def spawn(self, name: str, work: Coroutine[Any, Any, Any], *, limited: bool = True) -> None:
        """Run ``work`` in the background under the shared concurrency limit (``limited``; work
        with a limit of its own, like storage syncs, passes False); errors are logged."""

        async def under_limit() -> None:
            async with self._limit:
                await work

        task = asyncio.get_running_loop().create_task(under_limit() if limited else work, name=name)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background %s failed", task.get_name(), exc_info=task.exception())

    @property
    def background_count(self) -> int:
        return len(self._background)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.flush()

    async def _invite(self, ins: SendInvite) -> None:
        if not invite_is_current(self.state, ins):
            # overtaken while it waited for its turn (joined, left, re-invited, or the run ended)
            self.metrics.invites.labels("skipped").inc()
            return
        result = await self.effects.send_invite(ins)
        if isinstance(result, InviteFailed):
            self.metrics.invites.labels("failed").inc()
            log.warning("invite to %s failed: %s", ins.node, result.error)
        else:
            self.metrics.invites.labels("sent").inc()
        self.apply(result)

    async def _sync(self, ins: SyncStorage) -> None:
        try:
            result = await self.effects.sync_storage(ins)
        except Exception as exc:  # the core must hear of it, or the replica is never synced again
            self.apply(SyncFailed(ins.node, ins.task_id, ins.replica, ins.final, self.clock(), repr(exc)))
            raise
        self.apply(result)

    def desired_entry(self, task_id: str, replica: int, node: str) -> DesiredReplica | None:
        return desired_entry(self.state, task_id, replica, node)

    async def _push_start(self, ins: StartReplica) -> None:
        desired = desired_entry(self.state, ins.task_id, ins.replica, ins.node)
        if desired is None:
            return
        try:
            await self.effects.push_start(ins.node, desired)
        except PeerError as exc:
            self.metrics.pushes.labels("start", "failed").inc()
            log.info("push of task %s replica %d to %s failed (its next heartbeat brings it): %s",
                     ins.task_id, ins.replica, ins.node, exc)
            return
        self.metrics.pushes.labels("start", "ok").inc()

    async def _push_stop(self, ins: StopReplica) -> None:
        try:
            await self.effects.push_stop(ins.node, ins.task_id)
        except PeerError as exc:
            self.metrics.pushes.labels("stop", "failed").inc()
            log.info("stop of task %s on %s failed (its next heartbeat stops it): %s", ins.task_id, ins.node, exc)
            return
        self.metrics.pushes.labels("stop", "ok").inc()

    # --- requests -------------------------------------------------------------------------------

    async def heartbeat(self, node: str, payload: HeartbeatRequest) -> HeartbeatResponse:
        """Apply a member's heartbeat and return the answer.

        A node the master does not know as a member is looked up on chain (it may have joined a
        moment ago, or while the master was down) and adopted if active; otherwise HeartbeatDenied
        and nothing changes.
        """
        if heartbeat_refusal(self.state, node) is not None:
            specs = await self.effects.chain_member(node)
            if specs is not None and heartbeat_refusal(self.state, node) is not None:
                self.apply(NodeJoinedOnChain(node, self.clock(), specs=specs))
        reason = heartbeat_refusal(self.state, node)
        if reason is not None:
            raise HeartbeatDenied(reason)
        started = time.perf_counter()
        for ins in self.apply(HeartbeatReceived(node, self.clock(), payload)):
            if isinstance(ins, HeartbeatRefused):
                raise HeartbeatDenied(ins.reason)
        self.metrics.heartbeat_seconds.observe(time.perf_counter() - started)
        return heartbeat_response(self.state, node)

    def url_resolved(self, node: str, url: str) -> None:
        self.apply(NodeUrlResolved(node, url, self.clock()))

    def known_url(self, node: str) -> str | None:
        rec = self.state.nodes.get(node)
        return rec.url if rec is not None else None

    @property
    def run_ended(self) -> bool:
        return self.state.run_ended

    def end_run(self) -> None:
        """The run ended on chain (read at start-up, or its RunEnded event)."""
        self.apply(RunEnded(self.clock()))

    def create_task(self, task: Task) -> TaskRefused | None:
        """Admit ``task`` (scheduled at once) or say why not (the core decides)."""
        for ins in self.apply(TaskCreated(task)):
            if isinstance(ins, TaskRefused):
                return ins
        return None

    def stop_task(self, task_id: str) -> None:
        self.apply(TaskStopRequested(task_id, self.clock()))

    def task(self, task_id: str) -> Task | None:
        return self.state.tasks.get(task_id)

    async def tick(self) -> None:
        self.apply(Tick(self.clock(), every_s=self.settings.tick_interval_s))

    async def sync_round(self) -> None:
        """Start every storage sync that is due (each runs in the background, so a slow or hung
        miner delays only its own replicas, never the round)."""
        self.apply(SyncRound(self.clock()))
