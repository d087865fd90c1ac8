"""The master core's vocabulary: events (what happened) and instructions (what to do).

``state.handle(state, event)`` takes one of the events and returns instructions; the service
carries the instructions out through its effects, and an effect's result is again an event
(``SendInvite`` -> ``InviteSent`` / ``InviteFailed``; ``SyncStorage`` -> ``SyncSucceeded`` /
``SyncFailed``). Plain frozen dataclasses, no logic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from prime.chain.types import NodeStatus, Specs
from prime.protocol.groups import GroupPhase
from prime.protocol.heartbeat import HeartbeatRequest
from prime.protocol.nodes import NodeState
from prime.protocol.tasks import Task
from prime.roles.master.scheduler import RecordReplicaTransition as RecordReplicaTransition  # an instruction too

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
    """The invite did not go through. ``expiry``: the invite it was about (None: whichever is live)."""

    node: str
    at: float
    error: str
    expiry: int | None = None


@dataclass(frozen=True)
class RunEnded:
    """The run ended on chain (read at start-up, or its RunEnded event): no more invites, no new tasks."""

    at: float


@dataclass(frozen=True)
class MastershipChanged:
    """This master was removed from the run on chain (``is_master`` False: its nodes go to the
    run's other masters and it invites nobody), or added back (True)."""

    is_master: bool
    at: float


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
    """The periodic catch-all. ``every_s``: the cadence the service ticks at (None: unknown). A Tick
    that comes more than ``StateConfig.view_gap_s(every_s)`` after the previous one, or before it
    (the clock went back), ends a gap in the master's own view (its loop stalled, the process was
    paused, the clock jumped): like a restart, node health windows count from the end of the gap."""

    now: float
    every_s: float | None = None


@dataclass(frozen=True)
class TaskCreated:
    """The buyer asks for ``task`` (its spec already valid on its own): admitted (scheduled) or
    ``TaskRefused``."""

    task: Task


@dataclass(frozen=True)
class TaskStopRequested:
    task_id: str
    at: float


@dataclass(frozen=True)
class SyncRound:
    """Time for a storage sync round: every due persistent replica gets a ``SyncStorage``."""

    now: float


@dataclass(frozen=True)
class SyncSucceeded:
    """A ``SyncStorage`` went through: the manifest and its blobs are stored. ``miner_final``: the
    miner says the container finished (the manifest will not change)."""

    node: str
    task_id: str
    replica: int
    final: bool        # the instruction asked for the final sync
    at: float
    files: int = 0
    blobs_fetched: int = 0
    bytes_fetched: int = 0
    miner_final: bool = True


@dataclass(frozen=True)
class SyncFailed:
    """A ``SyncStorage`` failed. ``not_found``: the miner has no data for the replica (404)."""

    node: str
    task_id: str
    replica: int
    final: bool
    at: float
    error: str
    not_found: bool = False


Event = Union[
    MasterStarted, ChainSynced, NodeApprovedOnChain, NodeJoinedOnChain, NodeLeftOnChain, NodeEjectedOnChain,
    ChainMembershipObserved, InviteSent, InviteFailed, RunEnded, MastershipChanged, NodeUrlResolved, HeartbeatReceived, Tick,
    TaskCreated, TaskStopRequested, SyncRound, SyncSucceeded, SyncFailed,
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
    """Push a stop (DELETE {miner}/tasks/{id}, which stops every replica of the task on ``node``;
    ``replica`` is the lowest of them). Emitted once per task and node, on the first stop request;
    the heartbeat's desired list stops it anyway."""

    node: str
    task_id: str
    replica: int


@dataclass(frozen=True)
class SyncStorage:
    """Pull a persistent replica's manifest and missing blobs from ``node``; then feed SyncSucceeded
    or SyncFailed. ``final``: the replica finished (its last sync, retried until it is done)."""

    node: str
    task_id: str
    replica: int
    final: bool = True


@dataclass(frozen=True)
class RecordGroupTransition:
    """A group task's phase or attempt changed (log it): the master's record of every gang start,
    attempt end and restart."""

    task_id: str
    attempt: int
    old: GroupPhase
    new: GroupPhase
    reason: str


@dataclass(frozen=True)
class RecordViewGap:
    """The master's own view had a gap from ``since`` to ``until`` (log it): no node is judged worse
    for it until it has had a full window after ``until``."""

    since: float
    until: float


@dataclass(frozen=True)
class HeartbeatRefused:
    """The node may not heartbeat (not a member on chain); the HTTP layer answers 403 with ``reason``."""

    node: str
    reason: str


@dataclass(frozen=True)
class TaskRefused:
    """The task is not admitted; the HTTP layer answers ``status`` with ``error`` and ``detail``."""

    task_id: str
    status: int
    error: str
    detail: Any


Instruction = Union[
    SendInvite, RecordTransition, RecordReplicaTransition, RecordGroupTransition, StartReplica, StopReplica, SyncStorage,
    HeartbeatRefused, TaskRefused, RecordViewGap,
]

