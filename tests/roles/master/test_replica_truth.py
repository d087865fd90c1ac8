"""Truthful replica states at the master (pure core): a node's Lost report is rescheduled by the
Dead-node policy, an unpullable image fails the replica with the node's reason, restart counts
are kept and served, a Completed replica's note never says Lost, states never go back."""

from __future__ import annotations

from prime.protocol.heartbeat import HeartbeatRequest, ReplicaReport
from prime.protocol.tasks import ReplicaState, Task, TaskView
from prime.roles.buyer.render import task_detail
from prime.roles.master.state import HeartbeatReceived, MasterState, StartReplica, TaskCreated, Tick, handle
from tests.roles.master.test_state import A, B, fresh, member, new_task, of


def _beat(st: MasterState, node: str, at: float, *reports: ReplicaReport) -> list:
    return handle(st, HeartbeatReceived(node, at, HeartbeatRequest(tasks=reports)))


def _placed(nodes: tuple[str, ...] = (A,), **spec) -> tuple[MasterState, Task]:  # type: ignore[no-untyped-def]
    st = fresh()
    for node in nodes:
        member(st, node)
    task = new_task("t", **spec)
    handle(st, TaskCreated(task))
    return st, st.tasks["t"]


def test_a_replica_its_node_reports_lost_is_rescheduled_a_new_attempt() -> None:
    st, task = _placed()
    r = task.replicas[0]
    node = r.node
    assert node is not None
    _beat(st, node, 2.0, ReplicaReport("t", 0, ReplicaState.RUNNING))
    st.dirty_tasks.clear()
    out = _beat(st, node, 3.0, ReplicaReport("t", 0, ReplicaState.LOST, error="the Docker engine sent it signal 15"))
    assert r.attempt == 1 and r.state == ReplicaState.ASSIGNED  # Pending, then placed again at once
    assert of(out, StartReplica) == [StartReplica(r.node, "t", 0)]
    assert "Lost on node" in (r.error or "") and "signal 15" in (r.error or "")
    assert "t" in st.dirty_tasks and task.state.value == "Pending"  # never Completed
    # The new attempt completes: its note no longer speaks of the loss.
    _beat(st, r.node, 4.0, ReplicaReport("t", 0, ReplicaState.RUNNING))
    _beat(st, r.node, 5.0, ReplicaReport("t", 0, ReplicaState.COMPLETED, exit_code=0))
    assert (r.state, r.error, task.state.value) == (ReplicaState.COMPLETED, None, "Completed")


def test_a_completed_replica_never_keeps_a_dead_nodes_note() -> None:
    st, task = _placed((A, B))
    r = task.replicas[0]
    first = r.node
    assert first is not None
    _beat(st, first, 2.0, ReplicaReport("t", 0, ReplicaState.RUNNING))
    other = B if first == A else A
    for now in range(5, 120, 5):  # the first node goes silent and Dead; the other keeps beating
        handle(st, HeartbeatReceived(other, float(now), HeartbeatRequest(tasks=())))
        handle(st, Tick(float(now)))
    assert r.node == other and r.attempt == 1 and "went Dead" in (r.error or "")
    _beat(st, other, 121.0, ReplicaReport("t", 0, ReplicaState.COMPLETED, exit_code=0))
    assert r.state == ReplicaState.COMPLETED and r.error is None


def test_an_image_that_can_never_be_pulled_fails_the_replica_with_the_nodes_reason() -> None:
    st, task = _placed()
    r = task.replicas[0]
    assert r.node is not None
    why = "the image 'nosuch/img:1' is not available locally and could not be pulled: manifest unknown"
    _beat(st, r.node, 2.0, ReplicaReport("t", 0, ReplicaState.PULLING))
    _beat(st, r.node, 3.0, ReplicaReport("t", 0, ReplicaState.FAILED, error=why))
    assert (r.state, r.error, task.state.value) == (ReplicaState.FAILED, why, "Failed")


def test_running_never_goes_back_to_pulling_and_restart_counts_are_kept_and_shown() -> None:
    st, task = _placed(restart="on-failure")
    r = task.replicas[0]
    assert r.node is not None
    _beat(st, r.node, 2.0, ReplicaReport("t", 0, ReplicaState.RUNNING))
    st.dirty_tasks.clear()
    out = _beat(st, r.node, 3.0, ReplicaReport("t", 0, ReplicaState.PULLING, error="exited with code 3"))
    assert r.state == ReplicaState.RUNNING and of(out, object) == []  # waiting for its restart: still Running
    _beat(st, r.node, 4.0, ReplicaReport("t", 0, ReplicaState.RUNNING, restarts=1))
    assert r.restarts == 1 and "t" in st.dirty_tasks  # flushed although no state changed
    view = TaskView.from_json(task.to_json())
    assert view.replicas[0].restarts == 1
    assert Task.from_json(task.to_json()).replicas[0].restarts == 1
    old = task.to_json()
    del old["replicas"][0]["restarts"]  # a record stored before the field
    assert Task.from_json(old).replicas[0].restarts == 0
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(task_detail(task.to_json(), now=5.0))
    assert "Restarts" in console.export_text()


def test_a_report_of_another_attempt_is_ignored() -> None:
    st, task = _placed()
    r = task.replicas[0]
    node = r.node
    assert node is not None
    _beat(st, node, 2.0, ReplicaReport("t", 0, ReplicaState.RUNNING, attempt=0))
    _beat(st, node, 3.0, ReplicaReport("t", 0, ReplicaState.LOST, attempt=0))
    assert (r.state, r.attempt) == (ReplicaState.ASSIGNED, 1)
    # The node's next beat still shows the old attempt's container, Lost: not lost again.
    _beat(st, node, 4.0, ReplicaReport("t", 0, ReplicaState.LOST, attempt=0))
    assert (r.state, r.attempt) == (ReplicaState.ASSIGNED, 1)
    _beat(st, node, 5.0, ReplicaReport("t", 0, ReplicaState.RUNNING, attempt=1))
    assert (r.state, r.attempt) == (ReplicaState.RUNNING, 1)
    _beat(st, node, 6.0, ReplicaReport("t", 0, ReplicaState.COMPLETED, exit_code=0, attempt=0))  # a leftover
    assert r.state == ReplicaState.RUNNING


def test_a_stopping_tasks_lost_replica_is_stopped_not_rescheduled() -> None:
    st, task = _placed()
    r = task.replicas[0]
    node = r.node
    assert node is not None
    _beat(st, node, 2.0, ReplicaReport("t", 0, ReplicaState.RUNNING))
    task.stop_requested = True
    _beat(st, node, 3.0, ReplicaReport("t", 0, ReplicaState.LOST))
    assert (r.state, r.attempt) == (ReplicaState.STOPPED, 0)
