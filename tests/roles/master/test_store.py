"""MasterStore: the whole MasterState survives a restart (a new Database on the same file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prime.chain.types import NodeStatus, Specs
from prime.protocol.heartbeat import GpuSample, HeartbeatRequest, ReplicaReport
from prime.protocol.nodes import NodeState
from prime.protocol.storage import ManifestEntry
from prime.protocol.tasks import ReplicaState, Task, TaskSpec
from prime.roles.master.state import (
    ChainSynced,
    HeartbeatReceived,
    InviteFailed,
    MasterStarted,
    MasterState,
    NodeApprovedOnChain,
    NodeJoinedOnChain,
    SendInvite,
    StateConfig,
    TaskCreated,
    TaskStopRequested,
    Tick,
    handle,
)
from prime.roles.master.store import MIGRATIONS, MasterStore, StateCursor
from prime.store import Database

SPECS = Specs(4, "H100", 80_000, 32, 256_000, 1000)
A, B, C, D = (f"0x{i:040x}" for i in range(0xA, 0xE))


def open_store(path: Path) -> MasterStore:
    return MasterStore(Database(path))


def busy_state() -> MasterState:
    """Nodes in several states (one with a live invite, one backing off), tasks with replicas everywhere."""
    st = MasterState(StateConfig(heartbeat_interval_s=10, invite_backoff_base_s=60))
    handle(st, MasterStarted(0.0))
    handle(st, ChainSynced(0.0))
    for n in (A, B, C, D):
        handle(st, NodeApprovedOnChain(n, SPECS, 1.0, block=5))
    handle(st, InviteFailed(D, 2.0, "connection refused"))           # D: backing off
    handle(st, NodeJoinedOnChain(A, 3.0, block=7))
    handle(st, NodeJoinedOnChain(B, 3.0, block=7))
    for n in (A, B):
        handle(st, HeartbeatReceived(n, 4.0, HeartbeatRequest(gpus=(GpuSample(0, 50.0, 10.0, 60.0),),
                                                                  load={"cpu_pct": 12.5})))
    handle(st, TaskCreated(Task.new(TaskSpec("busybox", command=("sleep", "9"), env={"K": "v"}, gpus=2,
                                             replicas=3, persistent=True), 5.0, "train")))
    handle(st, TaskCreated(Task.new(TaskSpec("busybox", gpus=1), 6.0, "done")))
    handle(st, TaskCreated(Task.new(TaskSpec("busybox", gpus=0, replicas=2), 6.5, "halt")))
    train_on_a = [r.index for r in st.tasks["train"].replicas if r.node == A]
    reports = [ReplicaReport("train", i, ReplicaState.RUNNING, restarts=i + 2) for i in train_on_a]
    done = st.tasks["done"].replicas[0]
    reports += [ReplicaReport("done", 0, ReplicaState.COMPLETED, 0)] if done.node == A else []
    handle(st, HeartbeatReceived(A, 7.0, HeartbeatRequest(tasks=tuple(reports))))
    handle(st, TaskStopRequested("halt", 8.0))
    st.set_cursor(1234)
    return st


def test_round_trip_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    st = busy_state()
    store = open_store(path)
    store.save(st)
    store.db.close()

    loaded = open_store(path).load(StateConfig(heartbeat_interval_s=10))
    assert loaded.nodes == st.nodes
    assert loaded.tasks == st.tasks
    assert list(loaded.tasks) == list(st.tasks)  # creation order
    assert loaded.chain_cursor == 1234
    # the states that matter for resuming
    assert loaded.nodes[C].state == NodeState.INVITED and loaded.nodes[C].invite_expiry == st.nodes[C].invite_expiry
    assert loaded.nodes[D].state == NodeState.APPROVED and loaded.nodes[D].next_invite_at is not None
    assert loaded.nodes[A].chain_status == NodeStatus.ACTIVE and loaded.nodes[A].last_sample is not None
    assert any(r.state == ReplicaState.RUNNING for r in loaded.tasks["train"].replicas)
    # restart counts as the node last reported them (shown before its next heartbeat)
    running = [r for r in loaded.tasks["train"].replicas if r.node == A]
    assert running and [r.restarts for r in running] == [r.index + 2 for r in running]


def test_a_database_from_before_restart_counts_loads_them_as_zero(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    old = Database(path)
    old.migrate(MIGRATIONS[:-1])
    with old.transaction():
        old.execute("INSERT INTO tasks (id, spec, created_at, stop_requested) VALUES ('t', ?, 1.0, 0)",
                    ('{"image": "busybox"}',))
        old.execute("INSERT INTO replicas (task_id, idx, node, state, gpu_indices, attempt) VALUES"
                    " ('t', 0, NULL, 'Pending', '[]', 2)", ())
    old.close()
    store = open_store(path)
    (replica,) = store.load().tasks["t"].replicas
    assert (replica.attempt, replica.restarts) == (2, 0)
    st = store.load()
    st.tasks["t"].replicas[0].restarts = 7
    store.save(st)
    assert open_store(path).load().tasks["t"].replicas[0].restarts == 7


def test_restarted_master_resumes_without_re_inviting(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    st = busy_state()
    open_store(path).save(st)
    resumed = open_store(path).load(st.config)
    out = handle(resumed, MasterStarted(9.0)) + handle(resumed, ChainSynced(9.5)) + handle(resumed, Tick(10.0))
    assert not [i for i in out if isinstance(i, SendInvite)]  # C's invite is live, D still backing off
    assert resumed.nodes[A].state == NodeState.HEALTHY


def test_flush_writes_only_what_changed(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    store = open_store(path)
    st = busy_state()
    assert st.dirty_nodes and st.dirty_tasks
    store.flush(st)
    assert not st.dirty_nodes and not st.dirty_tasks
    # change one node and one task; flush; reload sees both
    handle(st, HeartbeatReceived(B, 8.0, HeartbeatRequest()))
    handle(st, TaskStopRequested("train", 8.5))
    assert st.dirty_nodes == {B} and "train" in st.dirty_tasks
    store.flush(st)
    loaded = open_store(path).load(st.config)
    assert loaded.nodes[B].last_heartbeat == 8.0
    assert loaded.tasks["train"].stop_requested
    assert loaded.nodes == st.nodes and loaded.tasks == st.tasks


def test_failed_write_keeps_things_dirty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path / "master.db")
    st = busy_state()

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "_write_task", boom)
    with pytest.raises(RuntimeError):
        store.flush(st)
    assert st.dirty_tasks  # retried on the next flush
    assert store.load().nodes == {}  # and nothing half-written


def test_empty_database_loads_empty_state(tmp_path: Path) -> None:
    st = open_store(tmp_path / "new.db").load()
    assert st.nodes == {} and st.tasks == {} and st.chain_cursor is None


def test_state_cursor_commits_with_the_state(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    store = open_store(path)
    st = MasterState(StateConfig())
    cursor = StateCursor(st, store)
    assert cursor.get() is None
    handle(st, NodeJoinedOnChain(A, 1.0, SPECS, block=50))  # a batch of events went through handle ...
    cursor.set(51)                                           # ... then the follower commits
    assert cursor.get() == 51 and not st.dirty_nodes
    loaded = open_store(path).load()
    assert loaded.chain_cursor == 51 and loaded.nodes[A].state == NodeState.JOINED
    # a flush without a cursor move does not overwrite a cursor written elsewhere
    store.set_cursor(60)
    handle(st, HeartbeatReceived(A, 2.0, HeartbeatRequest()))
    store.flush(st)
    assert store.get_cursor() == 60


def test_cursor(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    store = open_store(path)
    assert store.get_cursor() is None
    store.set_cursor(10)
    store.set_cursor(42)
    assert open_store(path).get_cursor() == 42


def test_migrations_run_once(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    open_store(path)
    db = Database(path)
    version = db.schema_version
    MasterStore(db)
    assert db.schema_version == version > 0


def test_manifests_replace_per_replica(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    store = open_store(path)
    e1 = ManifestEntry("a.txt", 3, "1" * 64)
    e2 = ManifestEntry("dir/b.bin", 5, "2" * 64)
    store.save_manifest("t", 0, [e1, e2], 100.0)
    store.save_manifest("t", 1, [e1], 101.0)
    store.save_manifest("t", 0, [ManifestEntry("a.txt", 4, "3" * 64)], 102.0)  # b.bin deleted, a.txt changed
    store = open_store(path)
    files = store.manifest("t")
    assert [(f.replica, f.path, f.size, f.sha256, f.synced_at) for f in files] == [
        (0, "a.txt", 4, "3" * 64, 102.0),
        (1, "a.txt", 3, "1" * 64, 101.0),
    ]
    assert [f.path for f in store.manifest("t", 1)] == ["a.txt"]
    assert store.synced_file("t", "a.txt", 1).sha256 == "1" * 64
    assert store.synced_file("t", "dir/b.bin") is None
    assert store.manifest("other") == []


def test_blob_index(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    store = open_store(path)
    store.add_blob("a" * 64, 10, 1.0)
    store.add_blob("a" * 64, 10, 2.0)  # idempotent: first record wins
    store = open_store(path)
    assert store.has_blob("a" * 64) and not store.has_blob("b" * 64)
    assert store.blob("a" * 64).stored_at == 1.0
    assert store.blob("c" * 64) is None
    wanted = ["b" * 64, "a" * 64, "b" * 64] + [f"{i:064x}" for i in range(1200)]
    missing = store.missing_blobs(wanted)
    assert missing[0] == "b" * 64 and "a" * 64 not in missing
    assert len(missing) == 1 + 1200  # unique, across the IN-clause chunks
