"""The validator's memory: the chain cursor and one row per node registration, in SQLite.

A registration (one NodeRegistered event) goes through::

    pending ──challenge decided──▶ decided ──reportValidation mined──▶ reported
       │                              └── another validator was first ──▶ superseded
       └── not awaiting validation on chain any more ──▶ skipped

Why this survives a crash at any point:
- New registrations and the cursor past their block are written in ONE transaction, so a
  restart never skips a node and never enqueues one twice (the row id is the event's
  position; re-reading a batch is ``INSERT OR IGNORE``).
- The verdict and its report are written before the transaction is sent; a restart finds
  the row ``decided`` and sends the same verdict again, never a second challenge.
- Only ``pending`` rows are ever challenged, so a node whose report exists is never
  challenged again by its first validation.

Re-validations (prime.roles.validator.revalidate) have their own table, one row per
re-challenge of an approved registration::

    pending ──passed──▶ passed                      (nothing on chain)
       ├──failed──▶ decided ──reportRevalidationFailure mined──▶ reported
       │                └── the node was out before the report ──▶ superseded
       └── the node is no longer active on chain ──▶ skipped

A failed verdict is written before its transaction is sent, as for first validations, so a
restart sends the same report again and never re-challenges a node it has already judged.

GPU UUIDs (``gpu_uuids``): the UUIDs each passing challenge reported, one row per (UUID,
node); a node's set is replaced by its latest passing challenge, so a re-validation of the
same node never conflicts with itself (prime.roles.validator.uniqueness decides who holds one).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prime.roles.validator.records import (  # re-exported: callers import them from here
    DECIDED,
    OPEN_STATES,
    PASSED,
    PENDING,
    REPORTED,
    SKIPPED,
    SUPERSEDED,
    Registration,
    Revalidation,
    Validation,
    _revalidation,
    _row,
)
from prime.roles.validator.verdict import Verdict
from prime.store import Database

DB_FILE = "validator.sqlite"
CURSOR_NAME = "node_registered"

REVALIDATION_DONE = (REPORTED, SUPERSEDED, SKIPPED)  # the registration is out: never re-challenged again

# Append-only: prime.store.Database.migrate applies each entry once, in order.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE cursor (
        name       TEXT PRIMARY KEY,
        next_block INTEGER NOT NULL
    );
    CREATE TABLE validations (
        id              TEXT PRIMARY KEY,   -- "{registration tx}:{log index}": one NodeRegistered event
        node            TEXT NOT NULL,
        run_id          INTEGER NOT NULL,
        block           INTEGER NOT NULL,
        log_index       INTEGER NOT NULL,
        state           TEXT NOT NULL,
        seen_at         REAL NOT NULL,      -- unix s when this validator first saw it
        deadline_at     REAL NOT NULL,      -- after this a failed attempt is a rejection
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error      TEXT,
        last_kind       TEXT,
        miner_url       TEXT,
        challenge_id    TEXT,
        approved        INTEGER,
        failed_check    TEXT,
        reason          TEXT,
        report_hash     TEXT,               -- 0x + 64 hex: keccak of report_json
        report_json     TEXT,               -- canonical JSON of the report (the figures)
        decided_at      REAL,
        tx_hash         TEXT,
        reported_at     REAL,
        note            TEXT
    );
    CREATE INDEX validations_due ON validations (state, next_attempt_at);
    CREATE INDEX validations_node ON validations (node);
    """,
    """
    CREATE TABLE revalidations (
        id              TEXT PRIMARY KEY,   -- "{registration id}#{n}": the n-th re-challenge of it
        registration_id TEXT NOT NULL,      -- the validations row of the node's approval
        node            TEXT NOT NULL,
        run_id          INTEGER NOT NULL,
        state           TEXT NOT NULL,      -- pending | passed | decided | reported | superseded | skipped
        started_at      REAL NOT NULL,
        deadline_at     REAL NOT NULL,      -- after this a failed attempt is a failure ("unreachable")
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error      TEXT,
        last_kind       TEXT,
        miner_url       TEXT,
        challenge_id    TEXT,
        passed          INTEGER,
        failed_check    TEXT,
        reason          TEXT,
        report_hash     TEXT,
        report_json     TEXT,
        decided_at      REAL,
        tx_hash         TEXT,               -- of reportRevalidationFailure
        reported_at     REAL,
        note            TEXT
    );
    CREATE INDEX revalidations_registration ON revalidations (registration_id, state);
    CREATE INDEX revalidations_node ON revalidations (node);
    """,
    """
    CREATE TABLE gpu_uuids (
        uuid            TEXT NOT NULL,      -- canonical GPU-/MIG- UUID a passing challenge reported
        node            TEXT NOT NULL,
        validation_id   TEXT NOT NULL,      -- the registration (validations row) it was reported for
        recorded_at     REAL NOT NULL,
        PRIMARY KEY (uuid, node)
    );
    CREATE INDEX gpu_uuids_node ON gpu_uuids (node);
    """,
]


def _verdict_columns(verdict: Verdict) -> tuple[Any, ...]:
    """failed_check, reason, report_hash, report_json, challenge_id: one verdict as both tables store it."""
    report = json.dumps(verdict.report, sort_keys=True, separators=(",", ":"))
    return verdict.check, verdict.reason, "0x" + verdict.report_hash.hex(), report, verdict.challenge_id


class ValidatorStore:
    """Cursor + validations on one ``prime.store.Database``."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.db.migrate(MIGRATIONS)

    @classmethod
    def open(cls, data_dir: str | Path) -> ValidatorStore:
        path = Path(data_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return cls(Database(path / DB_FILE))

    def close(self) -> None:
        self.db.close()

    # -- the chain cursor -------------------------------------------------------------------

    def cursor(self) -> int | None:
        row = self.db.query_one("SELECT next_block FROM cursor WHERE name = ?", (CURSOR_NAME,))
        return int(row["next_block"]) if row else None

    def enqueue(self, registrations: Iterable[Registration], next_block: int, *, now: float,
                deadline_s: float) -> int:
        """Add new registrations and move the cursor to ``next_block``, atomically.

        Returns how many rows are new (a re-read batch adds none).
        """
        added = 0
        with self.db.transaction():
            for reg in registrations:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO validations (id, node, run_id, block, log_index, state, seen_at, "
                    "deadline_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (reg.id, reg.node, reg.run_id, reg.block, reg.log_index, PENDING, now, now + deadline_s, now),
                )
                added += cur.rowcount
            self.db.execute(
                "INSERT INTO cursor (name, next_block) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET next_block = excluded.next_block",
                (CURSOR_NAME, int(next_block)),
            )
        return added

    # -- work --------------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> list[Validation]:
        """Open rows whose next attempt is due, oldest registration first."""
        skip = list(exclude)
        marks = ",".join("?" * len(skip))
        extra = f" AND id NOT IN ({marks})" if skip else ""
        rows = self.db.query(
            f"SELECT * FROM validations WHERE state IN (?, ?) AND next_attempt_at <= ?{extra} "
            "ORDER BY next_attempt_at, block, log_index LIMIT ?",
            (*OPEN_STATES, now, *skip, int(limit)),
        )
        return [_row(r) for r in rows]

    def retry_all_now(self, now: float) -> int:
        """Make every open row due at once (after a restart nobody should wait out an old backoff)."""
        cur = self.db.execute(
            "UPDATE validations SET next_attempt_at = ? WHERE state IN (?, ?) AND next_attempt_at > ?",
            (now, *OPEN_STATES, now),
        )
        return cur.rowcount

    def next_due_at(self, exclude: Iterable[str] = ()) -> float | None:
        """When the next open row (other than ``exclude``) is due; None when there is none."""
        skip = list(exclude)
        extra = f" AND id NOT IN ({','.join('?' * len(skip))})" if skip else ""
        row = self.db.query_one(
            f"SELECT MIN(next_attempt_at) AS t FROM validations WHERE state IN (?, ?){extra}", (*OPEN_STATES, *skip))
        return None if row is None or row["t"] is None else float(row["t"])

    def get(self, validation_id: str) -> Validation | None:
        row = self.db.query_one("SELECT * FROM validations WHERE id = ?", (validation_id,))
        return _row(row) if row else None

    # validations and revalidations share these columns: one statement each, for either table.
    def _failed_attempt(self, table: str, row_id: str, kind: str, error: str, retry_at: float,
                        miner_url: str | None) -> None:
        self.db.execute(
            f"UPDATE {table} SET attempts = attempts + 1, last_kind = ?, last_error = ?, next_attempt_at = ?, "
            "miner_url = COALESCE(?, miner_url) WHERE id = ? AND state = ?",
            (kind, error, retry_at, miner_url, row_id, PENDING),
        )

    def _defer(self, table: str, row_id: str, error: str, retry_at: float) -> None:
        self.db.execute(f"UPDATE {table} SET last_error = ?, next_attempt_at = ? WHERE id = ?", (error, retry_at, row_id))

    def failed_attempt(self, validation_id: str, *, kind: str, error: str, retry_at: float,
                       miner_url: str | None = None) -> None:
        """An attempt could not challenge the node; try again at ``retry_at``."""
        self._failed_attempt("validations", validation_id, kind, error, retry_at, miner_url)

    def defer(self, validation_id: str, *, error: str, retry_at: float) -> None:
        """Our side failed (chain down): try again later without counting it against the node."""
        self._defer("validations", validation_id, error, retry_at)

    def decide(self, validation_id: str, verdict: Verdict, *, now: float, miner_url: str | None) -> bool:
        """Record the verdict (once: only a pending row takes one). True if this call recorded it."""
        cur = self.db.execute(
            "UPDATE validations SET state = ?, approved = ?, failed_check = ?, reason = ?, report_hash = ?, "
            "report_json = ?, challenge_id = ?, miner_url = COALESCE(?, miner_url), decided_at = ?, "
            "attempts = attempts + 1, next_attempt_at = ? WHERE id = ? AND state = ?",
            (DECIDED, int(verdict.approved), *_verdict_columns(verdict), miner_url, now, now, validation_id, PENDING),
        )
        return cur.rowcount == 1

    def reported(self, validation_id: str, *, tx_hash: str | None, now: float, state: str = REPORTED,
                 note: str | None = None) -> None:
        self.db.execute(
            "UPDATE validations SET state = ?, tx_hash = ?, reported_at = ?, note = COALESCE(?, note) "
            "WHERE id = ? AND state = ?",
            (state, tx_hash, now, note, validation_id, DECIDED),
        )

    def skip(self, validation_id: str, *, note: str, now: float) -> None:
        self.db.execute(
            "UPDATE validations SET state = ?, note = ?, reported_at = ? WHERE id = ? AND state = ?",
            (SKIPPED, note, now, validation_id, PENDING),
        )

    # -- reading -----------------------------------------------------------------------------

    def all(self, *, node: str | None = None) -> list[Validation]:
        if node is not None:
            rows = self.db.query("SELECT * FROM validations WHERE lower(node) = lower(?) ORDER BY block, log_index", (node,))
        else:
            rows = self.db.query("SELECT * FROM validations ORDER BY block, log_index")
        return [_row(r) for r in rows]

    def count_open(self) -> int:
        row = self.db.query_one("SELECT COUNT(*) AS n FROM validations WHERE state IN (?, ?)", OPEN_STATES)
        return int(row["n"]) if row else 0

    # -- re-validations ----------------------------------------------------------------------

    def revalidation_candidates(self) -> list[Validation]:
        """Each node's latest registration that may be active: decided on chain (by this validator
        or another), not rejected by this one, and not taken out by a re-validation already."""
        rows = self.db.query(
            "SELECT v.* FROM validations v WHERE v.state NOT IN (?, ?) AND NOT (v.state = ? AND v.approved = 0) "
            "AND NOT EXISTS (SELECT 1 FROM validations w WHERE w.node = v.node AND "
            "(w.block > v.block OR (w.block = v.block AND w.log_index > v.log_index))) "
            "AND NOT EXISTS (SELECT 1 FROM revalidations r WHERE r.registration_id = v.id AND r.state IN (?, ?, ?)) "
            "ORDER BY v.block, v.log_index",
            (*OPEN_STATES, REPORTED, *REVALIDATION_DONE),
        )
        return [_row(r) for r in rows]

    def start_revalidation(self, registration: Validation, *, now: float, deadline_s: float) -> Revalidation:
        """A new pending re-challenge of ``registration`` (the node was active on chain just now)."""
        with self.db.transaction():
            row = self.db.query_one("SELECT COUNT(*) AS n FROM revalidations WHERE registration_id = ?", (registration.id,))
            ident = f"{registration.id}#{(int(row['n']) if row else 0) + 1}"
            self.db.execute(
                "INSERT INTO revalidations (id, registration_id, node, run_id, state, started_at, deadline_at, "
                "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (ident, registration.id, registration.node, registration.run_id, PENDING, now, now + deadline_s, now),
            )
        started = self.get_revalidation(ident)
        assert started is not None
        return started

    def open_revalidation(self, registration_id: str) -> Revalidation | None:
        """The re-challenge of this registration still in progress (pending or decided), if any."""
        row = self.db.query_one("SELECT * FROM revalidations WHERE registration_id = ? AND state IN (?, ?) "
                                "ORDER BY started_at DESC LIMIT 1", (registration_id, *OPEN_STATES))
        return _revalidation(row) if row else None

    def get_revalidation(self, revalidation_id: str) -> Revalidation | None:
        row = self.db.query_one("SELECT * FROM revalidations WHERE id = ?", (revalidation_id,))
        return _revalidation(row) if row else None

    def revalidation_failed_attempt(self, revalidation_id: str, *, kind: str, error: str, retry_at: float,
                                    miner_url: str | None = None) -> None:
        self._failed_attempt("revalidations", revalidation_id, kind, error, retry_at, miner_url)

    def defer_revalidation(self, revalidation_id: str, *, error: str, retry_at: float) -> None:
        self._defer("revalidations", revalidation_id, error, retry_at)

    def decide_revalidation(self, revalidation_id: str, verdict: Verdict, *, now: float, miner_url: str | None) -> bool:
        """Record the re-challenge's verdict: ``passed``, or ``decided`` (a failure to report on chain)."""
        cur = self.db.execute(
            "UPDATE revalidations SET state = ?, passed = ?, failed_check = ?, reason = ?, report_hash = ?, "
            "report_json = ?, challenge_id = ?, miner_url = COALESCE(?, miner_url), decided_at = ?, "
            "attempts = attempts + 1 WHERE id = ? AND state = ?",
            (PASSED if verdict.approved else DECIDED, int(verdict.approved), *_verdict_columns(verdict),
             miner_url, now, revalidation_id, PENDING),
        )
        return cur.rowcount == 1

    def revalidation_reported(self, revalidation_id: str, *, tx_hash: str | None, now: float, state: str = REPORTED,
                              note: str | None = None) -> None:
        self.db.execute(
            "UPDATE revalidations SET state = ?, tx_hash = ?, reported_at = ?, note = COALESCE(?, note) "
            "WHERE id = ? AND state = ?",
            (state, tx_hash, now, note, revalidation_id, DECIDED),
        )

    def skip_revalidation(self, revalidation_id: str, *, note: str, now: float) -> None:
        self.db.execute("UPDATE revalidations SET state = ?, note = ?, reported_at = ? WHERE id = ? AND state = ?",
                        (SKIPPED, note, now, revalidation_id, PENDING))

    def revalidations(self, *, node: str | None = None) -> list[Revalidation]:
        if node is not None:
            rows = self.db.query("SELECT * FROM revalidations WHERE lower(node) = lower(?) ORDER BY started_at", (node,))
        else:
            rows = self.db.query("SELECT * FROM revalidations ORDER BY started_at")
        return [_revalidation(r) for r in rows]

    # -- GPU UUIDs ---------------------------------------------------------------------------

    def record_gpu_uuids(self, node: str, validation_id: str, uuids: Iterable[str], *, now: float) -> None:
        """``node``'s GPUs are ``uuids`` (from a passing challenge for ``validation_id``): its set replaced."""
        with self.db.transaction():
            self.db.execute("DELETE FROM gpu_uuids WHERE lower(node) = lower(?)", (node,))
            for uuid in dict.fromkeys(uuids):
                self.db.execute("INSERT INTO gpu_uuids (uuid, node, validation_id, recorded_at) VALUES (?, ?, ?, ?)",
                                (uuid, node, validation_id, now))

    def gpu_uuid_records(self, uuids: Iterable[str], *, exclude_node: str | None = None) -> list[tuple[str, str, str]]:
        """(uuid, node, validation id) of every other node recorded with one of ``uuids``."""
        wanted = list(dict.fromkeys(uuids))
        if not wanted:
            return []
        marks = ",".join("?" * len(wanted))
        rows = self.db.query(
            f"SELECT uuid, node, validation_id FROM gpu_uuids WHERE uuid IN ({marks}) AND lower(node) != lower(?) "
            "ORDER BY recorded_at, uuid", (*wanted, exclude_node or ""))
        return [(r["uuid"], r["node"], r["validation_id"]) for r in rows]

    def gpu_uuids_of(self, node: str) -> list[str]:
        """The UUIDs last recorded for ``node`` (empty when none)."""
        rows = self.db.query("SELECT uuid FROM gpu_uuids WHERE lower(node) = lower(?) ORDER BY uuid", (node,))
        return [r["uuid"] for r in rows]
