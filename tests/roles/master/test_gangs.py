"""Group tasks in the master's core (gangs.py): state.handle with group tasks, no I/O.

The group state machine's own rules are in test_groups.py; here: replicas as members, the
heartbeat's desired entries with every member's environment, reports folded into the group,
nodes dying, GPUs and ports shared with other tasks, and the stored state.
"""

from __future__ import annotations

import json
from pathlib import Path

from prime.chain.types import Specs
from prime.protocol.groups import GroupPhase, GroupRequest
from prime.protocol.heartbeat import HeartbeatRequest, ReplicaReport
from prime.protocol.tasks import ReplicaState, Task, TaskSpec, TaskState
from prime.roles.master.state import (
    ChainSynced,
    HeartbeatReceived,
    MasterStarted,
    MasterState,
    NodeApprovedOnChain,
    NodeJoinedOnChain,
    NodeUrlResolved,
    RecordGroupTransition,
    RecordReplicaTransition,
    StartReplica,
    StateConfig,
    StopReplica,
    SyncStorage,
    SyncSucceeded,
    TaskCreated,
    TaskStopRequested,
    Tick,
    handle,
    heartbeat_response,
)
from prime.roles.master.store import MasterStore
from prime.store import Database

CFG = StateConfig(heartbeat_interval_s=10, unhealthy_after_missed=2, dead_after_missed=5, grace_s=5)
SPECS = Specs(4, "H100", 80_000, 32, 256_000, 1000)
A, B, C, D = (f"0x{i:040x}" for i in range(0xA, 0xE))
PORTS = {A: (29500, 29509), B: (29510, 29519), C: (29520, 29529), D: (29530, 29539)}
HOST = {A: "10.0.0.1", B: "10.0.0.2", C: "10.0.0.3", D: "10.0.0.4"}


def of(instructions: list, kind: type) -> list:
    return [i for i in instructions if isinstance(i, kind)]


def fresh() -> MasterState:
    st = MasterState(CFG)
    handle(st, MasterStarted(0.0))
    handle(st, ChainSynced(0.0))
    return st


def beat(st: MasterState, node: str, at: float, *reports: ReplicaReport, ports: bool = True) -> list:
    return handle(st, HeartbeatReceived(node, at, HeartbeatRequest(tuple(reports), task_ports=PORTS[node] if ports else None)))


def node(st: MasterState, address: str, at: float = 1.0, *, ports: bool = True) -> list:
    handle(st, NodeApprovedOnChain(address, SPECS, at))
    handle(st, NodeUrlResolved(address, f"http://{HOST[address]}:8000", at))
    handle(st, NodeJoinedOnChain(address, at))
    return beat(st, address, at, ports=ports)


def group_task(tid: str = "g", nodes: int = 2, max_nodes: int | None = None, *, gpus: int = 2, persistent: bool = False,
               timeout: float = 60.0, restarts: int = 3, at: float = 2.0) -> Task:
    spec = TaskSpec(image="busybox", gpus=gpus, persistent=persistent,
                    group=GroupRequest(nodes, max_nodes, start_timeout_s=timeout, max_restarts=restarts))
    return Task.new(spec, at, tid)


def report(tid: str, rank: int, state: ReplicaState, attempt: int, code: int | None = None, error: str | None = None) -> ReplicaReport:
    return ReplicaReport(tid, rank, state, exit_code=code, error=error, attempt=attempt)


def desired_env(st: MasterState, address: str) -> list[dict[str, str]]:
    return [dict(d.env) for d in heartbeat_response(st, address).desired]


def run_both(st: MasterState, tid: str, at: float, attempt: int = 0) -> None:
    for rank, address in enumerate(members(st, tid)):
        beat(st, address, at, report(tid, rank, ReplicaState.RUNNING, attempt))


def members(st: MasterState, tid: str) -> list[str]:
    return [r.node for r in st.tasks[tid].replicas if r.node is not None]


def test_a_group_waits_for_n_ported_nodes_then_all_members_are_placed_in_one_step() -> None:
    st = fresh()
    node(st, A)
    node(st, C, ports=False)  # no --task-ports: hosts no member
    assert of(handle(st, TaskCreated(group_task())), StartReplica) == []
    task = st.tasks["g"]
    assert task.state == TaskState.PENDING and task.group is not None and task.group.phase == GroupPhase.PENDING
    assert all(r.node is None for r in task.replicas) and heartbeat_response(st, A).desired == ()
    out = node(st, B, at=3.0)
    starts = of(out, StartReplica)
    assert sorted((s.node, s.replica) for s in starts) == [(A, 0), (B, 1)]  # both pushed from one event
    assert [r.state for r in task.replicas] == [ReplicaState.ASSIGNED, ReplicaState.ASSIGNED]
    assert task.group.phase == GroupPhase.STARTING and task.group.attempt == 0
    (transition,) = of(out, RecordGroupTransition)
    assert (transition.old, transition.new, transition.attempt) == (GroupPhase.PENDING, GroupPhase.STARTING, 0)
    (entry,) = heartbeat_response(st, B).desired
    assert entry.ports == (29510, 29511) and entry.attempt == 0 and len(entry.gpu_indices) == 2
    env = entry.env
    assert env["NODE_RANK"] == "1" and env["NNODES"] == "2" and env["WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"  # rank 0 is A: its host and first port
    assert env["NODE_IPS"] == "10.0.0.1,10.0.0.2" and env["PRIME_GROUP_ATTEMPT"] == "0"
    assert [p["node"] for p in json.loads(env["PRIME_PEERS"])] == [A, B]
    assert desired_env(st, C) == []


def test_running_only_once_every_member_runs_then_completed() -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(group_task()))
    beat(st, A, 4.0, report("g", 0, ReplicaState.RUNNING, 0))
    task = st.tasks["g"]
    assert task.group is not None and task.group.phase == GroupPhase.STARTING and task.state == TaskState.PENDING
    beat(st, B, 4.0, report("g", 1, ReplicaState.PULLING, 0))
    assert task.replicas[1].state == ReplicaState.PULLING and task.group.phase == GroupPhase.STARTING
    beat(st, B, 5.0, report("g", 1, ReplicaState.RUNNING, 0))
    assert task.group.phase == GroupPhase.RUNNING and task.state == TaskState.RUNNING
    out = beat(st, A, 6.0, report("g", 0, ReplicaState.COMPLETED, 0, code=0))
    assert task.state == TaskState.RUNNING
    assert of(out, SyncStorage) == []  # not persistent: nothing to sync
    beat(st, B, 7.0, report("g", 1, ReplicaState.COMPLETED, 0, code=0))
    assert task.state == TaskState.COMPLETED and [r.state for r in task.replicas] == [ReplicaState.COMPLETED] * 2


def test_a_persistent_members_exit_is_synced_at_once() -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(group_task(persistent=True)))
    run_both(st, "g", 4.0)
    out = beat(st, A, 5.0, report("g", 0, ReplicaState.COMPLETED, 0, code=0))
    assert [(s.node, s.replica, s.final) for s in of(out, SyncStorage)] == [(A, 0, True)]


def test_a_member_failure_stops_the_others_and_restarts_the_group_after_the_backoff() -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(group_task(persistent=True)))
    run_both(st, "g", 4.0)
    out = beat(st, B, 5.0, report("g", 1, ReplicaState.FAILED, 0, code=3))
    task = st.tasks["g"]
    assert [(s.node, s.task_id) for s in of(out, StopReplica)] == [(A, "g")]  # B's member already exited
    assert {s.node for s in of(out, SyncStorage)} == {A, B} and all(s.final for s in of(out, SyncStorage))
    assert all(r.node is None and r.state == ReplicaState.PENDING for r in task.replicas)
    assert task.group is not None and task.group.phase == GroupPhase.RESTARTING and task.group.restarts == 1
    assert "rank 1" in (task.group.reason or "") and "code 3" in (task.group.reason or "")
    assert heartbeat_response(st, A).desired == () and heartbeat_response(st, B).desired == ()
    syncs = of(out, SyncStorage)
    handle(st, Tick(6.0))  # the first restart has no backoff, but waits for its members' final syncs
    assert task.group.phase == GroupPhase.RESTARTING
    for s in syncs:
        handle(st, SyncSucceeded(s.node, s.task_id, s.replica, True, 6.5))
    out = handle(st, Tick(7.0))
    assert sorted((s.node, s.replica) for s in of(out, StartReplica)) == [(A, 0), (B, 1)]
    assert [r.attempt for r in task.replicas] == [1, 1]
    assert {e["PRIME_GROUP_ATTEMPT"] for e in desired_env(st, A) + desired_env(st, B)} == {"1"}
    # a late report of attempt 0 changes nothing
    beat(st, A, 8.0, report("g", 0, ReplicaState.FAILED, 0, code=9))
    assert task.group.phase == GroupPhase.STARTING and task.group.restarts == 1
    # a second failure: the restart waits its backoff (5 s) as well
    run_both(st, "g", 9.0, attempt=1)
    out = beat(st, A, 10.0, report("g", 0, ReplicaState.FAILED, 1, code=2))
    for s in of(out, SyncStorage):
        handle(st, SyncSucceeded(s.node, s.task_id, s.replica, True, 10.5))
    beat(st, A, 12.0), beat(st, B, 12.0)
    handle(st, Tick(14.9))
    assert task.group.phase == GroupPhase.RESTARTING
    handle(st, Tick(15.1))
    assert task.group.phase == GroupPhase.STARTING and task.group.attempt == 2
    # every transition is in the view, oldest first, with its time and reason
    assert [(h.attempt, h.phase) for h in task.group.history] == [
        (0, GroupPhase.STARTING), (0, GroupPhase.RUNNING), (0, GroupPhase.RESTARTING), (1, GroupPhase.STARTING),
        (1, GroupPhase.RUNNING), (1, GroupPhase.RESTARTING), (2, GroupPhase.STARTING)]
    assert task.group.history[2].at == 5.0 and "code 3" in task.group.history[2].reason


def test_a_dead_node_restarts_the_group_on_the_survivor_plus_a_replacement_in_its_rank() -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(group_task()))
    run_both(st, "g", 4.0)
    node(st, C, at=5.0)
    for t in (20.0, 40.0, 58.0):  # A and C beat, B falls silent
        beat(st, A, t, report("g", 0, ReplicaState.RUNNING, 0)), beat(st, C, t)
    out = handle(st, Tick(62.0))  # B is Dead (55 s + grace): the first restart goes out in the same tick
    task = st.tasks["g"]
    assert [(s.node, s.task_id) for s in of(out, StopReplica)] == [(A, "g")]
    assert not [t for t in of(out, RecordReplicaTransition) if "rescheduled" in t.reason]  # never one member alone
    phases = [(t.old, t.new, t.attempt) for t in of(out, RecordGroupTransition)]
    assert phases == [(GroupPhase.RUNNING, GroupPhase.RESTARTING, 0), (GroupPhase.RESTARTING, GroupPhase.STARTING, 1)]
    assert task.group is not None and task.group.phase == GroupPhase.STARTING
    assert members(st, "g") == [A, C] and task.group.attempt == 1  # A keeps rank 0, C takes B's rank 1
    assert desired_env(st, C)[0]["NODE_RANK"] == "1" and desired_env(st, C)[0]["MASTER_ADDR"] == "10.0.0.1"


def test_start_timeout_fails_a_group_that_cannot_fit_and_n_to_m_starts_on_fewer() -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(group_task("three", 3, timeout=30.0)))
    handle(st, TaskCreated(group_task("elastic", 2, 3, at=3.0)))
    three, elastic = st.tasks["three"], st.tasks["elastic"]
    assert members(st, "elastic") == [A, B] and elastic.replicas[2].state == ReplicaState.PENDING
    assert "runs on 2 nodes" in (elastic.replicas[2].error or "")
    beat(st, A, 20.0), beat(st, B, 20.0)
    handle(st, Tick(25.0))
    assert three.state == TaskState.PENDING
    handle(st, Tick(33.0))
    assert three.state == TaskState.FAILED and three.group is not None
    assert "could not start within 30s" in (three.group.reason or "") and "at least 3 nodes" in (three.group.reason or "")
    assert all(r.state == ReplicaState.FAILED for r in three.replicas)
    assert elastic.group is not None and elastic.group.phase == GroupPhase.STARTING  # untouched


def test_groups_share_gpus_with_replicas_but_never_a_node_with_another_group() -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(Task.new(TaskSpec(image="busybox", gpus=3), 2.0, "big")))  # 3 of A's 4 GPUs
    handle(st, TaskCreated(group_task("g1", 1, gpus=2)))
    assert members(st, "g1") == [B]  # A has 1 GPU free
    handle(st, TaskCreated(group_task("g2", 1, gpus=1, at=3.0)))
    assert members(st, "g2") == [A]  # B holds g1's member and its ports, although 2 GPUs are free there
    gpus_on_a = [r.gpu_indices for t in st.tasks.values() for r in t.replicas if r.node == A]
    assert sorted(i for g in gpus_on_a for i in g) == [0, 1, 2, 3]


def test_stop_request_stops_every_member_and_the_group_is_left_alone() -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(group_task()))
    run_both(st, "g", 4.0)
    out = handle(st, TaskStopRequested("g", 5.0))
    assert sorted(s.node for s in of(out, StopReplica)) == [A, B]
    assert st.tasks["g"].group is not None and st.tasks["g"].group.phase == GroupPhase.STOPPED
    assert [(t.old, t.new) for t in of(out, RecordGroupTransition)] == [(GroupPhase.RUNNING, GroupPhase.STOPPED)]
    assert [m.rank for m in st.tasks["g"].group.members] == [0, 1]  # the last attempt's members stay shown
    beat(st, A, 6.0), beat(st, B, 6.0)  # both stopped their containers
    task = st.tasks["g"]
    assert task.state == TaskState.STOPPED and all(r.state == ReplicaState.STOPPED for r in task.replicas)
    handle(st, Tick(100.0))
    assert task.state == TaskState.STOPPED and of(handle(st, Tick(101.0)), StartReplica) == []
    assert heartbeat_response(st, A).desired == ()


def test_hostile_reports_change_nothing() -> None:
    st = fresh()
    node(st, A), node(st, B), node(st, C)
    handle(st, TaskCreated(group_task()))
    task = st.tasks["g"]
    before = [(r.node, r.state, r.attempt) for r in task.replicas]
    beat(st, C, 4.0, report("g", 0, ReplicaState.FAILED, 0, code=1))  # C hosts no member of g
    beat(st, A, 4.0, report("g", 1, ReplicaState.RUNNING, 0))          # A's member is rank 0, not 1
    beat(st, A, 4.0, report("g", 0, ReplicaState.RUNNING, 7))          # an attempt that never was
    assert [(r.node, r.state, r.attempt) for r in task.replicas] == before
    assert task.group is not None and task.group.phase == GroupPhase.STARTING and task.group.restarts == 0


def test_a_member_that_cannot_start_or_vanishes_fails_the_attempt() -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(group_task(restarts=1)))
    beat(st, A, 4.0, report("g", 0, ReplicaState.FAILED, 0, error="The image busybox does not pull."))
    task = st.tasks["g"]
    assert task.group is not None and task.group.phase == GroupPhase.RESTARTING
    assert "does not pull" in (task.group.reason or "")
    beat(st, A, 9.0), beat(st, B, 9.0)
    handle(st, Tick(11.0))
    run_both(st, "g", 12.0, attempt=1)
    beat(st, B, 13.0)  # B no longer reports its running member
    assert task.state == TaskState.FAILED and "no longer reports" in (task.group.reason or "")
    assert "restart limit (1)" in (task.group.reason or "")


def test_the_group_survives_a_master_restart(tmp_path: Path) -> None:
    st = fresh()
    node(st, A), node(st, B)
    handle(st, TaskCreated(group_task()))
    run_both(st, "g", 4.0)
    store = MasterStore(Database(tmp_path / "master.sqlite"))
    store.save(st)
    loaded = store.load(CFG)
    assert loaded.groups["g"].members == st.groups["g"].members
    g1, g2 = st.groups["g"], loaded.groups["g"]
    assert (g2.phase, g2.attempt, g2.started, g2.restarts, g2.waiting_since) == (g1.phase, g1.attempt, g1.started, g1.restarts, g1.waiting_since)
    assert loaded.tasks["g"].group == st.tasks["g"].group and loaded.tasks["g"].state == TaskState.RUNNING
    assert len(loaded.tasks["g"].group.history) == 2  # Starting, Running: kept across the restart
    assert heartbeat_response(loaded, B).desired == heartbeat_response(st, B).desired
    assert loaded.tasks["g"].spec.group == st.tasks["g"].spec.group


def test_the_masters_own_downtime_does_not_count_against_the_start_timeout(tmp_path: Path) -> None:
    st = fresh()
    node(st, A)
    handle(st, TaskCreated(group_task(timeout=30.0)))  # waits for a second node from t=2
    store = MasterStore(Database(tmp_path / "master.sqlite"))
    store.save(st)
    again = store.load(CFG)
    handle(again, MasterStarted(600.0))  # down for ten minutes: no node could report meanwhile
    handle(again, ChainSynced(600.0))
    handle(again, Tick(601.0))
    task = again.tasks["g"]
    assert task.group is not None and task.group.phase == GroupPhase.PENDING  # counted from 600, not from 2
    node(again, B, at=610.0)
    beat(again, A, 612.0)
    handle(again, Tick(613.0))
    assert sorted(members(again, "g")) == sorted([A, B]) and task.group.phase == GroupPhase.STARTING


def test_a_stall_of_the_masters_loop_does_not_count_against_the_start_timeout() -> None:
    st = fresh()
    node(st, A)
    handle(st, TaskCreated(group_task(timeout=30.0)))
    handle(st, Tick(10.0, every_s=1.0))
    handle(st, Tick(500.0, every_s=1.0))  # the loop stalled for 490 s: a gap in the master's own view
    task = st.tasks["g"]
    assert task.group is not None and task.group.phase == GroupPhase.PENDING
    for t in range(501, 532):
        handle(st, Tick(float(t), every_s=1.0))
    assert task.group.phase == GroupPhase.FAILED  # 30 s after the gap ended, with still one node
