"""Node lifecycle, decided in one pure function: ``reconcile``.

``reconcile`` merges the three views of a node (the master's own record, on-chain membership,
heartbeat recency) into its state and the invites to send; ``StateConfig`` holds the timing.
``state.py`` calls it for one node on a chain event or heartbeat and for all of them on a Tick.

Node lifecycle (``NodeState``)::

    Approved --SendInvite--> Invited --joined on chain--> Joined --first heartbeat--> Healthy
       ^                       |                            |                          |   ^
       +-- InviteFailed -------+                            |  missed heartbeats       v   | heartbeat
           (retry after backoff; an expired invite          +-----------------> Unhealthy  |
            is re-sent at once)                                                    v       |
                                                                                  Dead ----+
    any state --left / ejected / rejected on chain--> Left (never invited again)

No invites while the chain view has not caught up after a start, nor once the run ended
(``may_invite`` False): Approved and Invited nodes keep their state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from prime.chain.types import NodeStatus
from prime.protocol.nodes import NodeRecord, NodeState
from prime.roles.master.events import ChainMember, Instruction, RecordTransition, SendInvite

# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateConfig:
    """Timing of the node lifecycle. A node is Unhealthy after missing ``unhealthy_after_missed``
    heartbeats (plus ``grace_s`` for network jitter) and Dead after ``dead_after_missed``.

    The defaults meet the goal "Dead within 3 intervals + 1 s of the last heartbeat": Dead after
    3 missed + 0.5 s, judged at a tick at most 0.4 s later (``MasterSettings.tick_interval_s``).
    A miner beats on a fixed cadence and never waits for Docker longer than half an interval
    (miner/heartbeat.py), and the master's own stalls restart the windows (``view_gap_s``), so a
    live node has 2.5 intervals of slack before it could be judged Dead."""

    heartbeat_interval_s: float = 30.0
    unhealthy_after_missed: int = 2
    dead_after_missed: int = 3
    grace_s: float = 0.5
    invite_ttl_s: int = 600
    invite_backoff_base_s: float = 5.0
    invite_backoff_max_s: float = 600.0
    sync_retry_max_s: float = 600.0  # a failing storage sync is retried after 2, 4, 8 ... s, at most this
    final_sync_attempts: int = 3      # final syncs the miner says are not final before the master takes what it got

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

    def view_gap_s(self, every_s: float) -> float:
        """Ticks further apart than this (or going back in time) are a gap in the master's own view:
        twice the tick cadence, and never less than one heartbeat interval (a busy loop that is a
        little late is no gap; a gap only ever restarts the windows, so it must be a real one)."""
        return max(2.0 * every_s, self.heartbeat_interval_s)

    def invite_backoff_s(self, failures: int) -> float:
        """Wait before the next invite after ``failures`` failed ones in a row: base * 2^(failures-1), capped."""
        if failures <= 0:
            return 0.0
        return min(self.invite_backoff_max_s, self.invite_backoff_base_s * float(2 ** min(failures - 1, 60)))

    def sync_retry_s(self, failures: int) -> float:
        """Wait before syncing a replica again after ``failures`` failed syncs in a row: 2^failures, capped."""
        return min(self.sync_retry_max_s, 2.0 ** min(failures, 60))


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
    ``watching_since`` (when this master started, or the end of the last gap in its own view)
    keeps the master's own downtime from counting as missed heartbeats: a node's windows count
    from max(its last heartbeat, ``watching_since``), so no node is judged Unhealthy or Dead
    before it had a full window to reach the restarted master; it can keep a node's health as it
    was, never improve it. With
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
        reason = "approved on chain; no invite now (chain view not caught up, or the run ended)"
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
