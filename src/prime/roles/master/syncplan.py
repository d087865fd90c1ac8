"""Storage sync decisions (pure): which persistent replicas to sync when, and what a result means.

The service carries out each ``SyncStorage`` (``sync.StorageSync``: manifest, missing blobs) and
feeds back ``SyncSucceeded`` or ``SyncFailed``. Per replica the core keeps a ``SyncMark``, stored
in ``master.sqlite`` with the rest of the state: failures in a row and when to try again (2, 4,
8 ... s, capped), final syncs attempted, and when the final one was done (then never again for
that attempt: a new attempt of the replica starts with fresh marks and gets its own final sync).
At most one sync per replica is in flight (``MasterState.syncing``, not stored: a restart
forgets what was in flight, and the next round asks again).

- A running (or lost) replica on a node that may still answer is synced every round.
- A finished one gets a final sync at once, then every round until done: the miner says the
  container finished (``miner_final``), or after ``final_sync_attempts`` syncs that say
  otherwise, or the miner has no data for it (404: nothing to copy).

A sync never erases (``dropped``): the synced copy of a replica is the union of what its copies
listed. Each synced file remembers the copy (``source``: the node whose per-replica /data listed
it last). A manifest adds and overwrites files; a file it does not list is dropped only when the
same copy listed it before (that copy deleted it), so an empty new attempt on another node, or one
whose node lost its disk, leaves everything already synced in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prime.protocol.nodes import NodeState
from prime.protocol.tasks import ReplicaState
from prime.roles.master.events import Instruction, SyncFailed, SyncRound, SyncStorage, SyncSucceeded

if TYPE_CHECKING:
    from prime.roles.master.state import MasterState

SyncKey = tuple[str, int]  # (task_id, replica)

# Nodes a running replica's data is fetched from (a Dead or Left node is not asked).
SYNC_NODE_STATES = frozenset({NodeState.HEALTHY, NodeState.JOINED, NodeState.UNHEALTHY})
SYNC_REPLICA_STATES = frozenset({ReplicaState.RUNNING, ReplicaState.LOST})


@dataclass
class SyncMark:
    failures: int = 0                 # failed syncs in a row
    next_at: float | None = None      # not before (after a failure)
    final_attempts: int = 0           # final syncs that went through but the miner said not final
    final_at: float | None = None     # the final sync is done
    files: int | None = None          # files of the final sync
    attempt: int = 0                  # the replica's attempt these marks are about

    @property
    def final_done(self) -> bool:
        return self.final_at is not None


def dropped(previous: dict[str, str | None], listed: set[str], source: str) -> list[str]:
    """The synced paths a manifest from ``source`` removes: those ``source`` listed last time
    (``previous``: path → the copy that last listed it, None for one synced before copies were
    recorded) and lists no more. Everything another copy listed stays."""
    return sorted(path for path, by in previous.items() if by == source and path not in listed)


def due(state: MasterState, now: float) -> list[SyncStorage]:
    """Every sync a round should start now (none for a replica already syncing or backing off)."""
    out = []
    for task in state.tasks.values():
        if not task.spec.persistent:
            continue
        for r in task.replicas:
            if r.node is None or (task.id, r.index) in state.syncing:
                continue
            mark = current_mark(state, (task.id, r.index))
            if mark is not None and mark.next_at is not None and now < mark.next_at:
                continue
            if r.state in SYNC_REPLICA_STATES:
                node = state.nodes.get(r.node)
                if node is not None and node.state in SYNC_NODE_STATES:
                    out.append(SyncStorage(r.node, task.id, r.index, final=False))
            elif r.is_final and not (mark is not None and mark.final_done):
                out.append(SyncStorage(r.node, task.id, r.index, final=True))
    return out


def on_round(state: MasterState, event: SyncRound) -> list[Instruction]:
    out: list[Instruction] = []
    for ins in due(state, event.now):
        state.syncing.add((ins.task_id, ins.replica))
        out.append(ins)
    return out


def final_sync(state: MasterState, node: str, task_id: str, replica: int) -> list[Instruction]:
    """The final sync of a replica that just finished, unless one is running or it is done already
    (a sync in flight now is followed by the final one at the next round)."""
    key = (task_id, replica)
    mark = current_mark(state, key)
    if key in state.syncing or (mark is not None and mark.final_done):
        return []
    state.syncing.add(key)
    return [SyncStorage(node, task_id, replica, final=True)]


def _attempt(state: MasterState, key: SyncKey) -> int | None:
    task = state.tasks.get(key[0])
    r = task.replica(key[1]) if task is not None else None
    return r.attempt if r is not None else None


def current_mark(state: MasterState, key: SyncKey) -> SyncMark | None:
    """The replica's mark, None when it is about an earlier attempt: a rescheduled or restarted
    replica gets its own syncs and its own final sync (its files merge over the earlier ones)."""
    mark = state.sync_marks.get(key)
    if mark is not None and mark.attempt != _attempt(state, key):
        return None
    return mark


def _mark(state: MasterState, key: SyncKey) -> SyncMark:
    state.dirty_sync.add(key)
    mark = current_mark(state, key)
    if mark is None:
        mark = state.sync_marks[key] = SyncMark(attempt=_attempt(state, key) or 0)
    return mark


def _from_elsewhere(state: MasterState, event: SyncSucceeded | SyncFailed) -> bool:
    """A late answer from a node the replica has left (its files are merged all the same)."""
    task = state.tasks.get(event.task_id)
    r = task.replica(event.replica) if task is not None else None
    return r is None or r.node != event.node


def on_succeeded(state: MasterState, event: SyncSucceeded) -> list[Instruction]:
    key = (event.task_id, event.replica)
    state.syncing.discard(key)
    existing = current_mark(state, key)
    if event.task_id not in state.tasks or (existing is not None and existing.final_done) or _from_elsewhere(state, event):
        return []  # a task the master does not know, a late answer after the final sync or from a node left
    mark = _mark(state, key)
    mark.failures, mark.next_at = 0, None
    if event.final:
        mark.final_attempts += 1
        if event.miner_final or mark.final_attempts >= state.config.final_sync_attempts:
            mark.final_at, mark.files, mark.final_attempts = event.at, event.files, 0
    return []


def on_failed(state: MasterState, event: SyncFailed) -> list[Instruction]:
    key = (event.task_id, event.replica)
    state.syncing.discard(key)
    existing = current_mark(state, key)
    if event.task_id not in state.tasks or (existing is not None and existing.final_done) or _from_elsewhere(state, event):
        return []
    mark = _mark(state, key)
    if event.final and event.not_found:
        mark.final_at, mark.files, mark.failures, mark.next_at = event.at, 0, 0, None
        return []  # the miner has no data for it (it never started, or its data is gone): nothing to copy
    mark.failures += 1
    mark.next_at = event.at + state.config.sync_retry_s(mark.failures)
    return []
