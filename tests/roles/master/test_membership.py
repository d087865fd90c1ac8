"""One master per node (issue 14), the pure rule: NodeJoined names the holder; a removed master's
nodes go to the remaining master with the lowest keccak(node ‖ master); a master added to a run
without masters takes the orphans; replays change nothing."""

from __future__ import annotations

from eth_utils import keccak, to_checksum_address

from prime.chain.types import ChainEvent
from prime.roles.master.membership import Membership, successor

RUN = 7
M1, M2, M3 = (to_checksum_address(f"0x{i:040x}") for i in (0x111, 0x222, 0x333))
NODES = [to_checksum_address(f"0x{i:040x}") for i in range(0xA0, 0xA8)]
_block = iter(range(1, 10_000))


def ev(name: str, **args: object) -> ChainEvent:
    return ChainEvent(name, {"runId": RUN, **args}, next(_block), "0x", 0)


def test_successor_is_the_lowest_hash_of_node_and_master() -> None:
    node = NODES[0]
    scores = {m: keccak(bytes.fromhex(node[2:].lower()) + bytes.fromhex(m[2:].lower())) for m in (M1, M2, M3)}
    assert successor(node, [M1, M2, M3]) == min(scores, key=lambda m: scores[m])
    assert successor(node, [M3, M2, M1]) == successor(node, [M1, M2, M3])  # order does not matter
    assert successor(node, []) is None


def test_joined_master_holds_and_a_removed_masters_nodes_go_to_the_successor() -> None:
    m = Membership(RUN)
    for master in (M1, M2, M3):
        m.apply(ev("MasterAdded", master=master))
    for node in NODES:
        assert [c.new for c in m.apply(ev("NodeJoined", node=node, master=M1))] == [M1]
    assert all(m.holds(M1, n) for n in NODES) and not m.holds(M2, NODES[0])

    changes = m.apply(ev("MasterRemoved", master=M1))
    assert sorted(c.node for c in changes) == sorted(n.lower() for n in NODES)
    for c in changes:
        assert c.old == M1 and c.new == successor(c.node, [M2, M3]) and c.cause == "MasterRemoved"
    assert {m.holder(n) for n in NODES} <= {M2, M3}
    assert m.held_by(M1) == []

    # Adding a master later moves nothing that has a holder (no fight over held nodes).
    assert m.apply(ev("MasterAdded", master=M1)) == []


def test_orphans_wait_for_a_master_and_left_nodes_have_none() -> None:
    m = Membership(RUN)
    m.apply(ev("MasterAdded", master=M1))
    m.apply(ev("NodeJoined", node=NODES[0], master=M1))
    m.apply(ev("NodeJoined", node=NODES[1], master=M1))
    m.apply(ev("NodeLeft", node=NODES[1]))
    assert m.holder(NODES[1]) is None
    changes = m.apply(ev("MasterRemoved", master=M1))
    assert [(c.node, c.new) for c in changes] == [(NODES[0].lower(), None)]
    adopted = m.apply(ev("MasterAdded", master=M2))
    assert [(c.node, c.new) for c in adopted] == [(NODES[0].lower(), M2)]  # the left node stays out


def test_replayed_and_foreign_events_change_nothing() -> None:
    m = Membership(RUN)
    added = ev("MasterAdded", master=M1)
    joined = ev("NodeJoined", node=NODES[0], master=M1)
    m.apply(added)
    m.apply(joined)
    removed = ev("MasterRemoved", master=M1)
    m.apply(removed)
    for again in (added, joined, removed):
        assert m.apply(again) == []
    assert m.holder(NODES[0]) is None
    other_run = ChainEvent("NodeJoined", {"runId": RUN + 1, "node": NODES[1], "master": M2}, 99_999, "0x", 0)
    assert m.apply(other_run) == [] and m.holder(NODES[1]) is None
