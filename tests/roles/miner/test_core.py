"""The miner's core on its own: no network, no chain, no Docker, no event loop."""

from __future__ import annotations

from typing import Any

import pytest

from prime.protocol.heartbeat import DesiredReplica, HeartbeatRequest
from prime.protocol.tasks import ReplicaState, RestartPolicy
from prime.roles.miner import core
from prime.roles.miner.core import Book, Keep, Policy, ReplicaStatus, Restart, Resume, Start, Stop

POLICY = Policy(retention_s=100.0, push_grace_s=10.0, backoff_s=1.0, backoff_max_s=8.0)


def desired(task_id: str = "t1", *, replica: int = 0, attempt: int = 0, gpus: tuple[int, ...] = (), **spec: Any) -> DesiredReplica:
    return DesiredReplica.from_json({
        "id": task_id, "replica": replica, "attempt": attempt, "gpu_indices": list(gpus),
        "spec": {"image": "busybox:1", "command": ["true"], **spec},
    })


def seen(entry: DesiredReplica | str, state: ReplicaState = ReplicaState.RUNNING, *, container: bool = True,
         replica: int = 0, exit_code: int | None = None, node_gpus: tuple[int, ...] = (), **fields: Any) -> ReplicaStatus:
    """What the executor would report of ``entry``'s container (a matching hash and policy)."""
    if isinstance(entry, str):
        return ReplicaStatus(entry, replica, state, exit_code=exit_code, container_id="c-" + entry if container else None, **fields)
    placement = core.place(entry, node_gpus)
    values: dict[str, Any] = {
        "exit_code": exit_code, "container_id": f"c-{entry.id}-{entry.replica}" if container else None,
        "spec_hash": placement.spec_hash(), "restart": placement.restart,
    }
    values.update(fields)
    return ReplicaStatus(entry.id, entry.replica, state, **values)


def run(wanted: list[DesiredReplica] | None, snapshot: list[ReplicaStatus], book: Book = Book(), now: float = 0.0,
        node_gpus: tuple[int, ...] = ()) -> core.Plan:
    return core.plan(wanted, snapshot, book, now, POLICY, node_gpus)


def by_key(plan: core.Plan) -> dict[tuple[str, int], core.Action]:
    return {a.key: a for a in plan.actions}


# --- happy paths -------------------------------------------------------------------------------


def test_missing_replicas_are_started_running_ones_kept() -> None:
    a, b = desired("a"), desired("b")
    plan = run([a, b], [seen(a)])
    actions = by_key(plan)
    assert isinstance(actions[("a", 0)], Keep)
    assert isinstance(actions[("b", 0)], Start) and actions[("b", 0)].placement.desired == b
    assert not actions[("b", 0)].replace
    assert [(r.id, r.state) for r in plan.reports] == [("a", ReplicaState.RUNNING)]


def test_a_changed_spec_replaces_the_container() -> None:
    old, new = desired("a", attempt=0), desired("a", attempt=1)
    assert core.place(old, ()).spec_hash() != core.place(new, ()).spec_hash()
    (action,) = run([new], [seen(old)]).actions
    assert isinstance(action, Start) and action.replace


def test_placement_maps_gpu_positions_and_keeps_the_label_format() -> None:
    entry = desired("abc", replica=2, attempt=3, gpus=(1,), env={"A": "1"}, persistent=True, cpu_limit=1.5,
                    memory_limit_mib=512, restart="on-failure")
    placement = core.place(entry, [4, 6])
    assert placement.gpus == (6,) and placement.key == ("abc", 2) and placement.restart is RestartPolicy.ON_FAILURE
    assert placement.environment() == {"A": "1", "PRIME_ATTEMPT": "3"}
    assert placement.record() == {
        "task_id": "abc", "image": "busybox:1", "command": ["true"], "env": {"A": "1", "PRIME_ATTEMPT": "3"},
        "gpus": [6], "replica": 2, "persistent": True, "cpu_limit": 1.5, "memory_limit_mib": 512,
        "restart": "on-failure", "max_restarts": None,
    }
    # The hashes earlier miners wrote for these same containers (label format v1): adoption survives an upgrade.
    assert placement.spec_hash() == "c82a2304bede169b65ded931f634563b7d4fe7be735f45e1c23842f486b430a9"
    assert core.place(desired("x1"), []).spec_hash() == "1f926a1f15b27bae4593a97da9b7d55e0ebd75206afcec30419292d7ab2771d3"
    assert core.place(desired("x1", attempt=1), []).spec_hash() != core.place(desired("x1"), []).spec_hash()


def test_created_but_not_started_containers_are_resumed() -> None:
    a = desired("a")
    (action,) = run([a], [seen(a, ReplicaState.PULLING)]).actions
    assert action == Resume(("a", 0), "c-a-0")
    # A start in flight (no container yet) is left to finish.
    (action,) = run([a], [seen(a, ReplicaState.PULLING, container=False)]).actions
    assert isinstance(action, Keep)


# --- hostile and edge cases --------------------------------------------------------------------


def test_an_empty_desired_list_stops_what_runs_and_keeps_finished_ones_a_while() -> None:
    running, done, failed = desired("run"), desired("done"), desired("bad")
    snapshot = [seen(running), seen(done, ReplicaState.COMPLETED, exit_code=0), seen(failed, ReplicaState.FAILED, exit_code=2)]
    plan = run([], snapshot)
    actions = by_key(plan)
    assert isinstance(actions[("run", 0)], Stop)
    assert isinstance(actions[("done", 0)], Keep) and actions[("done", 0)].until == 100.0
    assert isinstance(actions[("bad", 0)], Keep)
    later = run([], snapshot[1:], plan.book, now=150.0)
    assert {type(a) for a in later.actions} == {Stop}
    assert later.book.finished_since == {}
    assert run([], []).actions == ()


def test_unknown_replicas_running_are_stopped() -> None:
    stranger = seen("stranger")  # a labelled container of this node the master never listed (no readable spec)
    plan = run([desired("a")], [stranger])
    assert isinstance(by_key(plan)[("stranger", 0)], Stop)
    # ... but a supervise tick (no list from the master) never stops or starts anything.
    assert {type(a) for a in run(None, [stranger]).actions} == {Keep}


def test_crash_loop_restarts_with_doubling_backoff_up_to_the_cap() -> None:
    entry = desired("loop", restart="on-failure")
    failed = seen(entry, ReplicaState.FAILED, exit_code=3, reason="exited with code 3")
    book, now, restarts_at = Book(), 0.0, []
    while now < 60.0:
        plan = run([entry], [failed], book, now)
        book = plan.book
        (action,) = plan.actions
        if isinstance(action, Restart):
            restarts_at.append(now)
            assert action.count == len(restarts_at) and action.container_id == failed.container_id
        else:
            assert isinstance(action, Keep) and action.until is not None and action.until > now
        now += 0.5
    gaps = [b - a for a, b in zip(restarts_at, restarts_at[1:])]
    # Each failure is first seen half a second after the restart, then waits 2, 4, 8, 8 ... seconds.
    assert restarts_at[0] == 1.0 and gaps[:4] == [2.5, 4.5, 8.5, 8.5]
    assert book.restart_count(("loop", 0)) == len(restarts_at)
    # While it backs off, the master hears that it is not final yet.
    assert [r.state for r in plan.reports] == [ReplicaState.PULLING]


def test_restart_never_keeps_a_failed_replica_failed() -> None:
    entry = desired("once")
    failed = seen(entry, ReplicaState.FAILED, exit_code=7, reason="exited with code 7")
    for now in (0.0, 10.0, 1000.0):
        plan = run([entry], [failed], now=now)
        assert [type(a) for a in plan.actions] == [Keep]
    assert [(r.state, r.exit_code, r.error) for r in plan.reports] == [(ReplicaState.FAILED, 7, "exited with code 7")]
    # A supervise tick agrees.
    assert [type(a) for a in run(None, [failed]).actions] == [Keep]


def test_supervise_ticks_restart_adopted_containers_by_their_label() -> None:
    entry = desired("adopted", restart="on-failure")
    failed = seen(entry, ReplicaState.FAILED, exit_code=1)
    first = run(None, [failed], now=0.0)
    assert [type(a) for a in first.actions] == [Keep]
    second = run(None, [failed], first.book, now=1.0)
    assert [type(a) for a in second.actions] == [Restart]
    assert [type(a) for a in run(None, [seen(entry, ReplicaState.PULLING)]).actions] == [Resume]


def test_clock_going_backwards_never_stretches_a_wait() -> None:
    entry = desired("loop", restart="on-failure")
    failed = seen(entry, ReplicaState.FAILED, exit_code=1)
    book = run([entry], [failed], now=1000.0).book  # failure seen at 1000
    plan = run([entry], [failed], book, now=5.0)  # the clock jumped back
    assert isinstance(plan.actions[0], Keep) and plan.actions[0].until == 6.0
    assert isinstance(run([entry], [failed], plan.book, now=6.0).actions[0], Restart)

    done = desired("done")
    book = run([], [seen(done, ReplicaState.COMPLETED, exit_code=0)], now=1000.0).book
    plan = run([], [seen(done, ReplicaState.COMPLETED, exit_code=0)], book, now=0.0)
    assert plan.book.finished_since[("done", 0)] == 0.0
    assert isinstance(run([], [seen(done, ReplicaState.COMPLETED)], plan.book, now=100.0).actions[0], Stop)

    pushed = core.pushed(Book(), core.place(desired("p"), ()), now=1000.0)
    plan = run([], [seen(desired("p"))], pushed, now=0.0)
    assert isinstance(plan.actions[0], Keep) and plan.actions[0].until == 10.0


def test_duplicate_desired_entries_start_one_container_the_last_wins() -> None:
    first, last = desired("dup", attempt=0), desired("dup", attempt=1)
    (action,) = run([first, last], []).actions
    assert isinstance(action, Start) and action.placement.desired == last
    # An unplaceable duplicate after a good one: the last word is the failure.
    plan = run([first, desired("dup", gpus=(3,))], [])
    assert plan.actions == () and "offers only 0" in plan.book.invalid[("dup", 0)]


def test_a_finished_replica_is_never_started_again_while_desired() -> None:
    entry = desired("done", restart="on-failure")
    plan = run([entry], [seen(entry, ReplicaState.COMPLETED, exit_code=0)], now=1e6)
    assert [type(a) for a in plan.actions] == [Keep]
    assert plan.reports[0].state == ReplicaState.COMPLETED and plan.reports[0].exit_code == 0


def test_a_start_that_failed_before_a_container_is_tried_again() -> None:
    entry = desired("pull")
    record = seen(entry, ReplicaState.FAILED, container=False, reason="the image could not be pulled")
    (action,) = run([entry], [record]).actions
    assert isinstance(action, Start) and not action.replace


def test_unplaceable_replicas_are_reported_failed_and_forgotten_when_undesired() -> None:
    plan = run([desired("g", gpus=(0,)), desired("m", memory_limit_mib=2)], [])
    assert plan.actions == ()
    reports = {r.id: r for r in plan.reports}
    assert reports["g"].state == ReplicaState.FAILED and "offers only 0" in reports["g"].error
    assert "at least 6" in reports["m"].error
    assert run([], [], plan.book).book.invalid == {}
    # A replica that fits this node's GPUs is placed on the cards, not the positions.
    (action,) = run([desired("ok", gpus=(1, 0))], [], node_gpus=(4, 6)).actions
    assert action.placement.gpus == (6, 4)


def test_a_pushed_replica_outlives_an_older_list_for_the_grace_only() -> None:
    placement = core.place(desired("p"), ())
    book = core.pushed(Book(), placement, now=0.0)
    assert isinstance(run([], [seen(desired("p"))], book, now=5.0).actions[0], Keep)
    later = run([], [seen(desired("p"))], book, now=11.0)
    assert isinstance(later.actions[0], Stop) and later.book.pushed_at == {}
    assert core.forget_task(book, "p").pushed_at == {}


def test_restartable_undesired_replicas_are_stopped_not_kept() -> None:
    entry = desired("r", restart="on-failure")
    (action,) = run([], [seen(entry, ReplicaState.FAILED, exit_code=1)]).actions
    assert isinstance(action, Stop)


def test_start_failures_are_reported_until_the_next_list() -> None:
    book = core.start_failed(Book(), ("t", 0), "Docker is down")
    assert [(r.id, r.state, r.error) for r in core.reports([], book)] == [("t", ReplicaState.FAILED, "Docker is down")]
    assert run([desired("t")], [], book).book.invalid == {}


def test_reports_skip_ids_the_wire_cannot_name_and_the_master_parses_them() -> None:
    snapshot = [
        ReplicaStatus("a", 0, ReplicaState.RUNNING),
        ReplicaStatus("b", 1, ReplicaState.COMPLETED, exit_code=0),
        ReplicaStatus("not.a.master.id", 0, ReplicaState.RUNNING),
        ReplicaStatus("huge", 9999, ReplicaState.RUNNING),
        ReplicaStatus("long", 0, ReplicaState.FAILED, exit_code=1, reason="x" * 10_000),
    ]
    reports = core.reports(snapshot, Book())
    assert [r.id for r in reports] == ["a", "b", "long"]
    assert len(reports[2].error) == 4096
    request = HeartbeatRequest(tasks=tuple(reports), gpus=(), load={})
    assert HeartbeatRequest.from_json(request.to_json()) == request


@pytest.mark.parametrize("restarts", [-1, 0, 3, 10_000])
def test_backoff_delay_is_bounded(restarts: int) -> None:
    assert 1.0 <= core.backoff_delay(restarts, 1.0, 300.0) <= 300.0
    assert [core.backoff_delay(n, 1.0, 60.0) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_the_status_dict_keeps_the_tasks_route_shape() -> None:
    status = ReplicaStatus("a", 0, ReplicaState.RUNNING, container_id="c", spec_hash="h", gpus="", restart=RestartPolicy.NEVER)
    assert status.to_dict(restarts=2) == {
        "task_id": "a", "replica": 0, "state": "Running", "exit_code": None, "reason": None, "container_id": "c",
        "spec_hash": "h", "restarts": 2, "gpus": "",
    }
