"""A sync never erases (issue 13): the synced copy of a replica is the union of what its copies
(nodes) listed; a file is dropped only when the copy that listed it lists it no more. Pure rule
(``syncplan.dropped``) and the store that applies it (``MasterStore.save_manifest``); and a new
attempt of a replica gets its own syncs and final sync (``syncplan.current_mark``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prime.protocol.storage import ManifestEntry
from prime.protocol.tasks import ReplicaState
from prime.roles.master.state import SyncRound, SyncStorage, SyncSucceeded, handle
from prime.roles.master.store import MasterStore
from prime.roles.master.syncplan import SyncMark, dropped
from prime.store import Database
from tests.roles.master.test_core import finish, persistent_running
from tests.roles.master.test_state import A as NODE_A
from tests.roles.master.test_state import B as NODE_B
from tests.roles.master.test_state import fresh, member

A, B = "0x" + "a" * 40, "0x" + "b" * 40


def test_only_the_copy_that_listed_a_file_can_drop_it() -> None:
    previous: dict[str, str | None] = {"ckpt/1": A, "ckpt/2": A, "log": B, "old": None}
    assert dropped(previous, set(), B) == ["log"]                      # B's empty listing: only B's own file
    assert dropped(previous, {"log"}, B) == []
    assert dropped(previous, {"ckpt/2"}, A) == ["ckpt/1"]              # A deleted ckpt/1
    assert dropped(previous, set(), "0x" + "c" * 40) == []             # a new copy never erases
    assert dropped({}, set(), A) == []
    assert dropped({"old": None}, set(), A) == []                      # synced before copies were recorded: kept


def _store(path: Path) -> MasterStore:
    return MasterStore(Database(path))


def _paths(store: MasterStore, replica: int = 0) -> dict[str, str]:
    return {f.path: f.sha256 for f in store.manifest("t", replica)}


def test_an_empty_manifest_from_a_new_node_keeps_every_synced_file(tmp_path: Path) -> None:
    path = tmp_path / "master.db"
    store = _store(path)
    ten = [ManifestEntry(f"step/{i}.txt", 3, f"{i:064x}") for i in range(10)]
    assert store.save_manifest("t", 0, ten, 100.0, source=A) == []
    assert store.save_manifest("t", 0, [], 101.0, source=B) == []      # the new attempt, empty
    assert len(_paths(store)) == 10

    # The new attempt writes over one file and adds another: merged over the synced ones.
    store.save_manifest("t", 0, [ManifestEntry("step/0.txt", 4, "f" * 64), ManifestEntry("new", 1, "e" * 64)], 102.0,
                        source=B)
    files = _paths(store)
    assert len(files) == 11 and files["step/0.txt"] == "f" * 64 and files["new"] == "e" * 64
    # ... and deletes what it listed itself: gone; A's files stay.
    assert store.save_manifest("t", 0, [ManifestEntry("new", 1, "e" * 64)], 103.0, source=B) == ["step/0.txt"]
    store = _store(path)  # the sources survive a reopen
    assert set(_paths(store)) == {"new"} | {f"step/{i}.txt" for i in range(1, 10)}
    assert store.save_manifest("t", 0, [], 104.0, source=A) == [f"step/{i}.txt" for i in range(1, 10)]
    assert set(_paths(store)) == {"new"}
    assert _paths(store, 1) == {}  # other replicas untouched


# --- a new attempt gets its own syncs and its own final sync ----------------------------------------


def test_a_new_attempt_of_a_replica_gets_its_own_final_sync() -> None:

    st = fresh()
    member(st, NODE_A)
    member(st, NODE_B)
    persistent_running(st)
    finish(st)
    handle(st, SyncSucceeded(NODE_A, "p", 0, True, 11.0, files=7, miner_final=True))
    assert st.sync_marks[("p", 0)].final_done and st.sync_marks[("p", 0)].attempt == 0

    # The replica is placed again (attempt 1, on B): the done final sync was attempt 0's.
    task = st.tasks["p"]
    task.replicas[0] = replace(task.replicas[0], node=NODE_B, attempt=1, state=ReplicaState.RUNNING)
    assert handle(st, SyncRound(20.0)) == [SyncStorage(NODE_B, "p", 0, final=False)]
    # A late final answer from A (the node it left) marks nothing for attempt 1.
    handle(st, SyncSucceeded(NODE_A, "p", 0, True, 21.0, files=7, miner_final=True))
    handle(st, SyncSucceeded(NODE_B, "p", 0, False, 22.0, files=8, miner_final=False))
    assert st.sync_marks[("p", 0)].attempt == 1 and not st.sync_marks[("p", 0)].final_done
    task.replicas[0] = replace(task.replicas[0], state=ReplicaState.COMPLETED, exit_code=0)
    assert handle(st, SyncRound(30.0)) == [SyncStorage(NODE_B, "p", 0, final=True)]
    handle(st, SyncSucceeded(NODE_B, "p", 0, True, 31.0, files=9, miner_final=True))
    mark = st.sync_marks[("p", 0)]
    assert mark.final_done and mark.files == 9 and mark.attempt == 1
    assert handle(st, SyncRound(40.0)) == []


def test_sync_marks_keep_their_attempt_across_a_restart(tmp_path: Path) -> None:

    st = fresh()
    st.sync_marks[("t", 2)] = SyncMark(final_at=5.0, files=3, attempt=4)
    store = _store(tmp_path / "master.db")
    store.save(st)
    assert _store(tmp_path / "master.db").load().sync_marks[("t", 2)] == SyncMark(final_at=5.0, files=3, attempt=4)
