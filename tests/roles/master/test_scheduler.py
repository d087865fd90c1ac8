"""Scheduler: placement, packing, spreading, pending, rescheduling, node reports."""

from __future__ import annotations

import pytest

from prime.chain.types import NodeStatus, Specs
from prime.protocol.errors import ValidationError
from prime.protocol.heartbeat import ReplicaReport
from prime.protocol.nodes import NodeRecord, NodeState
from prime.protocol.tasks import ReplicaState, Task, TaskSpec
from prime.roles.master.scheduler import (
    Placement,
    apply_node_report,
    apply_placements,
    check_placeable,
    desired_for,
    pick_gpus,
    place,
    release_node,
    stop_task,
)


def node(name: str, gpus: int, state: NodeState = NodeState.HEALTHY, cpu: int = 32, ram: int = 256_000) -> NodeRecord:
    return NodeRecord(name, state, Specs(gpus, "H100", 80_000, cpu, ram, 1000), NodeStatus.ACTIVE)


def task(tid: str, gpus: int | str = 0, replicas: int = 1, created: float = 0.0, **kw) -> Task:
    return Task.new(TaskSpec("busybox", gpus=gpus, replicas=replicas, **kw), created, tid)


def tasks_by_id(*ts: Task) -> dict[str, Task]:
    return {t.id: t for t in ts}


def placed(ts: dict[str, Task], nodes: list[NodeRecord], at: float = 1.0) -> list[Placement]:
    ps = place(ts.values(), nodes)
    apply_placements(ts, ps, at)
    return ps


# --- pick_gpus ---------------------------------------------------------------------------------

HW4 = Specs(4, "A100", 40_000, 16, 64_000, 100)


@pytest.mark.parametrize(
    ("gpus", "used", "expected"),
    [
        (0, set(), ()),
        (0, {0, 1, 2, 3}, ()),           # gpus=0 fits even a full node
        (1, set(), (0,)),
        (2, {0, 2}, (1, 3)),             # lowest free indices, not contiguous
        (3, {1, 2}, None),
        (4, set(), (0, 1, 2, 3)),
        (5, set(), None),
        ("all", set(), (0, 1, 2, 3)),
        ("all", {3}, None),              # all means every GPU free
    ],
)
def test_pick_gpus(gpus, used, expected) -> None:
    assert pick_gpus(TaskSpec("busybox", gpus=gpus), HW4, used) == expected


def test_all_needs_at_least_one_gpu() -> None:
    assert pick_gpus(TaskSpec("busybox", gpus="all"), Specs(0, "", 0, 4, 8000, 10), set()) is None


def test_cpu_and_memory_limits_must_fit_the_node() -> None:
    assert pick_gpus(TaskSpec("busybox", cpu_limit=16.0, memory_limit_mib=64_000), HW4, set()) == ()
    assert pick_gpus(TaskSpec("busybox", cpu_limit=16.5), HW4, set()) is None
    assert pick_gpus(TaskSpec("busybox", memory_limit_mib=64_001), HW4, set()) is None


# --- place -------------------------------------------------------------------------------------


def test_places_on_healthy_nodes_only() -> None:
    nodes = [node("a", 8, NodeState.JOINED), node("b", 8, NodeState.UNHEALTHY), node("c", 8, NodeState.DEAD),
             node("d", 8, NodeState.INVITED), node("e", 8, NodeState.LEFT)]
    ts = tasks_by_id(task("t", gpus=1))
    assert place(ts.values(), nodes) == []
    nodes.append(node("f", 8))
    assert place(ts.values(), nodes) == [Placement("t", 0, "f", (0,))]


def test_place_does_not_change_anything() -> None:
    ts = tasks_by_id(task("t", gpus=1))
    place(ts.values(), [node("a", 1)])
    assert ts["t"].replicas[0].state == ReplicaState.PENDING and ts["t"].replicas[0].node is None


def test_replicas_spread_across_nodes_before_doubling_up() -> None:
    ts = tasks_by_id(task("t", gpus=1, replicas=4))
    ps = placed(ts, [node("a", 8), node("b", 8), node("c", 8)])
    assert sorted(p.node for p in ps) == ["a", "a", "b", "c"]
    assert {r.state for r in ts["t"].replicas} == {ReplicaState.ASSIGNED}
    on_a = [r.gpu_indices for r in ts["t"].replicas if r.node == "a"]
    assert sorted(on_a) == [(0,), (1,)]  # distinct GPUs on the doubled-up node


def test_packing_prefers_the_tightest_fit_and_keeps_whole_nodes_free() -> None:
    small, big = node("small", 2), node("big", 8)
    ts = tasks_by_id(task("one", gpus=1, created=1), task("whole", gpus="all", created=2))
    ps = placed(ts, [small, big])
    assert Placement("one", 0, "small", (0,)) in ps           # leaves 'big' whole ...
    assert Placement("whole", 0, "big", tuple(range(8))) in ps  # ... for the task that needs all of it


def test_gpus_all_waits_for_a_node_with_every_gpu_free() -> None:
    ts = tasks_by_id(task("busy", gpus=1, created=1))
    placed(ts, [node("a", 4)])
    ts["whole"] = task("whole", gpus="all", created=2)
    assert place(ts.values(), [node("a", 4)]) == []
    assert ts["whole"].replicas[0].state == ReplicaState.PENDING


def test_gpu_zero_fits_on_a_full_node_and_on_gpu_less_nodes() -> None:
    ts = tasks_by_id(task("full", gpus="all", created=1), task("cpu", gpus=0, replicas=2, created=2))
    ps = placed(ts, [node("g", 2), node("nogpu", 0)])
    assert {p.node for p in ps if p.task_id == "cpu"} == {"g", "nogpu"}


def test_pending_when_nothing_fits_and_placed_once_room_appears() -> None:
    ts = tasks_by_id(task("t", gpus=4, replicas=2))
    ps = placed(ts, [node("a", 4)])
    assert [p.replica for p in ps] == [0]
    assert ts["t"].replicas[1].state == ReplicaState.PENDING
    ps = placed(ts, [node("a", 4), node("b", 4)])
    assert ps == [Placement("t", 1, "b", (0, 1, 2, 3))]


def test_gpus_held_by_running_and_lost_replicas_are_not_reused() -> None:
    ts = tasks_by_id(task("t", gpus=2, replicas=2))
    placed(ts, [node("a", 4)])
    ts["t"].replicas[0].state = ReplicaState.RUNNING
    ts["t"].replicas[1].state = ReplicaState.LOST
    ts["u"] = task("u", gpus=1, created=1)
    assert place(ts.values(), [node("a", 4)]) == []


def test_finished_replicas_free_their_gpus() -> None:
    ts = tasks_by_id(task("t", gpus=4))
    placed(ts, [node("a", 4)])
    ts["t"].replicas[0].state = ReplicaState.COMPLETED
    ts["u"] = task("u", gpus=4, created=1)
    assert place(ts.values(), [node("a", 4)]) == [Placement("u", 0, "a", (0, 1, 2, 3))]


def test_oldest_task_first_but_a_big_one_does_not_block_small_ones() -> None:
    ts = tasks_by_id(task("late", gpus=1, created=3), task("huge", gpus=16, created=1), task("early", gpus=1, created=2))
    ps = place(ts.values(), [node("a", 1)])
    assert ps == [Placement("early", 0, "a", (0,))]


def test_stopping_tasks_are_not_placed() -> None:
    t = task("t", gpus=1)
    t.stop_requested = True
    assert place([t], [node("a", 1)]) == []


# --- release (node Dead / Left) ------------------------------------------------------------------


def test_release_node_reschedules_unfinished_replicas_but_keeps_finished_ones() -> None:
    ts = tasks_by_id(task("t", gpus=1, replicas=4))
    placed(ts, [node("a", 4)])
    states = [ReplicaState.RUNNING, ReplicaState.COMPLETED, ReplicaState.FAILED, ReplicaState.LOST]
    for r, s in zip(ts["t"].replicas, states):
        r.state = s
    changes = release_node(ts.values(), "a", 50.0, "node went Dead")
    assert [(c.replica, c.old, c.new, c.node) for c in changes] == [
        (0, ReplicaState.RUNNING, ReplicaState.PENDING, "a"),
        (3, ReplicaState.LOST, ReplicaState.PENDING, "a"),
    ]
    r0, r1, r2, _ = ts["t"].replicas
    assert r0.node is None and r0.gpu_indices == () and r0.attempt == 1 and "a" in r0.error
    assert r1.state == ReplicaState.COMPLETED and r1.node == "a"
    assert r2.state == ReplicaState.FAILED and r2.node == "a"
    # and they go elsewhere
    ps = placed(ts, [node("a", 4, NodeState.DEAD), node("b", 4)])
    assert {(p.replica, p.node) for p in ps} == {(0, "b"), (3, "b")}
    assert desired_for(ts.values(), "b")[0].attempt == 1


def test_release_node_of_a_stopping_task_stops_its_replicas() -> None:
    ts = tasks_by_id(task("t", gpus=1))
    placed(ts, [node("a", 1)])
    ts["t"].stop_requested = True
    changes = release_node(ts.values(), "a", 9.0, "node went Dead")
    assert changes[0].new == ReplicaState.STOPPED and ts["t"].replicas[0].finished_at == 9.0


def test_release_leaves_other_nodes_alone() -> None:
    ts = tasks_by_id(task("t", gpus=1, replicas=2))
    placed(ts, [node("a", 1), node("b", 1)])
    release_node(ts.values(), "a", 1.0, "x")
    assert [r.node for r in ts["t"].replicas].count("b") == 1


# --- desired / reports --------------------------------------------------------------------------


def test_desired_for_lists_placed_unfinished_replicas_of_that_node() -> None:
    ts = tasks_by_id(task("t", gpus=1, replicas=3), task("s", gpus=1, created=1))
    placed(ts, [node("a", 4)])
    ts["t"].replicas[2].state = ReplicaState.COMPLETED
    desired = desired_for(ts.values(), "a")
    assert [(d.id, d.replica) for d in desired] == [("t", 0), ("t", 1), ("s", 0)]
    assert desired[0].spec == ts["t"].spec and desired[0].gpu_indices == ts["t"].replicas[0].gpu_indices
    assert desired_for(ts.values(), "b") == []
    ts["s"].stop_requested = True
    assert [(d.id, d.replica) for d in desired_for(ts.values(), "a")] == [("t", 0), ("t", 1)]


def report(tid: str, idx: int, state: str, exit_code: int | None = None, error: str | None = None) -> ReplicaReport:
    return ReplicaReport(tid, idx, ReplicaState(state), exit_code, error)


def setup_one(gpus: int = 1) -> dict[str, Task]:
    ts = tasks_by_id(task("t", gpus=gpus))
    placed(ts, [node("a", 1)])
    return ts


@pytest.mark.parametrize(
    ("before", "reported", "after"),
    [
        ("Assigned", None, "Assigned"),      # not picked up yet: stays desired
        ("Assigned", "Pulling", "Pulling"),
        ("Pulling", "Running", "Running"),
        ("Running", "Running", "Running"),
        ("Running", None, "Lost"),           # vanished on the node: Lost, still desired there
        ("Lost", "Running", "Running"),
        ("Lost", None, "Lost"),
        ("Running", "Completed", "Completed"),
        ("Running", "Failed", "Failed"),
        ("Running", "Stopped", "Stopped"),
        ("Completed", "Running", "Completed"),  # final is final
        ("Failed", None, "Failed"),
    ],
)
def test_apply_node_report(before: str, reported: str | None, after: str) -> None:
    ts = setup_one()
    r = ts["t"].replicas[0]
    r.state = ReplicaState(before)
    reports = [report("t", 0, reported, 0 if reported == "Completed" else None)] if reported else []
    changes = apply_node_report(ts.values(), "a", reports, 10.0)
    assert r.state == ReplicaState(after)
    assert len(changes) == (before != after)


def test_report_records_exit_code_error_and_times() -> None:
    ts = setup_one()
    apply_node_report(ts.values(), "a", [report("t", 0, "Running")], 10.0)
    apply_node_report(ts.values(), "a", [report("t", 0, "Running")], 20.0)
    r = ts["t"].replicas[0]
    assert r.started_at == 10.0
    apply_node_report(ts.values(), "a", [report("t", 0, "Failed", 3, "oom")], 30.0)
    assert (r.state, r.exit_code, r.error, r.finished_at) == (ReplicaState.FAILED, 3, "oom", 30.0)
    assert ts["t"].state.value == "Failed"


def test_reports_from_another_node_or_for_unknown_replicas_are_ignored() -> None:
    ts = setup_one()
    changes = apply_node_report(ts.values(), "b", [report("t", 0, "Completed", 0), report("zz", 0, "Running")], 5.0)
    assert changes == [] and ts["t"].replicas[0].state == ReplicaState.ASSIGNED


def test_stopping_task_replicas_end_stopped() -> None:
    ts = tasks_by_id(task("t", gpus=1, replicas=3))
    placed(ts, [node("a", 3)])
    for r in ts["t"].replicas:
        r.state = ReplicaState.RUNNING
    ts["t"].stop_requested = True
    changes = apply_node_report(
        ts.values(), "a", [report("t", 0, "Failed", 137), report("t", 1, "Running")], 7.0
    )
    states = [r.state for r in ts["t"].replicas]
    assert states == [ReplicaState.STOPPED, ReplicaState.RUNNING, ReplicaState.STOPPED]  # 2: not reported = gone
    assert len(changes) == 2


def test_stop_task_stops_unplaced_replicas_and_lists_placed_ones() -> None:
    ts = tasks_by_id(task("t", gpus=1, replicas=3))
    placed(ts, [node("a", 1)])
    ts["t"].replicas[0].state = ReplicaState.RUNNING
    changes, to_stop = stop_task(ts["t"], 3.0)
    assert ts["t"].stop_requested
    assert [(c.replica, c.new) for c in changes] == [(1, ReplicaState.STOPPED), (2, ReplicaState.STOPPED)]
    assert to_stop == [("a", 0)]


# --- check_placeable ------------------------------------------------------------------------------


def test_check_placeable_accepts_anything_with_no_known_nodes() -> None:
    check_placeable(TaskSpec("busybox", gpus=64), [])
    check_placeable(TaskSpec("busybox", gpus=64), [node("gone", 128, NodeState.LEFT)])


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (TaskSpec("busybox", gpus=9), "gpus", "No node in this run has 9 GPUs; the largest has 8."),
        (TaskSpec("busybox", cpu_limit=100.0), "cpu_limit", "100 CPU cores"),
        (TaskSpec("busybox", memory_limit_mib=10**7), "memory_limit_mib", "10000000 MiB"),
        (TaskSpec("busybox", gpus=8, cpu_limit=20.0), "gpus", "both"),  # 8-GPU node has only 16 cores
    ],
)
def test_check_placeable_rejects_what_no_known_node_can_hold(spec: TaskSpec, field: str, words: str) -> None:
    nodes = [node("a", 8, cpu=16), node("b", 2, NodeState.DEAD, cpu=32), node("c", 0, NodeState.INVITED)]
    with pytest.raises(ValidationError) as err:
        check_placeable(spec, nodes)
    assert err.value.field == field and words in err.value.message


def test_check_placeable_counts_unhealthy_and_invited_nodes() -> None:
    check_placeable(TaskSpec("busybox", gpus=8), [node("a", 8, NodeState.DEAD), node("b", 1)])
    check_placeable(TaskSpec("busybox", gpus="all"), [node("a", 1, NodeState.INVITED)])


def test_check_placeable_all_needs_some_gpu() -> None:
    with pytest.raises(ValidationError, match="No node in this run has a GPU"):
        check_placeable(TaskSpec("busybox", gpus="all"), [node("a", 0)])
