"""Ejecting dead nodes (issue 14), the pure parts: which nodes are due, and a node that registered
again after its ejection is a fresh approved node for the master."""

from __future__ import annotations

from prime.chain.types import NodeStatus, Specs
from prime.protocol.heartbeat import HeartbeatRequest
from prime.protocol.nodes import NodeRecord, NodeState
from prime.roles.master.ejection import due_ejections
from prime.roles.master.state import (
    HeartbeatReceived,
    MasterState,
    NodeApprovedOnChain,
    NodeEjectedOnChain,
    NodeJoinedOnChain,
    SendInvite,
    StateConfig,
    Tick,
    handle,
)

CFG = StateConfig(heartbeat_interval_s=10, unhealthy_after_missed=2, dead_after_missed=5, grace_s=5, invite_ttl_s=100)
SPECS = Specs(4, "H100", 80_000, 32, 256_000, 1000)
A, B, C = (f"0x{i:040x}" for i in range(0xA, 0xD))


def dead(address: str, since: float, *, chain: NodeStatus = NodeStatus.ACTIVE, last: float | None = 1.0) -> NodeRecord:
    return NodeRecord(address, NodeState.DEAD, chain_status=chain, state_since=since, last_heartbeat=last)


def test_only_nodes_dead_past_the_grace_and_still_active_on_chain_are_due() -> None:
    nodes = [
        dead(A, since=100.0),                                              # Dead 300 s: due
        dead(B, since=350.0),                                              # Dead 50 s: within the grace
        dead(C, since=0.0, chain=NodeStatus.EJECTED),                      # out already
        NodeRecord("0x" + "d" * 40, NodeState.UNHEALTHY, chain_status=NodeStatus.ACTIVE, state_since=0.0),
    ]
    due = due_ejections(nodes, 400.0, 120.0)
    assert [e.node for e in due] == [A]
    assert "Dead for 300 s" in due[0].reason and "--eject-after" in due[0].reason and "399 s ago" in due[0].reason
    assert due_ejections(nodes, 400.0, 120.0, run_ended=True) == []   # endRun released them all
    assert due_ejections(nodes, 400.0, 120.0, holds=lambda node: node != A) == []  # another master's node
    assert due_ejections(nodes, 400.0, 120.0, not_before=lambda node: 500.0) == []  # retry later
    assert [e.node for e in due_ejections(nodes, 470.0, 120.0)] == [A, B]


def test_a_node_that_heartbeats_again_before_the_grace_is_not_due() -> None:
    st = MasterState(config=CFG)
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0, block=1))
    handle(st, NodeJoinedOnChain(A, 1.0, block=2))
    handle(st, HeartbeatReceived(A, 2.0, HeartbeatRequest()))
    handle(st, Tick(100.0))
    assert st.nodes[A].state == NodeState.DEAD
    assert due_ejections(st.nodes.values(), 150.0, 120.0) == []
    handle(st, HeartbeatReceived(A, 160.0, HeartbeatRequest()))  # back within the grace
    assert st.nodes[A].state == NodeState.HEALTHY
    assert due_ejections(st.nodes.values(), 1000.0, 120.0) == []  # no transaction, ever


def test_an_ejected_node_approved_again_at_a_newer_block_is_invited_again() -> None:
    st = MasterState(config=CFG)
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0, block=1))
    handle(st, NodeJoinedOnChain(A, 1.0, block=2))
    handle(st, NodeEjectedOnChain(A, 300.0, block=9))
    assert st.nodes[A].state == NodeState.LEFT
    assert [i for i in handle(st, NodeApprovedOnChain(A, SPECS, 301.0, block=5)) if isinstance(i, SendInvite)] == []
    out = handle(st, NodeApprovedOnChain(A, SPECS, 400.0, block=12))  # withdrew, registered, approved again
    assert [i.node for i in out if isinstance(i, SendInvite)] == [A]
    assert st.nodes[A].state == NodeState.INVITED and st.nodes[A].chain_status == NodeStatus.APPROVED
