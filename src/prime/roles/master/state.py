"""The master's state machine: events in, instructions out, no I/O.

Modelled on dask/distributed's worker_state_machine: the service loops and HTTP handlers turn
what happens (a chain event, a heartbeat, a buyer request, the clock) into an *event*, call
``handle(state, event)``, carry out the returned *instructions* (send an invite, push a stop,
log a transition) and persist ``state`` (``MasterStore.flush``). ``handle`` mutates ``state`` in
place and is deterministic: the same state and events give the same result.

Node lifecycle (``NodeState``)::

    Approved --SendInvite--> Invited --joined on chain--> Joined --first heartbeat--> Healthy
       ^                       |                            |                          |   ^
       +-- InviteFailed -------+                            |  missed heartbeats       v   | heartbeat
           (retry after backoff; an expired invite          +-----------------> Unhealthy  |
            is re-sent at once)                                                    v       |
                                                                                  Dead ----+
    any state --left / ejected / rejected on chain--> Left (never invited again)

A Dead or Left node's unfinished replicas are rescheduled; an Unhealthy one keeps them.

All node-level decisions go through one pure function, ``reconcile``, which merges the three
views (the master's own records, on-chain membership, heartbeat recency). Chain events and
heartbeats update a record's view and then reconcile that node; ``Tick`` reconciles them all.

Driving it (the service): ``state = store.load(config)``; ``handle(state, MasterStarted(now))``;
follow the chain with ``EventFollower(cursor=StateCursor(state, store))`` feeding each event as
NodeApprovedOnChain / NodeJoinedOnChain / NodeLeftOnChain / NodeEjectedOnChain, and
``ChainSynced(now)`` once a poll finds nothing left (no invites go out before that); a Tick every
few seconds; HTTP handlers feed HeartbeatReceived / TaskCreated / TaskStopRequested. After each
``handle``: run the instructions (none block the caller's state), then ``store.flush(state)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Union

from prime.chain.types import NodeStatus, Specs
from prime.roles.master import scheduler
from prime.protocol.heartbeat import HeartbeatRequest, HeartbeatResponse
from prime.protocol.nodes import HOSTING_STATES, NodeRecord, NodeSample, NodeState
from prime.protocol.tasks import FINAL_REPLICA_STATES, ReplicaState, Task
from prime.roles.master.scheduler import RecordReplicaTransition

# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateConfig:
    """Timing of the node lifecycle. A node is Unhealthy after missing ``unhealthy_after_missed``
    heartbeats (plus ``grace_s`` for network jitter) and Dead after ``dead_after_missed``."""

    heartbeat_interval_s: float = 30.0
    unhealthy_after_missed: int = 2
    dead_after_missed: int = 10
    grace_s: float = 5.0
    invite_ttl_s: int = 600
    invite_backoff_base_s: float = 5.0
    invite_backoff_max_s: float = 600.0

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be more than 0.")
        if not 1 <= self.unhealthy_after_missed < self.dead_after_missed:
            raise ValueError("Need 1 <= unhealthy_after_missed < dead_after_missed.")
        if self.invite_ttl_s <= 0 or self.invite_backoff_base_s <= 0:
            raise ValueError("invite_ttl_s and invite_backoff_base_s must be more than 0.")

    @property
    def unhealthy_after_s(self) -> float:
        return self.heartbeat_interval_s * self.unhealthy_after_missed + self.grace_s

    @property
    def dead_after_s(self) -> float:
        return self.heartbeat_interval_s * self.dead_after_missed + self.grace_s

    def invite_backoff_s(self, failures: int) -> float:
        """Wait before the next invite after ``failures`` failed ones in a row: base * 2^(failures-1), capped."""
        if failures <= 0:
            return 0.0
        return min(self.invite_backoff_max_s, self.invite_backoff_base_s * 2 ** min(failures - 1, 60))


# --- events (what happened) ---------------------------------------------------------------------
# ``block`` on chain events: the block the fact was read at; a record ignores chain facts older
# than the last one it applied, so a stale snapshot cannot undo a newer event. None = always apply.


@dataclass(frozen=True)
class MasterStarted:
    """The master (re)started at ``at``: its own downtime must not count as missed heartbeats, and
    it sends no invites until ``ChainSynced`` says its chain view caught up (a node may have joined
    while it was down; re-inviting it from a stale view is wrong)."""

    at: float


@dataclass(frozen=True)
class ChainSynced:
    """The event follower has handled every chain event up to the chain head (after a restart:
    its first poll that came back with nothing left to read). Invites may go out again."""

    at: float


@dataclass(frozen=True)
class NodeApprovedOnChain:
    node: str
    specs: Specs
    at: float
    block: int | None = None


@dataclass(frozen=True)
class NodeJoinedOnChain:
    node: str
    at: float
    specs: Specs | None = None  # needed when the master has no record of the node (adoption)
    block: int | None = None


@dataclass(frozen=True)
class NodeLeftOnChain:
    node: str
    at: float
    block: int | None = None


@dataclass(frozen=True)
class NodeEjectedOnChain:
    node: str
    at: float
    block: int | None = None


@dataclass(frozen=True)
class ChainMember:
    """One node as the chain shows it now (for ``ChainMembershipObserved`` / ``reconcile``)."""

    status: NodeStatus
    specs: Specs | None = None
    block: int | None = None


@dataclass(frozen=True)
class ChainMembershipObserved:
    """A snapshot of on-chain status for some nodes (at startup, or a periodic cross-check).
    Nodes missing from ``members`` keep what the master knew."""

    members: Mapping[str, ChainMember]
    at: float


@dataclass(frozen=True)
class InviteSent:
    """The miner accepted the invite (expiry as signed; url where it was reached)."""

    node: str
    expiry: int
    at: float
    url: str | None = None


@dataclass(frozen=True)
class InviteFailed:
    node: str
    at: float
    error: str


@dataclass(frozen=True)
class NodeUrlResolved:
    """Discovery gave (a new) address for the node."""

    node: str
    url: str
    at: float


@dataclass(frozen=True)
class HeartbeatReceived:
    node: str
    at: float
    payload: HeartbeatRequest


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class TaskCreated:
    task: Task


@dataclass(frozen=True)
class TaskStopRequested:
    task_id: str
    at: float


Event = Union[
    MasterStarted, ChainSynced, NodeApprovedOnChain, NodeJoinedOnChain, NodeLeftOnChain, NodeEjectedOnChain,
    ChainMembershipObserved, InviteSent, InviteFailed, NodeUrlResolved, HeartbeatReceived, Tick,
    TaskCreated, TaskStopRequested,
]

# --- instructions (what the caller should do) -----------------------------------------------------


@dataclass(frozen=True)
class SendInvite:
    """Sign an invite for ``node`` with this ``expiry``, look its URL up in discovery (``url`` is the
    last known one), POST it; then feed InviteSent or InviteFailed."""

    node: str
    expiry: int
    url: str | None = None


@dataclass(frozen=True)
class RecordTransition:
    """A node changed state (log it, count it). ``old`` None: the master just learned of the node."""

    node: str
    old: NodeState | None
    new: NodeState
    reason: str


@dataclass(frozen=True)
class StartReplica:
    """Optional push so the node starts without waiting for its next heartbeat (POST {miner}/tasks)."""

    node: str
    task_id: str
    replica: int


@dataclass(frozen=True)
class StopReplica:
    """Push a stop (DELETE {miner}/tasks/{id}); the heartbeat's desired list stops it anyway."""

    node: str
    task_id: str
    replica: int


@dataclass(frozen=True)
class SyncStorage:
    """A persistent replica finished on ``node``: pull its manifest and missing blobs one last time."""

    node: str
    task_id: str
    replica: int


@dataclass(frozen=True)
class HeartbeatRefused:
    """The node may not heartbeat (not a member on chain); the HTTP layer answers 403 with ``reason``."""

    node: str
    reason: str


Instruction = Union[
    SendInvite, RecordTransition, RecordReplicaTransition, StartReplica, StopReplica, SyncStorage, HeartbeatRefused
]

# --- state ----------------------------------------------------------------------------------------


@dataclass
class MasterState:
    """Everything the master knows. ``dirty_*`` name what changed since the last store flush."""

    config: StateConfig = field(default_factory=StateConfig)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    chain_cursor: int | None = None      # the event follower's cursor (opaque here), stored with the state
    # Runtime only (not stored):
    watching_since: float | None = None  # when this master process started watching heartbeats
    chain_synced: bool = True            # False from MasterStarted until ChainSynced: no invites meanwhile
    dirty_nodes: set[str] = field(default_factory=set, repr=False, compare=False)
    dirty_tasks: set[str] = field(default_factory=set, repr=False, compare=False)
    dirty_cursor: bool = field(default=False, repr=False, compare=False)

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
    desired = scheduler.desired_for(state.tasks.values(), node)
    return HeartbeatResponse(state.config.heartbeat_interval_s, tuple(desired))


# --- reconciliation (the one place node states are decided) ------------------------------------


@dataclass
class Reconciliation:
    nodes: dict[str, NodeRecord]   # every record after reconciliation (new objects where changed)
    changed: set[str]              # addresses whose record changed
    instructions: list[Instruction]


_HEALTH_RANK = {NodeState.JOINED: 0, NodeState.HEALTHY: 0, NodeState.UNHEALTHY: 1, NodeState.DEAD: 2}


def _health_rank(age: float, config: StateConfig) -> int:
    if age <= config.unhealthy_after_s:
        return 0
    return 1 if age <= config.dead_after_s else 2


def reconcile(
    own_nodes: Mapping[str, NodeRecord],
    chain_members: Mapping[str, ChainMember],
    heartbeats: Mapping[str, float],
    now: float,
    config: StateConfig,
    *,
    watching_since: float | None = None,
    may_invite: bool = True,
) -> Reconciliation:
    """Merge the master's records, on-chain membership and heartbeat recency into node states.

    Pure: the inputs are not modified. ``chain_members`` and ``heartbeats`` may cover only some
    nodes; a record keeps its stored chain view / last heartbeat where they say nothing.
    ``watching_since`` (when this master started) keeps the master's own downtime from counting
    as missed heartbeats: it can keep a node's health as it was, never improve it. With
    ``may_invite`` False (chain view not caught up yet) invite bookkeeping is left as it is.

    - Active on chain: a member. No record (the master was down while it joined) -> adopted as
      Joined, awaiting its first heartbeat, never invited. Health follows heartbeat recency
      (Joined/Healthy -> Unhealthy -> Dead), and any fresh heartbeat brings it back to Healthy.
    - Approved on chain: invite it unless an invite is live; an expired invite is re-sent at once,
      a failed one after backoff (``next_invite_at``). A node that was Left stays Left.
    - Left / Ejected / Rejected / deregistered: Left, never invited again.
    """
    nodes = dict(own_nodes)
    changed: set[str] = set()
    instructions: list[Instruction] = []
    for address in sorted(set(own_nodes) | set(chain_members)):
        before = own_nodes.get(address)
        if before is not None and address not in chain_members and address not in heartbeats \
                and _settled_member(before, now, config, watching_since):
            continue  # the periodic pass over 10,000 healthy nodes must not copy each of them
        after, out = _reconcile_node(
            address, before, chain_members.get(address), heartbeats.get(address), now, config, watching_since,
            may_invite,
        )
        if after is None:
            continue
        if after != before:
            nodes[address] = after
            changed.add(address)
        instructions.extend(out)
    return Reconciliation(nodes, changed, instructions)


def _reconcile_node(
    address: str,
    before: NodeRecord | None,
    chain: ChainMember | None,
    heartbeat: float | None,
    now: float,
    config: StateConfig,
    watching_since: float | None,
    may_invite: bool = True,
) -> tuple[NodeRecord | None, list[Instruction]]:
    if before is None:
        if chain is None or chain.status not in (NodeStatus.APPROVED, NodeStatus.ACTIVE):
            return None, []  # nothing of ours
        rec = NodeRecord(address, NodeState.APPROVED, approved_at=now, state_since=now)
    else:
        rec = replace(before)
    old_state = before.state if before else None
    reason = ""

    # 1. chain view (newest wins)
    if chain is not None and (chain.block is None or rec.chain_block is None or chain.block >= rec.chain_block):
        if chain.status == NodeStatus.ACTIVE and rec.chain_status != NodeStatus.ACTIVE:
            rec.member_since = now
        rec.chain_status = chain.status
        if chain.block is not None:
            rec.chain_block = chain.block
        if chain.specs is not None:
            rec.hardware = chain.specs
    # 2. heartbeat view
    if heartbeat is not None and (rec.last_heartbeat is None or heartbeat > rec.last_heartbeat):
        rec.last_heartbeat = heartbeat

    instructions: list[Instruction] = []
    status = rec.chain_status
    if status == NodeStatus.ACTIVE:
        rec.invite_expiry = rec.next_invite_at = None
        rec.invite_failures = 0
        new_state, reason = _member_health(rec, now, config, watching_since)
    elif status == NodeStatus.APPROVED and rec.state != NodeState.LEFT and not may_invite:
        new_state = rec.state if before is not None else NodeState.APPROVED
        reason = "approved on chain; invite after the chain view caught up"
    elif status == NodeStatus.APPROVED and rec.state != NodeState.LEFT:
        new_state, reason, invite = _invite_step(rec, now, config)
        if invite is not None:
            instructions.append(invite)
    elif status is None:
        new_state = rec.state  # never seen on chain: nothing to decide
    else:
        new_state = NodeState.LEFT
        rec.invite_expiry = rec.next_invite_at = None
        reason = f"{status.label} on chain"

    if new_state != old_state:
        rec.state = new_state
        rec.state_since = now
        instructions.insert(0, RecordTransition(address, old_state, new_state, reason or "reconciled"))
    return rec, instructions


def _settled_member(rec: NodeRecord, now: float, config: StateConfig, watching_since: float | None) -> bool:
    """True when reconciling this record with no new chain or heartbeat news would change nothing.

    Exactly the no-op case of ``_reconcile_node`` for an active member: no invite bookkeeping
    left to clear and the health it would judge is the state it has.
    """
    if rec.chain_status != NodeStatus.ACTIVE or rec.invite_failures or rec.invite_expiry is not None \
            or rec.next_invite_at is not None:
        return False
    if rec.state == NodeState.HEALTHY and rec.last_heartbeat is not None \
            and now - rec.last_heartbeat <= config.unhealthy_after_s:
        return True  # the common case, decided without building anything
    return _member_health(rec, now, config, watching_since)[0] == rec.state


def _member_health(
    rec: NodeRecord, now: float, config: StateConfig, watching_since: float | None
) -> tuple[NodeState, str]:
    seen = [t for t in (rec.last_heartbeat, rec.member_since) if t is not None]
    last_seen = max(seen) if seen else now
    rank = _health_rank(now - last_seen, config)
    current = _HEALTH_RANK.get(rec.state)
    if watching_since is not None and current is not None:
        # The master was down before watching_since: judge no worse than its current health until
        # the node has had a full window since the restart.
        rank = min(rank, max(current, _health_rank(now - watching_since, config)))
    if rank == 2:
        return NodeState.DEAD, f"no heartbeat for {now - last_seen:.0f} s"
    if rank == 1:
        return NodeState.UNHEALTHY, f"no heartbeat for {now - last_seen:.0f} s"
    heartbeat_fresh = rec.last_heartbeat is not None and now - rec.last_heartbeat <= config.unhealthy_after_s
    if heartbeat_fresh or rec.state == NodeState.HEALTHY:
        return NodeState.HEALTHY, "heartbeat received" if heartbeat_fresh else "kept while the master restarted"
    return NodeState.JOINED, "joined on chain; waiting for its first heartbeat"


def _invite_step(rec: NodeRecord, now: float, config: StateConfig) -> tuple[NodeState, str, SendInvite | None]:
    if rec.invite_expiry is not None and now < rec.invite_expiry:
        return NodeState.INVITED, "invite live", None
    reason = "approved on chain"
    if rec.invite_expiry is not None:  # expired without a join: re-invite now
        rec.invite_expiry = None
        rec.next_invite_at = now
        reason = "invite expired without a join"
    if rec.next_invite_at is not None and now < rec.next_invite_at:
        return NodeState.APPROVED, f"next invite in {rec.next_invite_at - now:.0f} s", None
    expiry = int(math.ceil(now + config.invite_ttl_s))
    rec.invited_at = now
    rec.invite_expiry = expiry
    rec.next_invite_at = None
    rec.invites_sent += 1
    return NodeState.INVITED, f"invite sent ({reason})", SendInvite(rec.address, expiry, rec.url)


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
            schedule = schedule or bool(changes)
    if schedule:
        instructions.extend(_schedule(state, at))
    return instructions


def _reconcile_one(
    state: MasterState, node: str, at: float, *, chain: ChainMember | None = None, heartbeat: float | None = None
) -> list[Instruction]:
    own = {node: state.nodes[node]} if node in state.nodes else {}
    result = reconcile(
        own, {node: chain} if chain else {}, {node: heartbeat} if heartbeat is not None else {},
        at, state.config, watching_since=state.watching_since, may_invite=state.chain_synced,
    )
    return _apply(state, result, at)


def _note_replicas(state: MasterState, changes: list[RecordReplicaTransition]) -> list[Instruction]:
    out: list[Instruction] = []
    for c in changes:
        state.dirty_tasks.add(c.task_id)
        out.append(c)
        task = state.tasks[c.task_id]
        if task.spec.persistent and c.new in FINAL_REPLICA_STATES and c.node is not None:
            out.append(SyncStorage(c.node, c.task_id, c.replica))
    return out


def _schedule(state: MasterState, at: float) -> list[Instruction]:
    waiting = [t for t in state.tasks.values() if not t.stop_requested and any(r.state == ReplicaState.PENDING for r in t.replicas)]
    if not waiting:
        return []
    placements = scheduler.place(state.tasks.values(), state.nodes.values())
    changes = scheduler.apply_placements(state.tasks, placements, at)
    out = _note_replicas(state, changes)
    out.extend(StartReplica(p.node, p.task_id, p.replica) for p in placements)
    return out


def _reconcile_all(
    state: MasterState, at: float, chain: Mapping[str, ChainMember] | None = None, *, schedule: bool = False
) -> list[Instruction]:
    result = reconcile(state.nodes, chain or {}, {}, at, state.config,
                       watching_since=state.watching_since, may_invite=state.chain_synced)
    return _apply(state, result, at, schedule=schedule)


def _on_started(state: MasterState, event: MasterStarted) -> list[Instruction]:
    state.watching_since = event.at
    state.chain_synced = False
    return _reconcile_all(state, event.at)


def _on_chain_synced(state: MasterState, event: ChainSynced) -> list[Instruction]:
    state.chain_synced = True
    return _reconcile_all(state, event.at)


def _on_approved(state: MasterState, event: NodeApprovedOnChain) -> list[Instruction]:
    chain = ChainMember(NodeStatus.APPROVED, event.specs, event.block)
    rec = state.nodes.get(event.node)
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


def _on_invite_sent(state: MasterState, event: InviteSent) -> list[Instruction]:
    rec = state.nodes.get(event.node)
    if rec is None or rec.state != NodeState.INVITED:
        return []
    rec.invite_expiry = event.expiry
    rec.invited_at = event.at
    if event.url:
        rec.url = event.url
    rec.last_error = None
    state.dirty_nodes.add(event.node)
    return _reconcile_one(state, event.node, event.at)


def _on_invite_failed(state: MasterState, event: InviteFailed) -> list[Instruction]:
    rec = state.nodes.get(event.node)
    if rec is None or rec.state != NodeState.INVITED:
        return []  # e.g. it joined meanwhile
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
    rec.last_sample = NodeSample(event.at, event.payload.gpus, event.payload.load)
    state.dirty_nodes.add(event.node)
    instructions = _reconcile_one(state, event.node, event.at, heartbeat=event.at)
    changes = scheduler.apply_node_report(state.tasks.values(), event.node, event.payload.tasks, event.at)
    instructions.extend(_note_replicas(state, changes))
    if any(c.new in FINAL_REPLICA_STATES for c in changes):
        instructions.extend(_schedule(state, event.at))  # finished replicas free GPUs
    return instructions


def _on_tick(state: MasterState, event: Tick) -> list[Instruction]:
    return _reconcile_all(state, event.now, schedule=True)  # the periodic catch-all


def _on_task_created(state: MasterState, event: TaskCreated) -> list[Instruction]:
    task = event.task
    if task.id in state.tasks:
        return []  # idempotent
    state.tasks[task.id] = task
    state.dirty_tasks.add(task.id)
    return _schedule(state, task.created_at)


def _on_stop(state: MasterState, event: TaskStopRequested) -> list[Instruction]:
    task = state.tasks.get(event.task_id)
    if task is None or task.is_final:
        return []
    state.dirty_tasks.add(task.id)
    changes, to_stop = scheduler.stop_task(task, event.at)
    out = _note_replicas(state, changes)
    out.extend(StopReplica(node, task.id, index) for node, index in to_stop)
    return out


_HANDLERS: dict[type, Any] = {
    MasterStarted: _on_started,
    ChainSynced: _on_chain_synced,
    NodeApprovedOnChain: _on_approved,
    NodeJoinedOnChain: _on_joined,
    NodeLeftOnChain: _on_left,
    NodeEjectedOnChain: _on_left,
    ChainMembershipObserved: _on_membership,
    InviteSent: _on_invite_sent,
    InviteFailed: _on_invite_failed,
    NodeUrlResolved: _on_url,
    HeartbeatReceived: _on_heartbeat,
    Tick: _on_tick,
    TaskCreated: _on_task_created,
    TaskStopRequested: _on_stop,
}
