"""The master's persistent state in SQLite (on top of ``prime.store.Database``).

Nodes (with their invite bookkeeping), tasks and replicas, the chain cursor, storage sync marks
(retries, final syncs done), synced storage manifests and the index of content-addressed blobs. ``save``/``flush`` write a ``MasterState``
in one transaction, ``load`` rebuilds it, so a restarted master resumes where it stopped
(then feed it ``MasterStarted(now)`` so its own downtime is not counted as missed heartbeats).

Migrations are append-only: never edit a shipped statement, add a new one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prime.chain.types import NodeStatus
from prime.protocol.groups import GroupRequest
from prime.protocol.nodes import NO_HARDWARE, NodeRecord, NodeSample, NodeState, specs_from_json, specs_to_json
from prime.protocol.storage import ManifestEntry
from prime.protocol.tasks import Replica, ReplicaState, RestartPolicy, Task, TaskSpec
from prime.roles.master import gangs
from prime.roles.master.state import MasterState, StateConfig
from prime.roles.master.syncplan import SyncMark, dropped
from prime.store import Database

MIGRATIONS: list[str] = [
    """CREATE TABLE nodes (
        address TEXT PRIMARY KEY, state TEXT NOT NULL, chain_status INTEGER, chain_block INTEGER,
        hardware TEXT, url TEXT, approved_at REAL, member_since REAL, last_heartbeat REAL,
        state_since REAL, last_error TEXT, last_sample TEXT)""",
    """CREATE TABLE invites (
        node TEXT PRIMARY KEY, invited_at REAL, expiry INTEGER, failures INTEGER NOT NULL,
        next_attempt_at REAL, sent INTEGER NOT NULL)""",
    """CREATE TABLE tasks (
        id TEXT PRIMARY KEY, spec TEXT NOT NULL, created_at REAL NOT NULL, stop_requested INTEGER NOT NULL)""",
    """CREATE TABLE replicas (
        task_id TEXT NOT NULL, idx INTEGER NOT NULL, node TEXT, state TEXT NOT NULL, gpu_indices TEXT NOT NULL,
        attempt INTEGER NOT NULL, exit_code INTEGER, assigned_at REAL, started_at REAL, finished_at REAL,
        error TEXT, PRIMARY KEY (task_id, idx))""",
    "CREATE INDEX replicas_by_node ON replicas (node)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE manifests (
        task_id TEXT NOT NULL, replica INTEGER NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
        sha256 TEXT NOT NULL, synced_at REAL NOT NULL, PRIMARY KEY (task_id, replica, path))""",
    "CREATE TABLE blobs (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, stored_at REAL NOT NULL)",
    # Storage sync marks, until then in a second file (<data>/sync.sqlite, table final_syncs):
    # ``adopt_legacy_sync_marks`` copies that one in once.
    """CREATE TABLE sync_marks (
        task_id TEXT NOT NULL, replica INTEGER NOT NULL, failures INTEGER NOT NULL, next_at REAL,
        final_attempts INTEGER NOT NULL, final_at REAL, files INTEGER, PRIMARY KEY (task_id, replica))""",
    # The copy (node) that last listed each synced file: a sync never erases another copy's files.
    "ALTER TABLE manifests ADD COLUMN source TEXT",
    # The replica attempt a sync mark is about (a new attempt gets fresh marks: syncplan.current_mark).
    "ALTER TABLE sync_marks ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
    # How often the node restarted the replica's container this attempt (ReplicaReport.restarts):
    # a restarted master shows it before the node's next heartbeat.
    "ALTER TABLE replicas ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0",
    # A group task's state machine (issue 15: gangs.to_json), written with its task.
    "CREATE TABLE groups (task_id TEXT PRIMARY KEY, state TEXT NOT NULL)",
]

LEGACY_SYNC_FILE = "sync.sqlite"

CURSOR_KEY = "chain_cursor"


@dataclass(frozen=True)
class SyncedFile:
    """A file of a replica's persistent storage that the master holds a copy of (blob ``sha256``)."""

    task_id: str
    replica: int
    path: str
    size: int
    sha256: str
    synced_at: float

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "replica": self.replica, "path": self.path, "size": self.size,
                "sha256": self.sha256, "synced_at": self.synced_at}


@dataclass(frozen=True)
class BlobRecord:
    sha256: str
    size: int
    stored_at: float


class MasterStore:
    """Persistence for one master. ``db`` is a ``prime.store.Database``; the schema is created on open."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(MIGRATIONS)

    # --- whole state -------------------------------------------------------------------------

    def save(self, state: MasterState) -> None:
        """Write every node and task (and the cursor) in one transaction."""
        self._write(state, list(state.nodes), list(state.tasks), list(state.sync_marks), everything=True)

    def flush(self, state: MasterState) -> None:
        """Write what changed since the last save/flush (``state.dirty_*``) and the cursor."""
        self._write(state, sorted(state.dirty_nodes), sorted(state.dirty_tasks), sorted(state.dirty_sync))

    def _write(self, state: MasterState, node_ids: list[str], task_ids: list[str],
               sync_keys: list[tuple[str, int]] | None = None, everything: bool = False) -> None:
        # One executemany per table: at 10,000 nodes a flush writes thousands of rows, and a
        # statement per row costs more than the rows themselves.
        nodes = [state.nodes[address] for address in node_ids if address in state.nodes]
        with self.db.transaction():
            if nodes:
                self.db.executemany(NODE_UPSERT, [_node_row(rec) for rec in nodes])
                self.db.executemany(INVITE_UPSERT, [_invite_row(rec) for rec in nodes])
            for task_id in task_ids:
                if task_id in state.tasks:
                    self._write_task(state.tasks[task_id])
                if task_id in state.groups:
                    self.db.execute("INSERT OR REPLACE INTO groups (task_id, state) VALUES (?, ?)",
                                    (task_id, json.dumps(gangs.to_json(state.groups[task_id]))))
            marks = [(key, state.sync_marks[key]) for key in sync_keys or () if key in state.sync_marks]
            if marks:
                self.db.executemany(SYNC_MARK_UPSERT, [_sync_mark_row(key, mark) for key, mark in marks])
            if state.chain_cursor is not None and (state.dirty_cursor or everything):
                self._set_meta(CURSOR_KEY, str(state.chain_cursor))
        state.dirty_nodes.clear()
        state.dirty_tasks.clear()
        state.dirty_sync.clear()
        state.dirty_cursor = False

    def load(self, config: StateConfig | None = None) -> MasterState:
        """The state as last saved (empty on a new database)."""
        state = MasterState(config=config or StateConfig())
        invites = {row["node"]: row for row in self.db.query("SELECT * FROM invites", ())}
        for row in self.db.query("SELECT * FROM nodes ORDER BY address", ()):
            rec = _node_from_row(row, invites.get(row["address"]))
            state.nodes[rec.address] = rec
        replicas: dict[str, list[Replica]] = {}
        for row in self.db.query("SELECT * FROM replicas ORDER BY task_id, idx", ()):
            replicas.setdefault(row["task_id"], []).append(_replica_from_row(row))
        for row in self.db.query("SELECT * FROM tasks ORDER BY created_at, id", ()):
            task = Task(row["id"], _spec_from_stored(json.loads(row["spec"])), row["created_at"],
                        replicas.get(row["id"], []), bool(row["stop_requested"]))
            state.tasks[task.id] = task
        for row in self.db.query("SELECT * FROM groups", ()):
            owner = state.tasks.get(row["task_id"])
            if owner is not None:
                group = state.groups[owner.id] = gangs.from_json(owner.id, json.loads(row["state"]))
                owner.group = gangs.view(group)
        for row in self.db.query("SELECT * FROM sync_marks ORDER BY task_id, replica", ()):
            state.sync_marks[(row["task_id"], row["replica"])] = SyncMark(
                row["failures"], row["next_at"], row["final_attempts"], row["final_at"], row["files"], row["attempt"])
        state.chain_cursor = self.get_cursor()
        return state

    def adopt_legacy_sync_marks(self, data_dir: Path) -> int:
        """Copy the final-sync marks of an older master (``<data>/sync.sqlite``) into this store, once:
        the file is renamed ``sync.sqlite.adopted`` after. Returns how many marks were copied."""
        legacy = Path(data_dir) / LEGACY_SYNC_FILE
        if not legacy.is_file():
            return 0
        old = Database(legacy)
        try:
            tables = old.query("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'final_syncs'", ())
            rows = old.query("SELECT task_id, replica, synced_at, files FROM final_syncs", ()) if tables else []
        finally:
            old.close()
        with self.db.transaction():
            for r in rows:  # a mark already here (written by this version) wins
                self.db.execute(
                    "INSERT OR IGNORE INTO sync_marks (task_id, replica, failures, next_at, final_attempts, final_at,"
                    " files) VALUES (?, ?, 0, NULL, 0, ?, ?)", (r["task_id"], r["replica"], r["synced_at"], r["files"]))
        for suffix in ("-wal", "-shm"):
            Path(str(legacy) + suffix).unlink(missing_ok=True)
        legacy.rename(legacy.with_name(LEGACY_SYNC_FILE + ".adopted"))
        return len(rows)

    def _write_task(self, task: Task) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO tasks (id, spec, created_at, stop_requested) VALUES (?, ?, ?, ?)",
            (task.id, json.dumps(task.spec.to_json()), task.created_at, int(task.stop_requested)),
        )
        for r in task.replicas:
            self.db.execute(
                "INSERT OR REPLACE INTO replicas (task_id, idx, node, state, gpu_indices, attempt, exit_code,"
                " assigned_at, started_at, finished_at, error, restarts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task.id, r.index, r.node, r.state.value, json.dumps(list(r.gpu_indices)), r.attempt, r.exit_code,
                 r.assigned_at, r.started_at, r.finished_at, r.error, r.restarts),
            )

    # --- chain cursor -----------------------------------------------------------------------------
    # Prefer StateCursor (below): it commits the cursor together with the state changes of the
    # events it covers. These read/write the same stored value, for tools and tests.

    def get_cursor(self) -> int | None:
        value = self._get_meta(CURSOR_KEY)
        return int(value) if value is not None else None

    def set_cursor(self, block: int) -> None:
        with self.db.transaction():
            self._set_meta(CURSOR_KEY, str(int(block)))

    def _get_meta(self, key: str) -> str | None:
        rows = self.db.query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --- synced storage --------------------------------------------------------------------------

    def save_manifest(self, task_id: str, replica: int, entries: Iterable[ManifestEntry], synced_at: float,
                      source: str = "") -> list[str]:
        """Merge one copy's manifest into the synced manifest of a replica (call after every listed blob
        is stored): listed files are added or overwritten; of the rest only those ``source`` listed
        before are dropped (``syncplan.dropped``: a sync never erases another copy's files).
        Returns the dropped paths."""
        entries = list(entries)
        with self.db.transaction():
            previous = {r["path"]: r["source"] for r in self.db.query(
                "SELECT path, source FROM manifests WHERE task_id = ? AND replica = ?", (task_id, replica))}
            gone = dropped(previous, {e.path for e in entries}, source)
            for path in gone:
                self.db.execute("DELETE FROM manifests WHERE task_id = ? AND replica = ? AND path = ?",
                                (task_id, replica, path))
            for e in entries:
                self.db.execute(
                    "INSERT OR REPLACE INTO manifests (task_id, replica, path, size, sha256, synced_at, source)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (task_id, replica, e.path, e.size, e.sha256, synced_at, source),
                )
        return gone

    def manifest(self, task_id: str, replica: int | None = None) -> list[SyncedFile]:
        """The synced files of a task (all replicas, or one), by replica then path."""
        if replica is None:
            rows = self.db.query("SELECT * FROM manifests WHERE task_id = ? ORDER BY replica, path", (task_id,))
        else:
            rows = self.db.query(
                "SELECT * FROM manifests WHERE task_id = ? AND replica = ? ORDER BY path", (task_id, replica)
            )
        return [_synced_from_row(r) for r in rows]

    def synced_file(self, task_id: str, path: str, replica: int = 0) -> SyncedFile | None:
        rows = self.db.query(
            "SELECT * FROM manifests WHERE task_id = ? AND replica = ? AND path = ?", (task_id, replica, path)
        )
        return _synced_from_row(rows[0]) if rows else None

    def lists_blob(self, task_id: str, replica: int, sha256: str) -> bool:
        """Whether the synced manifest of this replica has a file with this content."""
        return bool(self.db.query("SELECT 1 FROM manifests WHERE task_id = ? AND replica = ? AND sha256 = ? LIMIT 1",
                                  (task_id, replica, sha256)))

    def add_blob(self, sha256: str, size: int, stored_at: float) -> None:
        """Record that the content store holds ``sha256`` (idempotent)."""
        with self.db.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO blobs (sha256, size, stored_at) VALUES (?, ?, ?)", (sha256, size, stored_at)
            )

    def has_blob(self, sha256: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM blobs WHERE sha256 = ?", (sha256,)))

    def blob(self, sha256: str) -> BlobRecord | None:
        rows = self.db.query("SELECT * FROM blobs WHERE sha256 = ?", (sha256,))
        return BlobRecord(rows[0]["sha256"], rows[0]["size"], rows[0]["stored_at"]) if rows else None

    def missing_blobs(self, digests: Iterable[str]) -> list[str]:
        """The digests (unique, in the given order) the content store lacks: what a sync must fetch."""
        wanted = list(dict.fromkeys(digests))
        have: set[str] = set()
        for start in range(0, len(wanted), 500):  # stay under SQLite's parameter limit
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            have.update(r["sha256"] for r in self.db.query(f"SELECT sha256 FROM blobs WHERE sha256 IN ({marks})",
                                                           tuple(chunk)))
        return [d for d in wanted if d not in have]


class StateCursor:
    """A ``prime.chain.events.CursorStore`` for the master's EventFollower.

    ``set`` is called after a batch of chain events went through ``handle``: it moves the cursor
    and flushes the state, so the events' effects and the cursor land in one transaction; a
    crash before that replays the batch (every chain event handler is idempotent).
    """

    def __init__(self, state: MasterState, store: MasterStore) -> None:
        self.state = state
        self.store = store

    def get(self) -> int | None:
        return self.state.chain_cursor

    def set(self, block: int) -> None:
        self.state.set_cursor(block)
        self.store.flush(self.state)


# --- row conversion -----------------------------------------------------------------------------------


def _node_from_row(row: Any, invite: Any | None) -> NodeRecord:
    return NodeRecord(
        address=row["address"],
        state=NodeState(row["state"]),
        hardware=specs_from_json(json.loads(row["hardware"])) if row["hardware"] else NO_HARDWARE,
        chain_status=NodeStatus(row["chain_status"]) if row["chain_status"] is not None else None,
        chain_block=row["chain_block"],
        url=row["url"],
        approved_at=row["approved_at"],
        invited_at=invite["invited_at"] if invite else None,
        invite_expiry=invite["expiry"] if invite else None,
        invite_failures=invite["failures"] if invite else 0,
        next_invite_at=invite["next_attempt_at"] if invite else None,
        invites_sent=invite["sent"] if invite else 0,
        member_since=row["member_since"],
        last_heartbeat=row["last_heartbeat"],
        state_since=row["state_since"],
        last_error=row["last_error"],
        last_sample=NodeSample.from_json(json.loads(row["last_sample"])) if row["last_sample"] else None,
    )


def _replica_from_row(row: Any) -> Replica:
    return Replica(
        task_id=row["task_id"], index=row["idx"], node=row["node"], state=ReplicaState(row["state"]),
        gpu_indices=tuple(json.loads(row["gpu_indices"])), attempt=row["attempt"], exit_code=row["exit_code"],
        assigned_at=row["assigned_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        error=row["error"], restarts=row["restarts"],
    )


def _spec_from_stored(data: dict[str, Any]) -> TaskSpec:
    # Not TaskSpec.from_json: a stored task stays loadable even if input limits tighten later.
    return TaskSpec(
        image=data["image"], command=tuple(data.get("command", ())), env=dict(data.get("env", {})),
        gpus=data.get("gpus", 0), replicas=data.get("replicas", 1), persistent=bool(data.get("persistent", False)),
        cpu_limit=data.get("cpu_limit"), memory_limit_mib=data.get("memory_limit_mib"),
        restart=RestartPolicy(data.get("restart", "never")),
        group=GroupRequest(**data["group"]) if data.get("group") else None,
    )


def _synced_from_row(row: Any) -> SyncedFile:
    return SyncedFile(row["task_id"], row["replica"], row["path"], row["size"], row["sha256"], row["synced_at"])


NODE_UPSERT = (
    "INSERT OR REPLACE INTO nodes (address, state, chain_status, chain_block, hardware, url, approved_at,"
    " member_since, last_heartbeat, state_since, last_error, last_sample)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SYNC_MARK_UPSERT = (
    "INSERT OR REPLACE INTO sync_marks (task_id, replica, failures, next_at, final_attempts, final_at, files, attempt)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INVITE_UPSERT = (
    "INSERT OR REPLACE INTO invites (node, invited_at, expiry, failures, next_attempt_at, sent)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def _node_row(rec: NodeRecord) -> tuple[Any, ...]:
    return (
        rec.address, rec.state.value,
        int(rec.chain_status) if rec.chain_status is not None else None, rec.chain_block,
        json.dumps(specs_to_json(rec.hardware)), rec.url, rec.approved_at, rec.member_since,
        rec.last_heartbeat, rec.state_since, rec.last_error,
        json.dumps(rec.last_sample.to_json()) if rec.last_sample else None,
    )


def _sync_mark_row(key: tuple[str, int], mark: SyncMark) -> tuple[Any, ...]:
    return (key[0], key[1], mark.failures, mark.next_at, mark.final_attempts, mark.final_at, mark.files, mark.attempt)


def _invite_row(rec: NodeRecord) -> tuple[Any, ...]:
    return (rec.address, rec.invited_at, rec.invite_expiry, rec.invite_failures, rec.next_invite_at, rec.invites_sent)
