"""A sync never erases (issue 13): the synced copy of a replica is the union of what its copies
(nodes) listed; a file is dropped only when the copy that listed it lists it no more. Pure rule
(``syncplan.dropped``) and the store that applies it (``MasterStore.save_manifest``)."""

from __future__ import annotations

from pathlib import Path

from prime.protocol.storage import ManifestEntry
from prime.roles.master.store import MasterStore
from prime.roles.master.syncplan import dropped
from prime.store import Database

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
