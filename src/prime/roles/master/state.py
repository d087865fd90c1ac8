"""The master's core: events in, instructions out, no I/O.

Modelled on dask/distributed's worker_state_machine: the service loops and HTTP handlers turn
what happens (a chain event, a heartbeat, a buyer request, the clock, an effect's result) into
an *event* (``events.py``), call ``handle(state, event)``, carry out the returned *instructions*
(send an invite, push a start or stop, sync storage, log a transition) and persist ``state``
(``MasterStore.flush``). ``handle`` mutates ``state`` in place and is deterministic: the same
state and events give the same result. The decisions live in three places:

- node lifecycle (``lifecycle.reconcile``: chain view + heartbeats -> node state, invites);
- placement and replica states (``scheduler``), task admission and stops (here);
- storage sync (``syncplan``: which replica when, retries, when the final sync is done).

Driving it (the service): ``state = store.load(config)``; ``handle(state, MasterStarted(now))``
(and ``RunEnded`` if the run ended on chain); follow the chain feeding NodeApprovedOnChain /
NodeJoinedOnChain / NodeLeftOnChain / NodeEjectedOnChain / RunEnded, and ``ChainSynced(now)`` once
a poll finds nothing left (no invites go out before that); a Tick every few seconds and a
SyncRound every sync interval; HTTP handlers feed HeartbeatReceived / TaskCreated /
TaskStopRequested; effects feed InviteSent / InviteFailed / SyncSucceeded / SyncFailed. Before
carrying out a ``SendInvite`` that waited for its turn, ask ``invite_is_current``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prime.chain.types import NodeStatus
from prime.protocol.errors import ValidationError
from prime.protocol.heartbeat import DesiredReplica, HeartbeatResponse
from prime.protocol.nodes import HOSTING_STATES, NodeRecord, NodeSample, NodeState
from prime.protocol.tasks import FINAL_REPLICA_STATES, PLACED_REPLICA_STATES, ReplicaState, Task, TaskSpec
from prime.roles.master import gangs, scheduler, syncplan
from prime.roles.master.events import (  # re-exported (__all__): the core's vocabulary
    ChainMember,
    ChainMembershipObserved,
    ChainSynced,
    Event,
    HeartbeatReceived,
    HeartbeatRefused,
    Instruction,
    InviteFailed,
    InviteSent,
    MastershipChanged,
    MasterStarted,
    NodeApprovedOnChain,
    NodeEjectedOnChain,
    NodeJoinedOnChain,
    NodeLeftOnChain,
    NodeUrlResolved,
    RecordGroupTransition,
    RecordReplicaTransition,
    RecordTransition,
    RecordViewGap,
    RunEnded,
    SendInvite,
    StartReplica,
    StopReplica,
    SyncFailed,
    SyncRound,
    SyncStorage,
    SyncSucceeded,
    TaskCreated,
    TaskRefused,
    TaskStopRequested,
    Tick,
)
from prime.roles.master.groups import GroupState
from prime.roles.master.lifecycle import Reconciliation, StateConfig, reconcile
from prime.roles.master.syncplan import SyncKey, SyncMark

__all__ = [
    "ChainMember", "ChainMembershipObserved", "ChainSynced", "Event", "HeartbeatReceived", "HeartbeatRefused",
    "Instruction", "InviteFailed", "InviteSent", "MastershipChanged", "MasterStarted", "MasterState", "NodeApprovedOnChain",
    "NodeEjectedOnChain", "NodeJoinedOnChain", "NodeLeftOnChain", "NodeUrlResolved", "Reconciliation",
    "RecordGroupTransition", "RecordReplicaTransition", "RecordTransition", "RecordViewGap", "RunEnded", "SendInvite", "StartReplica", "StateConfig",
    "StopReplica", "SyncFailed", "SyncKey", "SyncMark", "SyncRound", "SyncStorage", "SyncSucceeded",
    "TaskCreated", "TaskRefused", "TaskStopRequested", "Tick", "admission_refusal", "desired_entry", "handle",
    "heartbeat_refusal", "heartbeat_response", "invite_is_current", "may_heartbeat", "reconcile",
]

# --- state ----------------------------------------------------------------------------------------


@dataclass
class MasterState:
    """Everything the master knows. ``dirty_*`` name what changed since the last store flush."""

    config: StateConfig = field(default_factory=StateConfig)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    chain_cursor: int | None = None      # the event follower's cursor (opaque here), stored with the state
    sync_marks: dict[SyncKey, SyncMark] = field(default_factory=dict)  # storage sync bookkeeping (syncplan)
    groups: dict[str, GroupState] = field(default_factory=dict)  # group tasks' state machines (gangs), by task id
    # Runtime only (not stored):
    watching_since: float | None = None  # when this master's continuous view began: its start, or the end of a gap
    last_tick_at: float | None = None    # the previous Tick's time (gaps in the master's own view show there)
    chain_synced: bool = True            # False from MasterStarted until ChainSynced: no invites meanwhile
    run_ended: bool = False              # RunEnded (fed from the chain at every start): no invites, no new tasks
    is_master: bool = True               # False after MasterRemoved of this master (a start needs it on chain)
    syncing: set[SyncKey] = field(default_factory=set, repr=False, compare=False)  # SyncStorage in flight
    dirty_nodes: set[str] = field(default_factory=set, repr=False, compare=False)
    dirty_tasks: set[str] = field(default_factory=set, repr=False, compare=False)
    dirty_sync: set[SyncKey] = field(default_factory=set, repr=False, compare=False)
    dirty_cursor: bool = field(default=False, repr=False, compare=False)

    @property
    def may_invite(self) -> bool:
        return self.chain_synced and not self.run_ended and self.is_master

    def set_cursor(self, block: int) -> None:
        """Advance the chain cursor; it is stored by the next flush, in the same transaction as
        the state changes of the events up to that block (so a crash neither skips nor half-applies)."""
        self.chain_cursor = int(block)
        self.dirty_cursor = True


def may_heartbeat(state: MasterState, node: str) -> bool:
    """Whether ``node`` may heartbeat: the master knows it as a member of the run on chain."""
    return heartbeat_refusal(state, node) is None


def heartbeat_refusal(state: MasterState, node: str) -> str | None:
    """Why ``node`` may not heartbeat (one sentence), or None when it may."""
    rec = state.nodes.get(node)
    if rec is None:
        return "This node is not known to the master of this run; join the run on chain first."
    if rec.chain_status != NodeStatus.ACTIVE:
        return "This node is not a member of this run on chain; join the run with a master's invite first."
    return None


def heartbeat_response(state: MasterState, node: str) -> HeartbeatResponse:
    """The answer to a node's heartbeat: the interval and everything it should run."""
    desired = (gangs.desired(state, d) for d in scheduler.desired_for(state.tasks.values(), node))
    return HeartbeatResponse(state.config.heartbeat_interval_s, tuple(d for d in desired if d is not None))


def invite_is_current(state: MasterState, ins: SendInvite) -> bool:
    """Whether a ``SendInvite`` that waited for its turn should still go out: the node is still
    Invited with this very invite, and invites may still go out (the run has not ended, this master
    was not removed)."""
    rec = state.nodes.get(ins.node)
    return state.may_invite and rec is not None and rec.state == NodeState.INVITED \
        and rec.invite_expiry == ins.expiry


def desired_entry(state: MasterState, task_id: str, replica: int, node: str) -> DesiredReplica | None:
    """What to push for a ``StartReplica`` now (None: the replica moved, stopped or is gone meanwhile)."""
    task = state.tasks.get(task_id)
    r = task.replica(replica) if task is not None else None
    if task is None or r is None or task.stop_requested or r.node != node or r.state not in PLACED_REPLICA_STATES:
        return None
    return gangs.desired(state, DesiredReplica(task.id, r.index, r.attempt, r.gpu_indices, task.spec))


def admission_refusal(state: MasterState, spec: TaskSpec, task_id: str = "") -> TaskRefused | None:
    """Why a new task with a valid ``spec`` is not admitted, or None: 400 when no node of the run
    could ever hold it (judged on the nodes known now), 409 once the run ended."""
    try:
        scheduler.check_placeable(spec, state.nodes.values())
    except ValidationError as err:
        return TaskRefused(task_id, 400, "invalid_request", err.detail)
    if state.run_ended:
        return TaskRefused(task_id, 409, "run_ended", "This run has ended on chain; it takes no new tasks.")
    return None


# --- handle ---------------------------------------------------------------------------------------


def handle(state: MasterState, event: Event) -> list[Instruction]:
    """Apply ``event`` to ``state`` (in place) and return what the caller should do."""
    handler = _HANDLERS.get(type(event))
    if handler is None:
        raise TypeError(f"Unknown master event {type(event).__name__}.")
    return handler(state, event)


def _apply(state: MasterState, result: Reconciliation, at: float, *, schedule: bool = False) -> list[Instruction]:
    """Adopt reconciled records; take replicas off nodes that can no longer host them; schedule
    when that may place something (``schedule``, a node became Healthy, or replicas were freed)."""
    instructions = list(result.instructions)
    for address in result.changed:
        state.nodes[address] = result.nodes[address]
        state.dirty_nodes.add(address)
    for ins in result.instructions:
        if not isinstance(ins, RecordTransition):
            continue
        if ins.new == NodeState.HEALTHY:
            schedule = True
        if ins.old in HOSTING_STATES and ins.new not in HOSTING_STATES:
            changes = scheduler.release_node(state.tasks.values(), ins.node, at, f"node went {ins.new.value}")
            instructions.extend(_note_replicas(state, changes))
            gone = gangs.node_gone(state, ins.node, at)
            instructions.extend(gone)
            schedule = schedule or bool(changes) or bool(gone)
    if schedule:
        instructions.extend(_schedule(state, at))
    return instructions


def _reconcile_one(
    state: MasterState, node: str, at: float, *, chain: ChainMember | None = None, heartbeat: float | None = None
) -> list[Instruction]:
    own = {node: state.nodes[node]} if node in state.nodes else {}
    result = reconcile(
        own, {node: chain} if chain else {}, {node: heartbeat} if heartbeat is not None else {},
        at, state.config, watching_since=state.watching_since, may_invite=state.may_invite,
    )
    return _apply(state, result, at)


def _note_replicas(state: MasterState, changes: list[RecordReplicaTransition]) -> list[Instruction]:
    out: list[Instruction] = []
    for c in changes:
        state.dirty_tasks.add(c.task_id)
        out.append(c)
        task = state.tasks[c.task_id]
        if task.spec.persistent and c.new in FINAL_REPLICA_STATES and c.node is not None:
            out.extend(syncplan.final_sync(state, c.node, c.task_id, c.replica))
    return out


def _schedule(state: MasterState, at: float) -> list[Instruction]:
    # Groups first (oldest first): a gang takes all its nodes at once or none, so one that does not
    # fit holds nothing back, and one that does is not starved by the replicas behind it.
    out = gangs.schedule(state, at)
    waiting = [t for t in state.tasks.values() if not t.stop_requested and t.spec.group is None
               and any(r.state == ReplicaState.PENDING for r in t.replicas)]
    if not waiting:
        return out
    placements = scheduler.place(state.tasks.values(), state.nodes.values())
    changes = scheduler.apply_placements(state.tasks, placements, at)
    out.extend(_note_replicas(state, changes))
    out.extend(StartReplica(p.node, p.task_id, p.replica) for p in placements)
    return out


def _reconcile_all(
    state: MasterState, at: float, chain: Mapping[str, ChainMember] | None = None, *, schedule: bool = False
) -> list[Instruction]:
    result = reconcile(state.nodes, chain or {}, {}, at, state.config,
                       watching_since=state.watching_since, may_invite=state.may_invite)
    return _apply(state, result, at, schedule=schedule)


def _on_started(state: MasterState, event: MasterStarted) -> list[Instruction]:
    state.watching_since = event.at
    state.last_tick_at = event.at
    state.chain_synced = False
    return gangs.view_resumed(state, event.at) + _reconcile_all(state, event.at)


def _on_chain_synced(state: MasterState, event: ChainSynced) -> list[Instruction]:
    state.chain_synced = True
    return _reconcile_all(state, event.at)


def _on_mastership(state: MasterState, event: MastershipChanged) -> list[Instruction]:
    state.is_master = event.is_master
    return _reconcile_all(state, event.at)


def _on_approved(state: MasterState, event: NodeApprovedOnChain) -> list[Instruction]:
    chain = ChainMember(NodeStatus.APPROVED, event.specs, event.block)
    rec = state.nodes.get(event.node)
    if rec is not None and rec.state == NodeState.LEFT and event.block is not None and rec.chain_block is not None \
            and event.block > rec.chain_block:
        # Out of the run (ejected, left) and approved again since, after registering anew (issue 14):
        # a fresh record, invited like any approved node.
        del state.nodes[event.node]
        rec = None
    if rec is not None and rec.chain_status not in (None, NodeStatus.APPROVED):
        # A replayed approval must not move an Active/Left node back in its lifecycle.
        chain = ChainMember(rec.chain_status, event.specs, event.block)
    return _reconcile_one(state, event.node, event.at, chain=chain)


def _on_joined(state: MasterState, event: NodeJoinedOnChain) -> list[Instruction]:
    return _reconcile_one(state, event.node, event.at, chain=ChainMember(NodeStatus.ACTIVE, event.specs, event.block))


def _on_left(state: MasterState, event: NodeLeftOnChain | NodeEjectedOnChain) -> list[Instruction]:
    if event.node not in state.nodes:
        return []
    status = NodeStatus.LEFT if isinstance(event, NodeLeftOnChain) else NodeStatus.EJECTED
    return _reconcile_one(state, event.node, event.at, chain=ChainMember(status, None, event.block))


def _on_membership(state: MasterState, event: ChainMembershipObserved) -> list[Instruction]:
    return _reconcile_all(state, event.at, event.members)


def _on_run_ended(state: MasterState, event: RunEnded) -> list[Instruction]:
    if state.run_ended:
        return []
    state.run_ended = True
    out = _reconcile_all(state, event.at)
    # The run is over (issue 14): every task stops; a persistent replica gets its final sync once its
    # node reports it stopped, and logs stay readable. (Tasks stopped before stay as they are.)
    for task_id in sorted(state.tasks):
        out.extend(_on_stop(state, TaskStopRequested(task_id, event.at)))
    return out


def _stale_invite_result(rec: NodeRecord | None, expiry: int | None) -> bool:
    """A result that is not about the node's live invite (it joined, left or was re-invited meanwhile)."""
    if rec is None or rec.state != NodeState.INVITED:
        return True
    return expiry is not None and rec.invite_expiry is not None and rec.invite_expiry != expiry


def _on_invite_sent(state: MasterState, event: InviteSent) -> list[Instruction]:
    rec = state.nodes.get(event.node)
    if _stale_invite_result(rec, event.expiry):
        return []
    assert rec is not None
    rec.invite_expiry = event.expiry
    rec.invited_at = event.at
    if event.url:
        rec.url = event.url
    rec.last_error = None
    state.dirty_nodes.add(event.node)
    return _reconcile_one(state, event.node, event.at)


def _on_invite_failed(state: MasterState, event: InviteFailed) -> list[Instruction]:
    rec = state.nodes.get(event.node)
    if _stale_invite_result(rec, event.expiry):
        return []  # e.g. it joined meanwhile
    assert rec is not None
    rec.invite_expiry = None
    rec.invite_failures += 1
    rec.next_invite_at = event.at + state.config.invite_backoff_s(rec.invite_failures)
    rec.last_error = event.error[:1000]
    state.dirty_nodes.add(event.node)
    return _reconcile_one(state, event.node, event.at)


def _on_url(state: MasterState, event: NodeUrlResolved) -> list[Instruction]:
    rec = state.nodes.get(event.node)
    if rec is not None and rec.url != event.url:
        rec.url = event.url
        state.dirty_nodes.add(event.node)
    return []


def _on_heartbeat(state: MasterState, event: HeartbeatReceived) -> list[Instruction]:
    reason = heartbeat_refusal(state, event.node)
    if reason is not None:
        return [HeartbeatRefused(event.node, reason)]
    rec = state.nodes[event.node]
    rec.last_sample = NodeSample(event.at, event.payload.gpus, event.payload.load or {}, event.payload.task_ports)
    state.dirty_nodes.add(event.node)
    instructions = _reconcile_one(state, event.node, event.at, heartbeat=event.at)
    restarts = _restart_counts(state, event.node)
    changes = scheduler.apply_node_report(state.tasks.values(), event.node, event.payload.tasks, event.at)
    after = _restart_counts(state, event.node)
    state.dirty_tasks.update(key[0] for key, count in after.items() if restarts.get(key) != count)
    instructions.extend(_note_replicas(state, changes))
    members = gangs.report(state, event.node, event.payload.tasks, event.at)
    instructions.extend(members)
    changes.extend(c for c in members if isinstance(c, RecordReplicaTransition))
    if any(c.new in FINAL_REPLICA_STATES or c.new == ReplicaState.PENDING for c in changes):
        instructions.extend(_schedule(state, event.at))  # finished replicas free GPUs; lost ones are placed again
    return instructions


def _restart_counts(state: MasterState, node: str) -> dict[tuple[str, int], int]:
    """Restart counts of the replicas placed on ``node`` (to notice a heartbeat that changes one)."""
    return {(t.id, r.index): r.restarts for t in state.tasks.values() for r in t.replicas if r.node == node}


def _on_tick(state: MasterState, event: Tick) -> list[Instruction]:
    """The periodic catch-all. A Tick late by more than ``view_gap_s`` (or earlier than the last
    one: the clock went back) ends a gap in the master's own view: health windows restart at its
    time, exactly as after a restart, before anyone is judged."""
    out: list[Instruction] = []
    last, state.last_tick_at = state.last_tick_at, event.now
    if event.every_s is not None and last is not None:
        elapsed = event.now - last
        if elapsed < 0 or elapsed > state.config.view_gap_s(event.every_s):
            state.watching_since = event.now
            out.append(RecordViewGap(last, event.now))
            out.extend(gangs.view_resumed(state, event.now))
    out.extend(_reconcile_all(state, event.now, schedule=True))
    return out + gangs.tick(state, event.now)


def _on_task_created(state: MasterState, event: TaskCreated) -> list[Instruction]:
    task = event.task
    if task.id in state.tasks:
        return []  # idempotent
    refusal = admission_refusal(state, task.spec, task.id)
    if refusal is not None:
        return [refusal]
    state.tasks[task.id] = task
    state.dirty_tasks.add(task.id)
    if gangs.is_group(task):
        return gangs.created(state, task, task.created_at) + _schedule(state, task.created_at)
    return _schedule(state, task.created_at)


def _on_stop(state: MasterState, event: TaskStopRequested) -> list[Instruction]:
    task = state.tasks.get(event.task_id)
    if task is None or task.is_final or task.stop_requested:
        return []  # unknown, finished, or asked before: each stop goes out once
    state.dirty_tasks.add(task.id)
    out: list[Instruction] = gangs.stopped(state, task, event.at)
    changes, to_stop = scheduler.stop_task(task, event.at)
    out.extend(_note_replicas(state, changes))
    first: dict[str, int] = {}
    for node, index in to_stop:  # one DELETE per task and node stops all its replicas there
        first[node] = min(index, first.get(node, index))
    out.extend(StopReplica(node, task.id, index) for node, index in first.items())
    return out


_HANDLERS: dict[type, Callable[[MasterState, Any], list[Instruction]]] = {
    MasterStarted: _on_started,
    ChainSynced: _on_chain_synced,
    NodeApprovedOnChain: _on_approved,
    NodeJoinedOnChain: _on_joined,
    NodeLeftOnChain: _on_left,
    NodeEjectedOnChain: _on_left,
    ChainMembershipObserved: _on_membership,
    InviteSent: _on_invite_sent,
    InviteFailed: _on_invite_failed,
    RunEnded: _on_run_ended,
    MastershipChanged: _on_mastership,
    NodeUrlResolved: _on_url,
    HeartbeatReceived: _on_heartbeat,
    Tick: _on_tick,
    TaskCreated: _on_task_created,
    TaskStopRequested: _on_stop,
    SyncRound: syncplan.on_round,
    SyncSucceeded: syncplan.on_succeeded,
    SyncFailed: syncplan.on_failed,
}
