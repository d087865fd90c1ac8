"""Joint challenges (issue 12): which validations start together, and when — pure, then the
rendezvous in one event loop (no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from prime.roles.validator.grouping import Arrival, JointStart, due_groups, joint_groups

U1 = "GPU-11111111-1111-1111-1111-111111111111"
U2 = "GPU-22222222-2222-2222-2222-222222222222"


def keys(groups: list[list[Arrival]]) -> list[list[str]]:
    return [[a.key for a in group] for group in groups]


def test_nodes_behind_one_address_or_sharing_a_gpu_form_one_group() -> None:
    arrivals = [
        Arrival("a", "10.0.0.1", at=0.0),
        Arrival("b", "10.0.0.2", frozenset({U1}), at=0.1),
        Arrival("c", "10.0.0.1", at=0.2),  # a's address
        Arrival("d", "10.0.0.3", frozenset({U1, U2}), at=0.3),  # b's GPU
        Arrival("e", "10.0.0.4", frozenset({U2}), at=0.4),  # d's other GPU: joined through d
        Arrival("f", "10.0.0.5", at=0.05),
        Arrival("g", None, at=0.5),  # no address known: alone
    ]
    assert keys(joint_groups(arrivals)) == [["a", "c"], ["f"], ["b", "d", "e"], ["g"]]


def test_one_address_joins_groups_transitively_whatever_the_arrival_order() -> None:
    arrivals = [Arrival("x", "1.1.1.1", frozenset({U1}), at=2.0), Arrival("y", "2.2.2.2", at=1.0),
                Arrival("z", "2.2.2.2", frozenset({U1}), at=3.0)]
    assert keys(joint_groups(arrivals)) == [["y", "x", "z"]]
    assert joint_groups([]) == []


def test_a_group_starts_once_settled_and_never_later_than_the_longest_wait() -> None:
    group = [Arrival("a", "ip", at=0.0), Arrival("b", "ip", at=0.8)]
    alone = [Arrival("c", "other", at=0.5)]
    # a is waiting for b's group to settle; c alone settles at 1.5
    assert keys(due_groups(group + alone, 1.0, settle_s=1.0, max_wait_s=5.0)) == []
    assert keys(due_groups(group + alone, 1.5, settle_s=1.0, max_wait_s=5.0)) == [["c"]]
    assert keys(due_groups(group + alone, 1.8, settle_s=1.0, max_wait_s=5.0)) == [["a", "b"], ["c"]]
    # arrivals that keep coming cannot hold the first one past max_wait_s
    steady = [Arrival(str(i), "ip", at=0.5 * i) for i in range(12)]
    assert due_groups(steady, 4.9, settle_s=1.0, max_wait_s=5.0) == []
    assert len(due_groups(steady, 5.0, settle_s=1.0, max_wait_s=5.0)[0]) == 12


async def test_the_rendezvous_starts_a_group_in_one_step_and_lone_nodes_after_the_settle_time() -> None:
    joint = JointStart(settle_s=0.2, max_wait_s=2.0)
    loop = asyncio.get_running_loop()
    started: dict[str, float] = {}

    async def node(label: str, ip: str, delay: float) -> list[str]:
        await asyncio.sleep(delay)
        group = await joint.wait_turn(ip, label=label)
        started[label] = loop.time()
        return group

    t0 = loop.time()
    results = await asyncio.gather(node("a", "1.2.3.4", 0.0), node("b", "1.2.3.4", 0.1), node("c", "1.2.3.4", 0.15),
                                   node("lone", "5.6.7.8", 0.0))
    assert results[0] == results[1] == results[2] == ["a", "b", "c"]
    assert results[3] == ["lone"]
    assert max(started[k] for k in "abc") - min(started[k] for k in "abc") < 0.005  # released in one step
    assert started["a"] - t0 >= 0.15 + 0.2 - 0.01  # settled after its latest member
    assert 0.19 <= started["lone"] - t0 < started["a"] - t0
    assert joint.waiting == 0


async def test_a_cancelled_validation_leaves_its_group_and_no_settle_time_means_no_wait() -> None:
    joint = JointStart(settle_s=0.2, max_wait_s=1.0)
    waiter = asyncio.create_task(joint.wait_turn("ip", label="gone"))
    await asyncio.sleep(0.05)
    assert joint.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert joint.waiting == 0
    assert await joint.wait_turn("ip", label="late") == ["late"]  # alone: the cancelled one is not in it
    assert await JointStart(settle_s=0, max_wait_s=0).wait_turn("ip", label="now") == ["now"]
