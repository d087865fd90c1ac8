"""Master state machine: node lifecycle, invites, heartbeats, tasks, and the one reconcile function."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from prime.chain.types import NodeStatus, Specs
from prime.protocol.heartbeat import HeartbeatRequest, ReplicaReport
from prime.protocol.nodes import NodeRecord, NodeState
from prime.protocol.tasks import ReplicaState, Task, TaskSpec, TaskState
from prime.roles.master.scheduler import RecordReplicaTransition
from prime.roles.master.state import (
    ChainMember,
    ChainMembershipObserved,
    ChainSynced,
    HeartbeatReceived,
    HeartbeatRefused,
    InviteFailed,
    InviteSent,
    MasterStarted,
    MasterState,
    NodeApprovedOnChain,
    NodeEjectedOnChain,
    NodeJoinedOnChain,
    NodeLeftOnChain,
    NodeUrlResolved,
    RecordTransition,
    SendInvite,
    StartReplica,
    StateConfig,
    StopReplica,
    SyncStorage,
    TaskCreated,
    TaskStopRequested,
    Tick,
    handle,
    heartbeat_refusal,
    heartbeat_response,
    may_heartbeat,
    reconcile,
)
from prime.roles.master.store import MasterStore
from prime.store import Database

# interval 10 s: Unhealthy after 25 s without a heartbeat, Dead after 55 s.
CFG = StateConfig(heartbeat_interval_s=10, unhealthy_after_missed=2, dead_after_missed=5, grace_s=5,
                  invite_ttl_s=100, invite_backoff_base_s=5, invite_backoff_max_s=40)
SPECS = Specs(4, "H100", 80_000, 32, 256_000, 1000)
A, B, C, D = (f"0x{i:040x}" for i in range(0xA, 0xE))
EMPTY = HeartbeatRequest()


def of(instructions: list, kind: type) -> list:
    return [i for i in instructions if isinstance(i, kind)]


def transitions(instructions: list) -> list[tuple]:
    return [(t.node, t.old, t.new) for t in of(instructions, RecordTransition)]


def fresh() -> MasterState:
    st = MasterState(CFG)
    handle(st, MasterStarted(0.0))
    handle(st, ChainSynced(0.0))
    return st


def member(st: MasterState, node: str, at: float = 1.0, *, heartbeat: bool = True) -> None:
    """Bring ``node`` through approval and join (and a first heartbeat) at ``at``."""
    handle(st, NodeApprovedOnChain(node, SPECS, at))
    handle(st, NodeJoinedOnChain(node, at))
    if heartbeat:
        handle(st, HeartbeatReceived(node, at, EMPTY))


def running(tid: str, idx: int = 0) -> ReplicaReport:
    return ReplicaReport(tid, idx, ReplicaState.RUNNING)


# --- config ---------------------------------------------------------------------------------------


def test_config_thresholds_and_backoff() -> None:
    assert (CFG.unhealthy_after_s, CFG.dead_after_s) == (25, 55)
    assert [CFG.invite_backoff_s(n) for n in range(7)] == [0, 5, 10, 20, 40, 40, 40]
    assert StateConfig().invite_backoff_s(10_000) == StateConfig().invite_backoff_max_s


@pytest.mark.parametrize(
    "kwargs",
    [{"heartbeat_interval_s": 0}, {"unhealthy_after_missed": 0}, {"unhealthy_after_missed": 5, "dead_after_missed": 5},
     {"invite_ttl_s": 0}],
)
def test_bad_config(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        StateConfig(**kwargs)


# --- invites ----------------------------------------------------------------------------------------


def test_approved_node_is_invited_once() -> None:
    st = fresh()
    out = handle(st, NodeApprovedOnChain(A, SPECS, 10.0))
    assert of(out, SendInvite) == [SendInvite(A, 110, None)]
    assert transitions(out) == [(A, None, NodeState.INVITED)]
    rec = st.nodes[A]
    assert (rec.state, rec.invite_expiry, rec.invited_at, rec.hardware) == (NodeState.INVITED, 110, 10.0, SPECS)
    # while the invite is live: no second invite, whatever happens
    assert handle(st, NodeApprovedOnChain(A, SPECS, 11.0)) == []
    assert handle(st, InviteSent(A, 110, 12.0, "http://10.0.0.1:8000")) == []
    assert handle(st, Tick(109.0)) == []
    assert st.nodes[A].url == "http://10.0.0.1:8000"


def test_invite_failures_back_off_exponentially() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    at, sent_at = 0.0, []
    for expected_wait in (5, 10, 20, 40, 40):
        out = handle(st, InviteFailed(A, at, "connection refused"))
        assert transitions(out) == [(A, NodeState.INVITED, NodeState.APPROVED)]
        assert st.nodes[A].last_error == "connection refused"
        assert handle(st, Tick(at + expected_wait - 0.5)) == []          # still backing off
        out = handle(st, Tick(at + expected_wait))
        assert of(out, SendInvite) and st.nodes[A].state == NodeState.INVITED
        at += expected_wait
        sent_at.append(at)
    assert sent_at == [5, 15, 35, 75, 115]
    assert st.nodes[A].invites_sent == 6
    # a join resets the failure count
    handle(st, NodeJoinedOnChain(A, 120.0))
    assert st.nodes[A].invite_failures == 0 and st.nodes[A].next_invite_at is None


def test_invite_expired_without_join_is_sent_again() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    assert handle(st, Tick(99.0)) == []
    out = handle(st, Tick(100.0))
    assert of(out, SendInvite) == [SendInvite(A, 200, None)]
    assert st.nodes[A].state == NodeState.INVITED and st.nodes[A].invite_expiry == 200


def test_invite_result_after_a_join_is_ignored() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    handle(st, NodeJoinedOnChain(A, 1.0))
    assert handle(st, InviteFailed(A, 2.0, "timeout")) == []
    assert handle(st, InviteSent(A, 100, 2.0)) == []
    assert st.nodes[A].state == NodeState.JOINED and st.nodes[A].invite_failures == 0


def test_events_for_unknown_nodes_are_harmless() -> None:
    st = fresh()
    for event in (InviteFailed(A, 1.0, "x"), InviteSent(A, 9, 1.0), NodeUrlResolved(A, "http://x", 1.0),
                  NodeLeftOnChain(A, 1.0), NodeEjectedOnChain(A, 1.0), TaskStopRequested("nope", 1.0)):
        assert handle(st, event) == []
    assert st.nodes == {}


def test_url_resolved() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    st.dirty_nodes.clear()
    handle(st, NodeUrlResolved(A, "http://10.1.1.1:9000", 1.0))
    assert st.nodes[A].url == "http://10.1.1.1:9000" and st.dirty_nodes == {A}
    out = handle(st, InviteFailed(A, 2.0, "x"))
    assert not of(out, SendInvite)
    assert of(handle(st, Tick(7.0)), SendInvite) == [SendInvite(A, 107, "http://10.1.1.1:9000")]


# --- membership and heartbeats ---------------------------------------------------------------------


def test_join_then_first_heartbeat() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    assert not may_heartbeat(st, A)
    out = handle(st, NodeJoinedOnChain(A, 5.0))
    assert transitions(out) == [(A, NodeState.INVITED, NodeState.JOINED)]
    rec = st.nodes[A]
    assert rec.joined_on_chain and rec.invite_expiry is None and rec.member_since == 5.0
    assert may_heartbeat(st, A)
    out = handle(st, HeartbeatReceived(A, 6.0, EMPTY))
    assert transitions(out) == [(A, NodeState.JOINED, NodeState.HEALTHY)]
    assert st.nodes[A].last_heartbeat == 6.0


@pytest.mark.parametrize(
    ("setup", "reason_words"),
    [
        ("unknown", "not known"),
        ("invited", "not a member"),
        ("left", "not a member"),
        ("ejected", "not a member"),
    ],
)
def test_heartbeat_refused_unless_member_on_chain(setup: str, reason_words: str) -> None:
    st = fresh()
    if setup != "unknown":
        handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    if setup in ("left", "ejected"):
        handle(st, NodeJoinedOnChain(A, 1.0))
        handle(st, (NodeLeftOnChain if setup == "left" else NodeEjectedOnChain)(A, 2.0))
    assert not may_heartbeat(st, A)
    assert reason_words in heartbeat_refusal(st, A)
    before = copy.deepcopy(st.nodes)
    out = handle(st, HeartbeatReceived(A, 3.0, EMPTY))
    assert out == [HeartbeatRefused(A, heartbeat_refusal(st, A))]
    assert st.nodes == before


# (start state, seconds since the last heartbeat at the Tick, expected state)
HEALTH_TABLE = [
    (NodeState.HEALTHY, 25, NodeState.HEALTHY),
    (NodeState.HEALTHY, 26, NodeState.UNHEALTHY),
    (NodeState.HEALTHY, 55, NodeState.UNHEALTHY),
    (NodeState.HEALTHY, 56, NodeState.DEAD),
    (NodeState.JOINED, 24, NodeState.JOINED),    # joined, never heartbeated: not stuck ...
    (NodeState.JOINED, 26, NodeState.UNHEALTHY),  # ... it goes Unhealthy ...
    (NodeState.JOINED, 60, NodeState.DEAD),       # ... and Dead
]


@pytest.mark.parametrize(("start", "silence", "expected"), HEALTH_TABLE)
def test_missed_heartbeats(start: NodeState, silence: float, expected: NodeState) -> None:
    st = fresh()
    member(st, A, 100.0, heartbeat=start == NodeState.HEALTHY)
    assert st.nodes[A].state == start
    out = handle(st, Tick(100.0 + silence))
    assert st.nodes[A].state == expected
    assert transitions(out) == ([] if expected == start else [(A, start, expected)])


def test_healthy_unhealthy_dead_and_back() -> None:
    st = fresh()
    member(st, A, 0.0)
    assert [t[2] for t in transitions(handle(st, Tick(30.0)))] == [NodeState.UNHEALTHY]
    assert transitions(handle(st, HeartbeatReceived(A, 31.0, EMPTY))) == [(A, NodeState.UNHEALTHY, NodeState.HEALTHY)]
    assert [t[2] for t in transitions(handle(st, Tick(100.0)))] == [NodeState.DEAD]
    assert handle(st, Tick(1000.0)) == []  # stays Dead
    assert may_heartbeat(st, A)           # a Dead node is still a member: it may come back
    out = handle(st, HeartbeatReceived(A, 1001.0, EMPTY))
    assert transitions(out) == [(A, NodeState.DEAD, NodeState.HEALTHY)]


@pytest.mark.parametrize("event", [NodeLeftOnChain, NodeEjectedOnChain])
def test_left_nodes_are_never_invited_again(event: type) -> None:
    st = fresh()
    member(st, A)
    out = handle(st, event(A, 2.0))
    assert transitions(out) == [(A, NodeState.HEALTHY, NodeState.LEFT)]
    assert handle(st, NodeApprovedOnChain(A, SPECS, 3.0)) == []  # replayed or re-registered
    assert handle(st, Tick(10_000.0)) == []
    assert st.nodes[A].state == NodeState.LEFT and not st.nodes[A].joined_on_chain


def test_invited_node_that_leaves_loses_its_invite() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    handle(st, ChainMembershipObserved({A: ChainMember(NodeStatus.REJECTED)}, 1.0))
    assert st.nodes[A].state == NodeState.LEFT and st.nodes[A].invite_expiry is None
    assert handle(st, Tick(500.0)) == []


def test_chain_events_replayed_after_a_restart_change_nothing() -> None:
    st = fresh()
    events = [NodeApprovedOnChain(A, SPECS, 1.0, block=1), NodeJoinedOnChain(A, 2.0, block=2),
              NodeApprovedOnChain(B, SPECS, 1.0, block=1), NodeJoinedOnChain(B, 2.0, block=2),
              NodeLeftOnChain(B, 3.0, block=3)]
    for e in events:
        handle(st, e)
    snapshot = copy.deepcopy(st.nodes)
    for e in events:  # the follower re-delivers the batch (crash before the cursor was saved)
        assert not of(handle(st, e), SendInvite)
    assert {a: (r.state, r.chain_status) for a, r in st.nodes.items()} == {
        a: (r.state, r.chain_status) for a, r in snapshot.items()
    }


def test_stale_chain_snapshot_cannot_undo_a_newer_event() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 1.0, block=10))
    handle(st, NodeJoinedOnChain(A, 2.0, block=12))
    out = handle(st, ChainMembershipObserved({A: ChainMember(NodeStatus.APPROVED, block=11)}, 3.0))
    assert out == [] and st.nodes[A].state == NodeState.JOINED
    handle(st, ChainMembershipObserved({A: ChainMember(NodeStatus.LEFT, block=13)}, 4.0))
    assert st.nodes[A].state == NodeState.LEFT


def test_no_invites_between_restart_and_chain_sync() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))          # invite live until 100
    handle(st, MasterStarted(500.0))
    assert handle(st, Tick(501.0)) == []                     # expired, but the chain view may be stale
    out = handle(st, NodeApprovedOnChain(B, SPECS, 502.0))   # a replayed approval
    assert not of(out, SendInvite) and st.nodes[B].state == NodeState.APPROVED
    out = handle(st, ChainSynced(503.0))
    assert of(out, SendInvite) == [SendInvite(A, 603, None), SendInvite(B, 603, None)]
    assert handle(st, ChainSynced(504.0)) == []


# --- reconcile: the three views ---------------------------------------------------------------------


def rec(address: str, state: NodeState, **kw) -> NodeRecord:
    return NodeRecord(address, state, SPECS, **kw)


def test_reconcile_adopts_nodes_that_joined_while_the_master_was_down() -> None:
    result = reconcile({}, {A: ChainMember(NodeStatus.ACTIVE, SPECS)}, {}, 500.0, CFG)
    node = result.nodes[A]
    assert node.state == NodeState.JOINED and node.member_since == 500.0 and node.hardware == SPECS
    assert result.instructions == [RecordTransition(A, None, NodeState.JOINED, result.instructions[0].reason)]
    assert not of(result.instructions, SendInvite)


def test_reconcile_readmits_a_dead_node_on_heartbeat() -> None:
    own = {A: rec(A, NodeState.DEAD, chain_status=NodeStatus.ACTIVE, member_since=0.0, last_heartbeat=10.0)}
    assert reconcile(own, {}, {}, 500.0, CFG).changed == set()          # no news: stays Dead
    result = reconcile(own, {}, {A: 499.0}, 500.0, CFG)
    assert result.nodes[A].state == NodeState.HEALTHY and result.nodes[A].last_heartbeat == 499.0
    assert transitions(result.instructions) == [(A, NodeState.DEAD, NodeState.HEALTHY)]


def test_reconcile_invited_node_that_joined_on_chain() -> None:
    own = {A: rec(A, NodeState.INVITED, chain_status=NodeStatus.APPROVED, invite_expiry=600, invited_at=500.0)}
    result = reconcile(own, {A: ChainMember(NodeStatus.ACTIVE)}, {}, 510.0, CFG)
    node = result.nodes[A]
    assert node.state == NodeState.JOINED and node.invite_expiry is None and node.joined_on_chain
    assert not of(result.instructions, SendInvite)


@pytest.mark.parametrize("status", [NodeStatus.LEFT, NodeStatus.EJECTED, NodeStatus.REJECTED, NodeStatus.NONE])
def test_reconcile_node_that_left_on_chain(status: NodeStatus) -> None:
    own = {A: rec(A, NodeState.HEALTHY, chain_status=NodeStatus.ACTIVE, member_since=0.0, last_heartbeat=9.0)}
    result = reconcile(own, {A: ChainMember(status)}, {A: 10.0}, 10.0, CFG)
    assert result.nodes[A].state == NodeState.LEFT
    assert transitions(result.instructions) == [(A, NodeState.HEALTHY, NodeState.LEFT)]


def test_reconcile_expired_invite_is_sent_again() -> None:
    own = {A: rec(A, NodeState.INVITED, chain_status=NodeStatus.APPROVED, invite_expiry=600, invited_at=500.0)}
    assert reconcile(own, {A: ChainMember(NodeStatus.APPROVED)}, {}, 599.0, CFG).instructions == []
    result = reconcile(own, {A: ChainMember(NodeStatus.APPROVED)}, {}, 600.0, CFG)
    assert result.instructions == [SendInvite(A, 700, None)]
    assert result.nodes[A].invite_expiry == 700 and result.nodes[A].invites_sent == 1


def test_reconcile_may_hold_invites_back() -> None:
    own = {A: rec(A, NodeState.INVITED, chain_status=NodeStatus.APPROVED, invite_expiry=600)}
    result = reconcile(own, {B: ChainMember(NodeStatus.APPROVED, SPECS)}, {}, 700.0, CFG, may_invite=False)
    assert not of(result.instructions, SendInvite)
    assert result.nodes[A].state == NodeState.INVITED and result.nodes[B].state == NodeState.APPROVED


def test_reconcile_new_approved_node_is_invited_and_unrelated_chain_nodes_ignored() -> None:
    chain = {A: ChainMember(NodeStatus.APPROVED, SPECS), B: ChainMember(NodeStatus.REGISTERED),
             C: ChainMember(NodeStatus.LEFT)}
    result = reconcile({}, chain, {}, 0.0, CFG)
    assert set(result.nodes) == {A}
    assert of(result.instructions, SendInvite) == [SendInvite(A, 100, None)]


def test_reconcile_keeps_stored_views_for_nodes_the_snapshot_does_not_cover() -> None:
    own = {A: rec(A, NodeState.HEALTHY, chain_status=NodeStatus.ACTIVE, member_since=0.0, last_heartbeat=100.0),
           B: rec(B, NodeState.HEALTHY, chain_status=NodeStatus.ACTIVE, member_since=0.0, last_heartbeat=100.0)}
    result = reconcile(own, {B: ChainMember(NodeStatus.LEFT)}, {}, 101.0, CFG)
    assert result.nodes[A].state == NodeState.HEALTHY and result.changed == {B}


def test_reconcile_does_not_modify_its_inputs() -> None:
    own = {A: rec(A, NodeState.INVITED, chain_status=NodeStatus.APPROVED, invite_expiry=600)}
    chain = {A: ChainMember(NodeStatus.ACTIVE), B: ChainMember(NodeStatus.APPROVED, SPECS)}
    hbs = {A: 601.0}
    before = (copy.deepcopy(own), dict(chain), dict(hbs))
    reconcile(own, chain, hbs, 601.0, CFG)
    assert (own, chain, hbs) == before


def test_reconcile_never_improves_health_without_a_heartbeat_after_restart() -> None:
    """The master's own downtime must not count against nodes, nor revive Dead ones."""
    own = {
        A: rec(A, NodeState.HEALTHY, chain_status=NodeStatus.ACTIVE, member_since=0.0, last_heartbeat=100.0),
        B: rec(B, NodeState.DEAD, chain_status=NodeStatus.ACTIVE, member_since=0.0, last_heartbeat=10.0),
        C: rec(C, NodeState.UNHEALTHY, chain_status=NodeStatus.ACTIVE, member_since=0.0, last_heartbeat=70.0),
    }
    # master was down from ~100 to 5000; restarted at 5000
    states = lambda r: {a: n.state for a, n in r.nodes.items()}  # noqa: E731
    r = reconcile(own, {}, {}, 5010.0, CFG, watching_since=5000.0)
    assert states(r) == {A: NodeState.HEALTHY, B: NodeState.DEAD, C: NodeState.UNHEALTHY}
    r = reconcile(own, {}, {}, 5030.0, CFG, watching_since=5000.0)  # a full window since restart, no heartbeat
    assert states(r) == {A: NodeState.UNHEALTHY, B: NodeState.DEAD, C: NodeState.UNHEALTHY}
    r = reconcile(own, {}, {}, 5060.0, CFG, watching_since=5000.0)
    assert states(r) == {A: NodeState.DEAD, B: NodeState.DEAD, C: NodeState.DEAD}
    # without the restart grace the same inputs are all Dead at once
    assert set(states(reconcile(own, {}, {}, 5010.0, CFG)).values()) == {NodeState.DEAD}


# --- tasks -----------------------------------------------------------------------------------------


def new_task(tid: str, at: float = 1.0, **kw) -> Task:
    return Task.new(TaskSpec("busybox", **kw), at, tid)


def test_task_is_placed_and_desired_by_its_node() -> None:
    st = fresh()
    member(st, A)
    out = handle(st, TaskCreated(new_task("t", gpus=2)))
    assert of(out, StartReplica) == [StartReplica(A, "t", 0)]
    assert [(c.old, c.new) for c in of(out, RecordReplicaTransition)] == [(ReplicaState.PENDING, ReplicaState.ASSIGNED)]
    resp = heartbeat_response(st, A)
    assert resp.interval_s == 10
    assert [(d.id, d.replica, d.gpu_indices) for d in resp.desired] == [("t", 0, (0, 1))]
    assert heartbeat_response(st, B).desired == ()
    assert handle(st, TaskCreated(new_task("t", gpus=2))) == []  # same id again: ignored


def test_task_waits_pending_until_a_node_is_healthy() -> None:
    st = fresh()
    member(st, A, heartbeat=False)
    handle(st, TaskCreated(new_task("t", gpus=1)))
    assert st.tasks["t"].replicas[0].state == ReplicaState.PENDING
    out = handle(st, HeartbeatReceived(A, 2.0, EMPTY))
    assert of(out, StartReplica) == [StartReplica(A, "t", 0)]


def test_heartbeat_reports_drive_replica_states_and_free_gpus() -> None:
    st = fresh()
    member(st, A)
    handle(st, TaskCreated(new_task("t", 1.0, gpus=4)))
    handle(st, TaskCreated(new_task("u", 2.0, gpus=4)))
    assert st.tasks["u"].replicas[0].state == ReplicaState.PENDING
    handle(st, HeartbeatReceived(A, 3.0, HeartbeatRequest(tasks=(running("t"),))))
    assert st.tasks["t"].state == TaskState.RUNNING
    done = ReplicaReport("t", 0, ReplicaState.COMPLETED, 0)
    out = handle(st, HeartbeatReceived(A, 4.0, HeartbeatRequest(tasks=(done,))))
    assert st.tasks["t"].state == TaskState.COMPLETED
    assert of(out, StartReplica) == [StartReplica(A, "u", 0)]  # the finished task's GPUs went to the next
    assert [d.id for d in heartbeat_response(st, A).desired] == ["u"]


def test_dead_node_replicas_are_rescheduled_but_completed_ones_stay() -> None:
    st = fresh()
    member(st, A, 0.0)
    handle(st, TaskCreated(new_task("t", 0.0, gpus=1, replicas=2)))
    assert {r.node for r in st.tasks["t"].replicas} == {A}
    done = ReplicaReport("t", 1, ReplicaState.COMPLETED, 0)
    handle(st, HeartbeatReceived(A, 1.0, HeartbeatRequest(tasks=(running("t", 0), done))))
    member(st, B, 50.0)  # B healthy; A silent since 1.0
    out = handle(st, Tick(60.0))
    assert transitions(out) == [(A, NodeState.HEALTHY, NodeState.DEAD)]
    r0, r1 = st.tasks["t"].replicas
    assert (r0.node, r0.state, r0.attempt) == (B, ReplicaState.ASSIGNED, 1)
    assert (r1.node, r1.state) == (A, ReplicaState.COMPLETED)
    assert StartReplica(B, "t", 0) in out
    # A comes back: it is no longer asked to run the moved replica, and its stale report changes nothing
    handle(st, HeartbeatReceived(A, 70.0, HeartbeatRequest(tasks=(running("t", 0),))))
    assert heartbeat_response(st, A).desired == ()
    assert (r0.node, r0.state) == (B, ReplicaState.ASSIGNED)


def test_left_node_replicas_are_rescheduled() -> None:
    st = fresh()
    member(st, A)
    handle(st, TaskCreated(new_task("t", gpus=1)))
    out = handle(st, NodeLeftOnChain(A, 5.0))
    assert st.tasks["t"].replicas[0].state == ReplicaState.PENDING and st.tasks["t"].replicas[0].node is None
    assert any(c.new == ReplicaState.PENDING for c in of(out, RecordReplicaTransition))


def test_unhealthy_node_keeps_its_replicas_and_gets_no_new_ones() -> None:
    st = fresh()
    member(st, A, 0.0)
    handle(st, TaskCreated(new_task("t", 0.0, gpus=1)))
    handle(st, Tick(30.0))
    assert st.nodes[A].state == NodeState.UNHEALTHY
    assert st.tasks["t"].replicas[0].node == A
    handle(st, TaskCreated(new_task("u", 31.0, gpus=1)))
    assert st.tasks["u"].replicas[0].state == ReplicaState.PENDING


def test_stop_task() -> None:
    st = fresh()
    member(st, A)
    handle(st, TaskCreated(new_task("t", gpus=4, replicas=2)))  # one placed, one pending
    out = handle(st, TaskStopRequested("t", 5.0))
    assert of(out, StopReplica) == [StopReplica(A, "t", 0)]
    assert st.tasks["t"].replicas[1].state == ReplicaState.STOPPED
    assert heartbeat_response(st, A).desired == ()
    # the node no longer reports it: stopped
    handle(st, HeartbeatReceived(A, 6.0, EMPTY))
    assert st.tasks["t"].state == TaskState.STOPPED
    assert handle(st, TaskStopRequested("t", 7.0)) == []  # already final


def test_persistent_replica_finishing_asks_for_a_final_sync() -> None:
    st = fresh()
    member(st, A)
    handle(st, TaskCreated(new_task("p", gpus=1, persistent=True)))
    handle(st, TaskCreated(new_task("q", 1.5, gpus=1)))
    reports = (ReplicaReport("p", 0, ReplicaState.COMPLETED, 0), ReplicaReport("q", 0, ReplicaState.COMPLETED, 0))
    out = handle(st, HeartbeatReceived(A, 2.0, HeartbeatRequest(tasks=reports)))
    assert of(out, SyncStorage) == [SyncStorage(A, "p", 0)]


def test_heartbeat_keeps_the_latest_sample() -> None:
    st = fresh()
    member(st, A)
    handle(st, HeartbeatReceived(A, 9.0, HeartbeatRequest.from_json(
        {"gpus": [{"index": 0, "util": 80}], "load": {"cpu_pct": 40}})))
    sample = st.nodes[A].last_sample
    assert sample.at == 9.0 and sample.gpus[0].util == 80 and sample.load == {"cpu_pct": 40.0}


def test_unknown_event_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        handle(fresh(), object())  # type: ignore[arg-type]


# --- the master down and back (real store on disk) ----------------------------------------------------


def test_master_down_and_back(tmp_path: Path) -> None:
    db_path = tmp_path / "master.db"
    st = fresh()
    for n in (A, B):
        member(st, n, 0.0)
    handle(st, NodeApprovedOnChain(C, SPECS, 0.0))                      # C invited, expiry 100
    handle(st, TaskCreated(new_task("t", 1.0, gpus=4, replicas=2)))   # one replica on A, one on B
    on = {r.node: r.index for r in st.tasks["t"].replicas}
    for n in (A, B):
        handle(st, HeartbeatReceived(n, 20.0, HeartbeatRequest(tasks=(running("t", on[n]),))))
    st.set_cursor(77)
    MasterStore(Database(db_path)).save(st)

    # --- the master is down from t=20 to t=1000. Meanwhile: C joined on chain (invite used),
    # D joined through another master of the run, B's machine died; A kept running its replica.
    st = MasterStore(Database(db_path)).load(CFG)
    assert st.chain_cursor == 77
    out = handle(st, MasterStarted(1000.0))
    out += handle(st, Tick(1000.2))
    assert not of(out, SendInvite)  # C's invite expired long ago, but the chain view is stale until synced ...
    out = handle(st, NodeJoinedOnChain(C, 1000.5, block=80))   # ... the follower replays the join from the cursor
    out += handle(st, NodeJoinedOnChain(D, 1000.5, SPECS, block=81))
    out += handle(st, ChainSynced(1000.6))
    assert not of(out, SendInvite)
    assert st.nodes[C].state == NodeState.JOINED and st.nodes[D].state == NodeState.JOINED  # adopted, awaiting heartbeat

    out = handle(st, Tick(1001.0))
    assert not of(out, RecordReplicaTransition)  # nobody is declared dead for the master's own downtime
    assert st.nodes[A].state == st.nodes[B].state == NodeState.HEALTHY

    for at in (1010.0, 1050.0):  # the live nodes heartbeat as usual
        for n in (A, C, D):
            handle(st, HeartbeatReceived(n, at, HeartbeatRequest(tasks=(running("t", on[A]),) if n == A else ())))
        assert st.nodes[C].state == st.nodes[D].state == NodeState.HEALTHY
    handle(st, Tick(1030.0))
    assert st.nodes[B].state == NodeState.UNHEALTHY     # a window after the restart without a heartbeat
    out = handle(st, Tick(1060.0))
    assert transitions(out) == [(B, NodeState.UNHEALTHY, NodeState.DEAD)]
    replica_b = st.tasks["t"].replicas[on[B]]
    assert replica_b.node in (C, D) and replica_b.attempt == 1 and replica_b.state == ReplicaState.ASSIGNED
    replica_a = st.tasks["t"].replicas[on[A]]
    assert (replica_a.node, replica_a.state, replica_a.attempt) == (A, ReplicaState.RUNNING, 0)  # never disturbed
    assert st.nodes[A].state == NodeState.HEALTHY


# --- the periodic pass skips settled members -------------------------------------------------------


def test_skipping_settled_members_is_exactly_the_no_op_case() -> None:
    """``reconcile`` skips records it judges settled; that shortcut must agree with the full rule."""
    import itertools
    import random

    from prime.roles.master.lifecycle import _reconcile_node, _settled_member

    rng = random.Random(7)
    states = list(NodeState)
    statuses = [None, *NodeStatus]
    checked = skipped = 0
    for state, status, hb_age, since_age, watching in itertools.product(
            states, statuses, (None, 0.0, 20.0, 26.0, 60.0), (None, 0.0, 30.0, 100.0), (None, 95.0, 99.0)):
        rec = NodeRecord("0x" + "ab" * 20, state, chain_status=status, hardware=SPECS,
                         last_heartbeat=None if hb_age is None else 100.0 - hb_age,
                         member_since=None if since_age is None else 100.0 - since_age,
                         invite_failures=rng.choice((0, 0, 1)), state_since=50.0)
        after, out = _reconcile_node(rec.address, rec, None, None, 100.0, CFG, watching)
        settled = _settled_member(rec, 100.0, CFG, watching)
        if settled:
            skipped += 1
            assert after == rec and out == [], (rec, after, out)
        checked += 1
    assert skipped > 0 and skipped < checked  # both paths were exercised
