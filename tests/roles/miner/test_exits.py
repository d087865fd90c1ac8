"""Lost vs Completed/Failed (miner/exits.py and the core): pure, no Docker."""

from __future__ import annotations

import json
from typing import Any

from prime.protocol.heartbeat import DesiredReplica, HeartbeatRequest
from prime.protocol.tasks import ReplicaState, RestartPolicy
from prime.roles.miner import core, exits
from prime.roles.miner.containers import attempt_of, finished_at
from prime.roles.miner.core import Book, Keep, ReplicaStatus, Restart, Start, Stop

POLICY = core.Policy(retention_s=100.0, push_grace_s=10.0, backoff_s=1.0, backoff_max_s=8.0)


def desired(task_id: str = "t1", attempt: int = 0, **spec: Any) -> DesiredReplica:
    return DesiredReplica.from_json({"id": task_id, "replica": 0, "attempt": attempt, "gpu_indices": [],
                                     "spec": {"image": "busybox:1", "command": ["true"], **spec}})


def exited(entry: DesiredReplica, state: ReplicaState, exit_code: int | None, **fields: Any) -> ReplicaStatus:
    placement = core.place(entry, ())
    values: dict[str, Any] = {"container_id": "c1", "spec_hash": placement.spec_hash(), "restart": placement.restart,
                              "exit_code": exit_code, "finished_at": 1000.0}
    values.update(fields)
    return ReplicaStatus(entry.id, 0, state, **values)


def reported(plan: core.Plan) -> list[tuple[str, ReplicaState, int]]:
    return [(r.id, r.state, r.restarts) for r in plan.reports]


def test_a_plain_exit_stays_completed_or_failed() -> None:
    entry = desired()
    for state, code in [(ReplicaState.COMPLETED, 0), (ReplicaState.FAILED, 143), (ReplicaState.FAILED, 137)]:
        plan = core.plan([entry], [exited(entry, state, code)], Book(), 5.0, POLICY)
        assert reported(plan) == [("t1", state, 0)]  # no outside signal, no outage: the task's own exit


def test_an_outside_signal_makes_an_exit_0_lost_and_it_is_kept_not_restarted() -> None:
    entry = desired(restart="on-failure")
    book = Book(marks=exits.engine_signal(exits.Marks(), ("t1", 0), "c1", "15", now=3.0))
    plan = core.plan([entry], [exited(entry, ReplicaState.COMPLETED, 0)], book, 5.0, POLICY)
    assert reported(plan) == [("t1", ReplicaState.LOST, 0)]
    assert "signal 15" in (plan.reports[0].error or "")
    assert isinstance(plan.actions[0], Keep)  # the master reschedules it (a new attempt), the miner waits
    # Undesired (the master moved it): its container goes.
    plan = core.plan([], [exited(entry, ReplicaState.COMPLETED, 0)], plan.book, 6.0, POLICY)
    assert [type(a) for a in plan.actions] == [Stop]


def test_the_miners_own_stops_are_not_outside_signals() -> None:
    entry = desired()
    running = exited(entry, ReplicaState.RUNNING, None, finished_at=None)
    plan = core.plan([], [running], Book(), 10.0, POLICY)  # the master no longer lists it
    assert [type(a) for a in plan.actions] == [Stop]
    assert exits.engine_signal(plan.book.marks, ("t1", 0), "c1", "15", 11.0) is plan.book.marks
    # A replacement (new attempt) is a stop the miner asked for too.
    plan = core.plan([desired(attempt=1)], [running], Book(), 10.0, POLICY)
    assert isinstance(plan.actions[0], Start) and plan.actions[0].replace
    assert exits.engine_signal(plan.book.marks, ("t1", 0), "c1", "15", 11.0) is plan.book.marks
    # A task-wide stop (DELETE /tasks/{id}) covers every replica; long after it, a signal is outside again.
    marks = exits.stop_asked(exits.Marks(), ("t1", exits.ALL_REPLICAS), 10.0)
    assert exits.engine_signal(marks, ("t1", 3), "c9", "9", 12.0) is marks
    assert "c9" in exits.engine_signal(marks, ("t1", 3), "c9", "9", 10.0 + exits.STOP_GRACE_S + 1).signalled


def test_an_exit_during_an_engine_outage_is_lost() -> None:
    entry = desired()
    marks = exits.engine_back(exits.engine_away(exits.Marks(), 998.0), 1010.0)
    assert marks.outages == ((998.0, 1010.0),) and marks.away_since is None
    book = Book(marks=marks)
    plan = core.plan([entry], [exited(entry, ReplicaState.COMPLETED, 0, finished_at=1001.5)], book, 5.0, POLICY)
    assert reported(plan) == [("t1", ReplicaState.LOST, 0)]
    # Long after the engine came back: the task's own exit.
    plan = core.plan([entry], [exited(entry, ReplicaState.COMPLETED, 0, finished_at=1100.0)], book, 5.0, POLICY)
    assert reported(plan) == [("t1", ReplicaState.COMPLETED, 0)]
    # The stream's last sign of life counts as the outage's start when it is earlier.
    assert exits.engine_back(exits.engine_away(exits.Marks(), 998.0), 1010.0, last_seen=990.0).outages == ((990.0, 1010.0),)
    many = exits.Marks()
    for i in range(exits.MAX_OUTAGES + 5):
        many = exits.engine_back(exits.engine_away(many, float(i)), float(i) + 0.5)
    assert len(many.outages) == exits.MAX_OUTAGES


def test_outside_signals_of_gone_containers_are_forgotten() -> None:
    marks = exits.engine_signal(exits.Marks(), ("t1", 0), "c1", "15", now=0.0)
    assert "c1" in exits.prune(marks, ["c1"], 500.0).signalled
    assert "c1" not in exits.prune(marks, [], 500.0).signalled
    assert exits.prune(marks, [], 1.0).signalled  # within the grace: the snapshot may predate the container


def test_restart_counts_are_reported_and_parse_on_the_wire() -> None:
    entry = desired(restart="on-failure")
    failed = exited(entry, ReplicaState.FAILED, 3)
    plan = core.plan([entry], [failed], Book(), 0.0, POLICY)
    plan = core.plan([entry], [failed], plan.book, 1.0, POLICY)
    assert isinstance(plan.actions[0], Restart)
    running = exited(entry, ReplicaState.RUNNING, None, finished_at=None)
    plan = core.plan([entry], [running], plan.book, 2.0, POLICY)
    assert reported(plan) == [("t1", ReplicaState.RUNNING, 1)]
    wire = HeartbeatRequest(tasks=plan.reports).to_json()
    assert wire["tasks"][0]["restarts"] == 1
    assert HeartbeatRequest.from_json(wire).tasks[0].restarts == 1
    # None restarted: the field is left out, so the report reads the same to older masters.
    zero = core.plan([entry], [running], Book(), 2.0, POLICY)
    assert "restarts" not in HeartbeatRequest(tasks=zero.reports).to_json()["tasks"][0]
    lost = HeartbeatRequest.from_json({"tasks": [{"id": "t1", "replica": 0, "state": "Lost"}]})
    assert lost.tasks[0].state is ReplicaState.LOST


def test_a_pull_that_can_never_succeed_is_reported_failed_even_with_on_failure() -> None:
    never = "the image 'nosuch:1' is not available locally and could not be pulled: manifest unknown"
    flaky = "the image 'x:1' is not available locally and could not be pulled: connection reset by peer"
    for reason, state in [(never, ReplicaState.FAILED), (flaky, ReplicaState.PULLING)]:
        status = ReplicaStatus("t1", 0, ReplicaState.FAILED, reason=reason, restart=RestartPolicy.ON_FAILURE)
        [report] = core.reports([status], Book())
        assert (report.state, report.error) == (state, reason)


def test_reports_name_their_attempt_and_a_leftover_of_another_attempt_is_not_reported() -> None:
    old, new = desired(attempt=0), desired(attempt=1)
    label = json.dumps(core.place(new, ()).record())
    assert attempt_of(label) == 1 and attempt_of("{}") is None and attempt_of(None) is None
    lost = exited(old, ReplicaState.COMPLETED, 0, attempt=0)
    book = Book(marks=exits.engine_signal(exits.Marks(), ("t1", 0), "c1", "15", now=1.0))
    assert reported(core.plan([old], [lost], book, 2.0, POLICY)) == [("t1", ReplicaState.LOST, 0)]
    # The master rescheduled it here (attempt 1): until the container is replaced, the old one is not
    # reported (the master would take it for the new attempt); each report names its attempt.
    plan = core.plan([new], [lost], book, 3.0, POLICY)
    assert plan.reports == () and isinstance(plan.actions[0], Start) and plan.actions[0].replace
    assert core.reports([lost], plan.book) == []
    running = exited(new, ReplicaState.RUNNING, None, attempt=1, container_id="c2", finished_at=None)
    [report] = core.reports([running], plan.book)
    assert report.state is ReplicaState.RUNNING and report.to_json()["attempt"] == 1
    assert HeartbeatRequest.from_json(HeartbeatRequest(tasks=(report,)).to_json()).tasks[0].attempt == 1
    # Without a list from the master (a restarted miner), a leftover is reported under its own attempt.
    [leftover] = core.reports([lost], Book())
    assert (leftover.state, leftover.attempt) == (ReplicaState.COMPLETED, 0)
    # A desired replica that cannot run here is reported Failed under the attempt the master asked for.
    unplaceable = DesiredReplica.from_json({**desired(attempt=2).to_json(), "gpu_indices": [5]})
    [failed] = core.plan([unplaceable], [], Book(), 4.0, POLICY).reports
    assert (failed.state, failed.attempt) == (ReplicaState.FAILED, 2)
    assert core.pushed(Book(), core.place(desired(attempt=4), ()), 0.0).attempts == {("t1", 0): 4}


def test_finished_at_parses_dockers_times() -> None:
    assert finished_at({"State": {"FinishedAt": "1970-01-01T00:16:40.5Z"}}) == 1000.5
    assert finished_at({"State": {"FinishedAt": "0001-01-01T00:00:00Z"}}) is None
    assert finished_at({"State": {}}) is None and finished_at({"State": {"FinishedAt": "garbage"}}) is None
