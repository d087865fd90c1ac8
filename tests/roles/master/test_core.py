"""The master core's decisions added with the protocol package (pure: no I/O, no clock):
the run ending, stale invite results, stops emitted once, task admission, and storage sync
driven by instructions and result events; liveness after a restart or a gap in the master's own
view (a property test over restart times and heartbeat arrivals). Hostile cases next to the happy ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from prime.protocol.heartbeat import HeartbeatRequest, ReplicaReport
from prime.protocol.nodes import NodeState
from prime.protocol.tasks import ReplicaState, TaskSpec
from prime.roles.master.state import (
    ChainSynced,
    HeartbeatReceived,
    InviteFailed,
    InviteSent,
    MasterStarted,
    MasterState,
    NodeApprovedOnChain,
    NodeJoinedOnChain,
    RecordReplicaTransition,
    RecordTransition,
    RecordViewGap,
    RunEnded,
    SendInvite,
    StartReplica,
    StopReplica,
    SyncFailed,
    SyncRound,
    SyncStorage,
    SyncSucceeded,
    TaskCreated,
    TaskRefused,
    TaskStopRequested,
    Tick,
    admission_refusal,
    desired_entry,
    handle,
    invite_is_current,
)
from prime.roles.master.store import MasterStore
from prime.roles.master.syncplan import SyncMark
from prime.store import Database
from tests.roles.master.test_state import CFG, SPECS, A, B, C, fresh, member, new_task, of, running

# --- the run ends -----------------------------------------------------------------------------------


def test_before_the_run_ends_an_expired_invite_is_sent_again() -> None:
    st = fresh()
    assert of(handle(st, NodeApprovedOnChain(A, SPECS, 0.0)), SendInvite) == [SendInvite(A, 100)]
    assert of(handle(st, Tick(150.0)), SendInvite) == [SendInvite(A, 250)]


def test_run_ended_while_invites_live_sends_no_invite_ever_again() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))          # invited until 100
    live = SendInvite(A, 100)
    assert invite_is_current(st, live)
    assert handle(st, RunEnded(10.0)) == []
    assert st.run_ended and not invite_is_current(st, live)  # a queued invite is dropped
    for now in (150.0, 400.0, 10_000.0):                     # expired: today's master re-invited every TTL
        assert of(handle(st, Tick(now)), SendInvite) == []
    out = handle(st, NodeApprovedOnChain(B, SPECS, 20.0))   # approved after the end: never invited
    assert of(out, SendInvite) == [] and st.nodes[B].state == NodeState.APPROVED
    assert handle(st, RunEnded(30.0)) == []                  # heard twice: nothing new


def test_members_keep_heartbeating_after_the_run_ended() -> None:
    st = fresh()
    member(st, A)
    handle(st, RunEnded(5.0))
    handle(st, HeartbeatReceived(A, 20.0, HeartbeatRequest()))
    assert st.nodes[A].state == NodeState.HEALTHY


def test_invite_results_after_the_run_ended_are_still_recorded() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    handle(st, RunEnded(1.0))
    handle(st, InviteSent(A, 100, 2.0, "http://a:1"))        # it was on the wire already
    assert st.nodes[A].url == "http://a:1"
    assert of(handle(st, NodeJoinedOnChain(A, 3.0)), SendInvite) == []
    assert st.nodes[A].state == NodeState.JOINED


# --- stale invites --------------------------------------------------------------------------------------


def test_invite_is_current_only_for_the_live_invite_of_an_invited_node() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    assert invite_is_current(st, SendInvite(A, 100))
    assert not invite_is_current(st, SendInvite(A, 99))       # an older one
    assert not invite_is_current(st, SendInvite(B, 100))      # unknown node
    handle(st, Tick(150.0))                                   # re-invited (expiry 250)
    assert not invite_is_current(st, SendInvite(A, 100)) and invite_is_current(st, SendInvite(A, 250))
    handle(st, NodeJoinedOnChain(A, 160.0))
    assert not invite_is_current(st, SendInvite(A, 250))      # joined meanwhile


def test_a_failure_of_an_overtaken_invite_is_ignored() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    handle(st, Tick(150.0))                                   # live invite: 250
    assert handle(st, InviteFailed(A, 151.0, "late answer of the first invite", expiry=100)) == []
    assert st.nodes[A].invite_expiry == 250 and st.nodes[A].invite_failures == 0
    handle(st, InviteFailed(A, 152.0, "refused", expiry=250))  # the live one: counted
    assert st.nodes[A].invite_failures == 1 and st.nodes[A].invite_expiry is None


def test_an_ack_of_an_overtaken_invite_is_ignored() -> None:
    st = fresh()
    handle(st, NodeApprovedOnChain(A, SPECS, 0.0))
    handle(st, Tick(150.0))
    assert handle(st, InviteSent(A, 100, 151.0, "http://old:1")) == []
    assert st.nodes[A].url is None and st.nodes[A].invite_expiry == 250


@pytest.mark.parametrize("event", [InviteSent(C, 100, 1.0), InviteFailed(C, 1.0, "x"), InviteFailed(C, 1.0, "x", 5)])
def test_invite_results_for_unknown_nodes_change_nothing(event) -> None:
    st = fresh()
    assert handle(st, event) == [] and C not in st.nodes


# --- stops -----------------------------------------------------------------------------------------


def test_a_stop_goes_out_once_per_task_and_node() -> None:
    st = fresh()
    member(st, A)
    member(st, B)
    handle(st, TaskCreated(new_task("t", gpus=1, replicas=6)))  # 4 GPUs each: 4 on A, 2 on B (spread by the scheduler)
    on = sorted({(r.node, r.index) for r in st.tasks["t"].replicas})
    out = handle(st, TaskStopRequested("t", 5.0))
    stops = of(out, StopReplica)
    expected = {node: min(i for n, i in on if n == node) for node in {n for n, _ in on}}
    assert sorted(stops, key=lambda s: s.node) == sorted(
        (StopReplica(node, "t", index) for node, index in expected.items()), key=lambda s: s.node)


def test_duplicate_stop_requests_emit_nothing_new() -> None:
    st = fresh()
    member(st, A)
    handle(st, TaskCreated(new_task("t", gpus=1, replicas=2)))
    assert of(handle(st, TaskStopRequested("t", 5.0)), StopReplica) == [StopReplica(A, "t", 0)]
    assert handle(st, TaskStopRequested("t", 6.0)) == []    # still stopping on the node: not pushed again
    assert handle(st, TaskStopRequested("t", 7.0)) == []


def test_stop_of_an_unknown_task_is_harmless() -> None:
    st = fresh()
    assert handle(st, TaskStopRequested("nope", 1.0)) == [] and "nope" not in st.tasks


def test_a_stopped_task_is_no_longer_pushed() -> None:
    st = fresh()
    member(st, A)
    handle(st, TaskCreated(new_task("t", gpus=1)))
    assert desired_entry(st, "t", 0, A) is not None
    handle(st, TaskStopRequested("t", 2.0))
    assert desired_entry(st, "t", 0, A) is None
    assert desired_entry(st, "t", 0, B) is None and desired_entry(st, "gone", 0, A) is None


# --- admission --------------------------------------------------------------------------------------


def test_a_task_is_admitted_and_placed() -> None:
    st = fresh()
    member(st, A)
    out = handle(st, TaskCreated(new_task("t", gpus=2)))
    assert of(out, TaskRefused) == [] and of(out, StartReplica) == [StartReplica(A, "t", 0)]


def test_a_task_waits_when_no_node_is_known_yet() -> None:
    st = fresh()
    assert admission_refusal(st, TaskSpec("busybox", gpus=64)) is None
    assert handle(st, TaskCreated(new_task("t", gpus=64))) == [] and "t" in st.tasks


@pytest.mark.parametrize(
    ("spec", "field"),
    [(TaskSpec("busybox", gpus=5), "gpus"), (TaskSpec("busybox", cpu_limit=64.0), "cpu_limit"),
     (TaskSpec("busybox", memory_limit_mib=10**7), "memory_limit_mib")],
)
def test_a_task_no_node_can_hold_is_refused_and_not_kept(spec: TaskSpec, field: str) -> None:
    st = fresh()
    member(st, A)  # 4 GPUs, 32 cores, 256,000 MiB
    out = handle(st, TaskCreated(new_task("t", **{k: getattr(spec, k) for k in ("gpus", "cpu_limit", "memory_limit_mib")})))
    assert len(out) == 1 and isinstance(out[0], TaskRefused)
    assert (out[0].task_id, out[0].status, out[0].error) == ("t", 400, "invalid_request")
    assert out[0].detail["field"] == field
    assert "t" not in st.tasks and not st.dirty_tasks - {"t"}


def test_no_new_task_once_the_run_ended_but_the_old_ones_stay() -> None:
    st = fresh()
    member(st, A)
    handle(st, TaskCreated(new_task("old", gpus=1)))
    handle(st, RunEnded(3.0))
    out = handle(st, TaskCreated(new_task("new", 4.0, gpus=1)))
    assert [(r.status, r.error) for r in of(out, TaskRefused)] == [(409, "run_ended")]
    assert "new" not in st.tasks and "old" in st.tasks
    assert handle(st, TaskCreated(new_task("old", 5.0, gpus=1))) == []  # a known id: idempotent, not refused


def test_an_unplaceable_task_after_the_run_ended_is_a_400_first() -> None:
    st = fresh()
    member(st, A)
    handle(st, RunEnded(1.0))
    (refused,) = handle(st, TaskCreated(new_task("t", gpus=99)))
    assert refused.status == 400


# --- storage sync --------------------------------------------------------------------------------------


def persistent_running(st, tid: str = "p", node: str = A, at: float = 2.0) -> None:
    handle(st, TaskCreated(new_task(tid, gpus=1, persistent=True)))
    handle(st, HeartbeatReceived(node, at, HeartbeatRequest(tasks=(ReplicaReport(tid, 0, ReplicaState.RUNNING),))))


def finish(st, tid: str = "p", node: str = A, at: float = 3.0) -> list:
    report = ReplicaReport(tid, 0, ReplicaState.COMPLETED, 0)
    return handle(st, HeartbeatReceived(node, at, HeartbeatRequest(tasks=(report,))))


def test_a_round_syncs_running_persistent_replicas_once_at_a_time() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    handle(st, TaskCreated(new_task("plain", gpus=1)))
    assert handle(st, SyncRound(10.0)) == [SyncStorage(A, "p", 0, final=False)]
    assert handle(st, SyncRound(20.0)) == []                        # still in flight
    assert handle(st, SyncSucceeded(A, "p", 0, False, 21.0, files=3, miner_final=False)) == []
    assert handle(st, SyncRound(30.0)) == [SyncStorage(A, "p", 0, final=False)]


def test_a_failed_sync_is_retried_after_a_growing_backoff() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    for failures, at in ((1, 10.0), (2, 20.0), (3, 40.0)):
        assert handle(st, SyncRound(at)) == [SyncStorage(A, "p", 0, final=False)]
        handle(st, SyncFailed(A, "p", 0, False, at, "connection refused"))
        mark = st.sync_marks[("p", 0)]
        assert mark.failures == failures and mark.next_at == at + 2.0 ** failures
        assert handle(st, SyncRound(at + 2.0 ** failures - 0.1)) == []  # backing off
    handle(st, SyncRound(48.0))
    handle(st, SyncSucceeded(A, "p", 0, False, 48.5))
    assert st.sync_marks[("p", 0)].failures == 0 and st.sync_marks[("p", 0)].next_at is None


def test_backoff_is_capped() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    st.sync_marks[("p", 0)] = SyncMark(failures=40)
    handle(st, SyncRound(0.0))
    handle(st, SyncFailed(A, "p", 0, False, 100.0, "x"))
    assert st.sync_marks[("p", 0)].next_at == 100.0 + CFG.sync_retry_max_s


def test_a_finished_replica_gets_one_final_sync_then_no_more() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    assert of(finish(st), SyncStorage) == [SyncStorage(A, "p", 0, final=True)]
    assert handle(st, SyncRound(10.0)) == []                        # in flight
    handle(st, SyncSucceeded(A, "p", 0, True, 11.0, files=7, miner_final=True))
    mark = st.sync_marks[("p", 0)]
    assert mark.final_done and mark.files == 7 and ("p", 0) in st.dirty_sync
    assert handle(st, SyncRound(20.0)) == [] and handle(st, SyncRound(10_000.0)) == []


def test_a_final_sync_the_miner_does_not_call_final_is_repeated_a_few_times() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    finish(st)
    for attempt in range(1, CFG.final_sync_attempts):
        handle(st, SyncSucceeded(A, "p", 0, True, 10.0 * attempt, files=1, miner_final=False))
        assert not st.sync_marks[("p", 0)].final_done
        assert handle(st, SyncRound(10.0 * attempt + 1)) == [SyncStorage(A, "p", 0, final=True)]
    handle(st, SyncSucceeded(A, "p", 0, True, 99.0, files=2, miner_final=False))
    assert st.sync_marks[("p", 0)].final_done and st.sync_marks[("p", 0)].files == 2


def test_a_final_sync_of_a_replica_the_miner_has_no_data_for_is_done() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    finish(st)
    handle(st, SyncFailed(A, "p", 0, True, 5.0, "404 task_not_found", not_found=True))
    assert st.sync_marks[("p", 0)].final_done and st.sync_marks[("p", 0)].files == 0
    assert handle(st, SyncRound(100.0)) == []


def test_a_failing_final_sync_is_retried_until_it_succeeds() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    finish(st)
    handle(st, SyncFailed(A, "p", 0, True, 5.0, "timeout"))
    assert handle(st, SyncRound(6.0)) == []                          # backing off (2 s)
    assert handle(st, SyncRound(7.5)) == [SyncStorage(A, "p", 0, final=True)]
    handle(st, SyncSucceeded(A, "p", 0, True, 8.0))
    assert st.sync_marks[("p", 0)].final_done


def test_a_replica_finishing_while_a_sync_runs_gets_its_final_sync_at_the_next_round() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    handle(st, SyncRound(2.5))                                       # a periodic sync in flight
    assert of(finish(st), SyncStorage) == []                         # not two at once
    handle(st, SyncSucceeded(A, "p", 0, False, 4.0, miner_final=False))
    assert handle(st, SyncRound(5.0)) == [SyncStorage(A, "p", 0, final=True)]


def test_an_unhealthy_node_is_still_synced_a_dead_one_not() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    handle(st, Tick(30.0))
    assert st.nodes[A].state == NodeState.UNHEALTHY
    assert handle(st, SyncRound(30.0)) == [SyncStorage(A, "p", 0, final=False)]
    handle(st, SyncFailed(A, "p", 0, False, 31.0, "timeout"))
    handle(st, Tick(200.0))                                          # A is Dead; its replica is released
    assert st.nodes[A].state == NodeState.DEAD
    assert handle(st, SyncRound(201.0)) == []


@pytest.mark.parametrize("event", [
    SyncSucceeded(A, "ghost", 0, True, 1.0), SyncFailed(A, "ghost", 0, False, 1.0, "x"),
    SyncFailed(A, "ghost", 3, True, 1.0, "x", not_found=True),
])
def test_sync_results_for_unknown_tasks_change_nothing(event) -> None:
    st = fresh()
    assert handle(st, event) == [] and st.sync_marks == {} and not st.dirty_sync


def test_a_late_failure_after_the_final_sync_changes_nothing() -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    finish(st)
    handle(st, SyncSucceeded(A, "p", 0, True, 5.0, files=4))
    handle(st, SyncFailed(A, "p", 0, False, 6.0, "a late periodic one"))
    mark = st.sync_marks[("p", 0)]
    assert mark.final_done and mark.failures == 0 and mark.files == 4


def test_sync_marks_survive_a_restart(tmp_path: Path) -> None:
    st = fresh()
    member(st, A)
    persistent_running(st)
    handle(st, SyncRound(5.0))
    handle(st, SyncFailed(A, "p", 0, False, 5.0, "x"))
    store = MasterStore(Database(tmp_path / "master.sqlite"))
    store.flush(st)
    assert not st.dirty_sync
    again = MasterStore(Database(tmp_path / "master.sqlite")).load(CFG)
    assert again.sync_marks == {("p", 0): SyncMark(failures=1, next_at=7.0)}
    assert again.syncing == set()                                     # in flight is not stored: asked again


def test_final_sync_marks_of_an_older_data_dir_are_adopted_once(tmp_path: Path) -> None:
    legacy = Database(tmp_path / "sync.sqlite")  # the second SQLite file of older masters
    legacy.execute("""CREATE TABLE final_syncs (
        task_id TEXT NOT NULL, replica INTEGER NOT NULL, synced_at REAL NOT NULL, files INTEGER NOT NULL,
        PRIMARY KEY (task_id, replica))""")
    legacy.execute("INSERT INTO final_syncs VALUES ('p', 0, 12.5, 3), ('q', 1, 13.0, 0)")
    legacy.close()
    store = MasterStore(Database(tmp_path / "master.sqlite"))
    assert store.adopt_legacy_sync_marks(tmp_path) == 2
    assert not (tmp_path / "sync.sqlite").exists() and (tmp_path / "sync.sqlite.adopted").exists()
    assert store.adopt_legacy_sync_marks(tmp_path) == 0               # once
    st = store.load(CFG)
    assert st.sync_marks[("p", 0)] == SyncMark(final_at=12.5, files=3)
    assert st.sync_marks[("q", 1)].final_done


def test_a_data_dir_without_the_legacy_file_opens_as_is(tmp_path: Path) -> None:
    store = MasterStore(Database(tmp_path / "master.sqlite"))
    assert store.adopt_legacy_sync_marks(tmp_path) == 0
    assert store.load(CFG).sync_marks == {}


def test_a_master_sqlite_of_the_previous_schema_migrates_forward(tmp_path: Path) -> None:
    from prime.roles.master.store import MIGRATIONS

    old = Database(tmp_path / "master.sqlite")
    old.migrate(MIGRATIONS[:-1])  # what the previous version created
    old.execute("INSERT INTO meta (key, value) VALUES ('chain_cursor', '42')")
    old.close()
    store = MasterStore(Database(tmp_path / "master.sqlite"))
    assert store.db.schema_version == len(MIGRATIONS)
    st = store.load(CFG)
    assert st.chain_cursor == 42 and st.sync_marks == {}


# --- liveness after a restart or a gap in the master's own view (issue 13) -------------------------
# CFG: heartbeat 10 s, Unhealthy after 25 s, Dead after 55 s. The service ticks every 5 s.

EVERY = 5.0


def _three_nodes_three_replicas() -> tuple[MasterState, dict[str, int]]:
    st = fresh()
    for n in (A, B, C):
        member(st, n, 0.0)
    handle(st, TaskCreated(new_task("t", 0.0, gpus=4, replicas=3)))   # one replica per node
    on = {r.node: r.index for r in st.tasks["t"].replicas}
    assert set(on) == {A, B, C}
    return st, on


def _restarted(st: MasterState, at: float) -> MasterState:
    db = Database(":memory:")
    MasterStore(db).save(st)
    st = MasterStore(db).load(CFG)
    handle(st, MasterStarted(at))
    handle(st, ChainSynced(at))
    return st


def test_a_late_tick_is_a_gap_in_the_masters_view_and_restarts_the_windows() -> None:
    st, on = _three_nodes_three_replicas()
    for n in (A, B, C):
        handle(st, HeartbeatReceived(n, 10.0, HeartbeatRequest(tasks=(running("t", on[n]),))))
    handle(st, Tick(10.0, every_s=EVERY))
    out = handle(st, Tick(500.0, every_s=EVERY))     # the loop stalled (or the clock jumped) for 490 s
    assert of(out, RecordViewGap) == [RecordViewGap(10.0, 500.0)]
    assert not of(out, RecordTransition) and not of(out, RecordReplicaTransition)
    assert all(st.nodes[n].state == NodeState.HEALTHY for n in (A, B, C))
    for now in (505.0, 510.0, 515.0, 520.0):
        assert not of(handle(st, Tick(now, every_s=EVERY)), RecordTransition)  # under 25 s after the gap
    handle(st, HeartbeatReceived(A, 522.0, HeartbeatRequest(tasks=(running("t", on[A]),))))
    handle(st, Tick(526.0, every_s=EVERY))
    assert st.nodes[A].state == NodeState.HEALTHY and st.nodes[B].state == NodeState.UNHEALTHY
    now = 526.0
    while now < 556.0:
        now += EVERY
        out = handle(st, Tick(now, every_s=EVERY))
        assert not of(out, RecordViewGap)
    assert now - 500.0 > CFG.dead_after_s                      # a full dead-after window after the gap: Dead
    assert st.nodes[B].state == st.nodes[C].state == NodeState.DEAD and st.nodes[A].state == NodeState.UNHEALTHY


def test_a_tick_before_the_previous_one_is_a_gap_and_sparse_ticks_without_a_cadence_are_not() -> None:
    st, _ = _three_nodes_three_replicas()
    handle(st, Tick(100.0, every_s=EVERY))
    assert of(handle(st, Tick(40.0, every_s=EVERY)), RecordViewGap) == [RecordViewGap(100.0, 40.0)]
    assert st.watching_since == 40.0
    assert not of(handle(st, Tick(1000.0)), RecordViewGap)   # a caller that does not say its cadence
    assert st.nodes[A].state == NodeState.DEAD


def test_after_a_restart_a_node_reporting_its_replicas_keeps_them() -> None:
    st, on = _three_nodes_three_replicas()
    for n in (A, B, C):
        handle(st, HeartbeatReceived(n, 10.0, HeartbeatRequest(tasks=(running("t", on[n]),))))
    st = _restarted(st, 10.0 + 3 * CFG.dead_after_s)        # down for 3 x the dead-after window
    t0 = st.watching_since
    assert t0 is not None
    out: list = []
    for k in range(12):                                       # the miners come back within one interval
        now = t0 + k * EVERY
        if k % 2 == 1:
            for n in (A, B, C):
                out += handle(st, HeartbeatReceived(n, now + 0.5, HeartbeatRequest(tasks=(running("t", on[n]),))))
        out += handle(st, Tick(now + 1.0, every_s=EVERY))
    assert not of(out, RecordTransition) and not of(out, RecordReplicaTransition) and not of(out, StartReplica)
    assert [(r.node, r.attempt, r.state) for r in st.tasks["t"].replicas] == \
        [(n, 0, ReplicaState.RUNNING) for n in sorted(on, key=on.__getitem__)]


@settings(max_examples=150, deadline=None)
@given(
    down_at=hs.floats(5.0, 300.0),
    downtime=hs.floats(0.0, 2000.0),
    stall_after=hs.floats(0.0, 300.0),
    stall=hs.floats(CFG.heartbeat_interval_s + 0.5, 1000.0),
    periods=hs.tuples(*[hs.floats(1.0, CFG.heartbeat_interval_s)] * 3),
    offsets=hs.tuples(*[hs.floats(0.0, CFG.heartbeat_interval_s)] * 3),
    silent_from=hs.one_of(hs.none(), hs.floats(0.0, 1500.0)),
)
def test_no_node_is_judged_before_a_full_window_after_a_restart_or_a_gap(
    down_at: float, downtime: float, stall_after: float, stall: float,
    periods: tuple[float, float, float], offsets: tuple[float, float, float], silent_from: float | None,
) -> None:
    """Nodes heartbeat at most one interval apart whenever the master can hear them; the master is
    down once and later stalls once. A node that keeps heartbeating is never Unhealthy or Dead and
    keeps its replica; C may go silent for good: it is judged only a full window after
    max(its last heartbeat, the restart or the gap's end), and judged Dead in the end."""
    st, on = _three_nodes_three_replicas()
    restart = down_at + downtime
    stall_from = restart + stall_after
    stall_to = stall_from + stall
    end = stall_to + 2 * CFG.dead_after_s + 20.0
    silent_at = None if silent_from is None else silent_from

    times: list[tuple[float, int, str | None]] = []   # (time, order, node): node None = Tick
    k = 0
    while k * EVERY < end:
        times.append((k * EVERY, 1, None))
        k += 1
    for n, period, offset in zip((A, B, C), periods, offsets):
        t = offset
        while t < end:
            if not (n == C and silent_at is not None and t >= silent_at):
                times.append((t, 0, n))
            t += period
    times.sort()

    view_start = 0.0
    last_hb = {n: 0.0 for n in (A, B, C)}
    restarted = False
    out: list = []
    for t, _, n in times:
        if down_at <= t < restart or stall_from <= t < stall_to:
            continue  # the master is down, or its loop stalled: nothing is heard or judged
        if not restarted and t >= restart:
            st = _restarted(st, restart)
            view_start = restart
            restarted = True
        if n is None:
            out = handle(st, Tick(t, every_s=EVERY))
            if of(out, RecordViewGap):
                view_start = t
        else:
            out = handle(st, HeartbeatReceived(n, t, HeartbeatRequest(tasks=(running("t", on[n]),))))
            last_hb[n] = t
        for tr in of(out, RecordTransition):
            seen = max(last_hb[tr.node], view_start)
            assert tr.node == C, f"{tr} at {t}: a node that kept heartbeating was judged"
            if tr.new == NodeState.UNHEALTHY:
                assert t - seen > CFG.unhealthy_after_s, (tr, t, seen)
            elif tr.new == NodeState.DEAD:
                assert t - seen > CFG.dead_after_s, (tr, t, seen)
    for n in (A, B):
        r = st.tasks["t"].replicas[on[n]]
        assert (r.node, r.attempt, r.state) == (n, 0, ReplicaState.RUNNING), (n, r)
        assert st.nodes[n].state == NodeState.HEALTHY
    if silent_at is not None and silent_at < stall_to:
        assert st.nodes[C].state == NodeState.DEAD   # liveness is still judged: a silent node dies
