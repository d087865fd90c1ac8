"""The master's copy of every replica attempt's log lines: ``<data>/logs.sqlite``, bounded per task.

One row per line, tagged with replica, attempt, node, stream, the miner's timestamp and ``seq``
(the line's position in its attempt's output on the miner, counted from 0; None for lines the
master adds itself, such as "could not read node X"). Per attempt the store keeps ``received``
(how many of the miner's lines were read: where a reader resumes, after a reconnect or a master
restart, so no line is stored twice), ``dropped`` and ``done`` (the attempt finished and its
last line was read: nobody follows it again).

Bounded: a task's lines take at most ``max_bytes_per_task`` (text plus a fixed overhead per
line); past that the oldest lines of the task go first, down to 90 % of the bound, and each
attempt counts how many of its lines were dropped, so a reader is told.

Every method is blocking (SQLite); the keeper and the route call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prime.store import Database

DEFAULT_MAX_BYTES_PER_TASK = 64 * 1024 * 1024
LINE_OVERHEAD = 64  # bytes counted per line on top of its text (tags, ids, index entries)
TRIM_TO = 0.9  # past the bound, a task is trimmed to this share of it

_SCHEMA = [
    """
    CREATE TABLE log_lines (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id TEXT NOT NULL,
        replica INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        node TEXT,
        seq INTEGER,
        stream TEXT NOT NULL,
        line TEXT NOT NULL,
        ts_text TEXT,
        ts_num REAL,
        ts_key REAL NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE INDEX log_lines_task ON log_lines (task_id);
    CREATE INDEX log_lines_task_ts ON log_lines (task_id, ts_key);
    CREATE TABLE log_attempts (
        task_id TEXT NOT NULL,
        replica INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        node TEXT,
        received INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0,
        done INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, replica, attempt)
    );
    CREATE TABLE log_tasks (
        task_id TEXT PRIMARY KEY,
        bytes INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0
    );
    """,
]


@dataclass(frozen=True)
class AttemptKey:
    task_id: str
    replica: int
    attempt: int


@dataclass(frozen=True)
class NewLine:
    """A line as the keeper hands it over (``seq`` None: the master's own note)."""

    stream: str
    line: str
    ts: str | float | None
    seq: int | None
    arrived: float  # the master's clock: the sort key of a line without a readable timestamp


@dataclass(frozen=True)
class AttemptRecord:
    key: AttemptKey
    node: str | None
    received: int
    dropped: int
    done: bool


def ts_key(ts: str | float | None, arrived: float) -> float:
    """Unix seconds of a miner's timestamp (RFC 3339 with up to 9 fraction digits, or a number);
    ``arrived`` when it has none or it does not read."""
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return float(ts) if math.isfinite(ts) else arrived
    if not isinstance(ts, str) or len(ts) < 20:
        return arrived
    from datetime import datetime, timezone

    text = ts.strip()
    try:
        head, _, rest = text.partition(".")
        fraction, zone = "", ""
        if rest:
            digits = len(rest) - len(rest.lstrip("0123456789"))
            fraction, zone = rest[:digits], rest[digits:]
        else:
            head, zone = text[:19], text[19:]
        zone = "+00:00" if zone in ("Z", "z", "") else zone
        stamp = datetime.fromisoformat(head[:19] + zone)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        return stamp.timestamp() + (float("0." + fraction) if fraction else 0.0)
    except ValueError:
        return arrived


class LogStore:
    def __init__(self, path: str | Path, *, max_bytes_per_task: int = DEFAULT_MAX_BYTES_PER_TASK) -> None:
        self.db = Database(path)
        self.db.migrate(_SCHEMA)
        self.max_bytes_per_task = max_bytes_per_task

    def close(self) -> None:
        self.db.close()

    # --- attempts ---------------------------------------------------------------------------

    def attempt(self, key: AttemptKey) -> AttemptRecord | None:
        row = self.db.query_one(
            "SELECT * FROM log_attempts WHERE task_id = ? AND replica = ? AND attempt = ?",
            (key.task_id, key.replica, key.attempt),
        )
        return _attempt(row) if row is not None else None

    def attempts(self, task_id: str | None = None, *, done: bool | None = None) -> list[AttemptRecord]:
        sql, params = "SELECT * FROM log_attempts WHERE 1 = 1", list[Any]()
        if task_id is not None:
            sql += " AND task_id = ?"
            params.append(task_id)
        if done is not None:
            sql += " AND done = ?"
            params.append(int(done))
        return [_attempt(row) for row in self.db.query(sql + " ORDER BY task_id, replica, attempt", params)]

    def mark_done(self, key: AttemptKey) -> None:
        with self.db.transaction() as db:
            self._ensure_attempt(db, key, None)
            db.execute("UPDATE log_attempts SET done = 1 WHERE task_id = ? AND replica = ? AND attempt = ?",
                       (key.task_id, key.replica, key.attempt))

    @staticmethod
    def _ensure_attempt(db: Database, key: AttemptKey, node: str | None) -> None:
        db.execute(
            "INSERT INTO log_attempts (task_id, replica, attempt, node) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (task_id, replica, attempt) DO UPDATE SET node = COALESCE(excluded.node, node)",
            (key.task_id, key.replica, key.attempt, node),
        )

    # --- writing ----------------------------------------------------------------------------

    def append(self, key: AttemptKey, node: str | None, lines: Sequence[NewLine], *, received: int | None = None) -> int:
        """Store ``lines`` of one attempt and, with ``received``, how many of the miner's lines are
        read now (in the same transaction, so a crash never stores a line without its count).
        Trims the task when it is over its bound; returns how many lines were dropped."""
        rows = []
        added = 0
        for item in lines:
            size = len(item.line.encode("utf-8", "surrogatepass")) + LINE_OVERHEAD
            added += size
            text_ts = item.ts if isinstance(item.ts, str) else None
            num_ts = float(item.ts) if isinstance(item.ts, (int, float)) and not isinstance(item.ts, bool) else None
            rows.append((key.task_id, key.replica, key.attempt, node, item.seq, item.stream, item.line,
                         text_ts, num_ts, ts_key(item.ts, item.arrived), size))
        with self.db.transaction() as db:
            self._ensure_attempt(db, key, node)
            if rows:
                db.executemany(
                    "INSERT INTO log_lines (task_id, replica, attempt, node, seq, stream, line, ts_text, ts_num, ts_key, size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if received is not None:
                db.execute("UPDATE log_attempts SET received = MAX(received, ?) WHERE task_id = ? AND replica = ? AND attempt = ?",
                           (received, key.task_id, key.replica, key.attempt))
            db.execute("INSERT INTO log_tasks (task_id, bytes) VALUES (?, ?)"
                       " ON CONFLICT (task_id) DO UPDATE SET bytes = bytes + excluded.bytes", (key.task_id, added))
            row = db.query_one("SELECT bytes FROM log_tasks WHERE task_id = ?", (key.task_id,))
            if row is not None and row["bytes"] > self.max_bytes_per_task:
                return self._trim(db, key.task_id, int(row["bytes"]))
        return 0

    def _trim(self, db: Database, task_id: str, total: int) -> int:
        """Drop the task's oldest lines until it takes at most ``TRIM_TO`` of its bound."""
        goal = int(self.max_bytes_per_task * TRIM_TO)
        freed, last_id, dropped = 0, 0, 0
        per_attempt: dict[tuple[int, int], int] = {}
        while total - freed > goal:
            batch = db.query("SELECT id, size, replica, attempt FROM log_lines WHERE task_id = ? AND id > ? ORDER BY id LIMIT 2000",
                             (task_id, last_id))
            if not batch:
                break
            for row in batch:
                if total - freed <= goal:
                    break
                freed += int(row["size"])
                last_id = int(row["id"])
                dropped += 1
                pair = (int(row["replica"]), int(row["attempt"]))
                per_attempt[pair] = per_attempt.get(pair, 0) + 1
        if not dropped:
            return 0
        db.execute("DELETE FROM log_lines WHERE task_id = ? AND id <= ?", (task_id, last_id))
        db.execute("UPDATE log_tasks SET bytes = bytes - ?, dropped = dropped + ? WHERE task_id = ?", (freed, dropped, task_id))
        for (replica, attempt), count in per_attempt.items():
            db.execute("UPDATE log_attempts SET dropped = dropped + ? WHERE task_id = ? AND replica = ? AND attempt = ?",
                       (count, task_id, replica, attempt))
        return dropped

    # --- reading ----------------------------------------------------------------------------

    def task_bytes(self, task_id: str) -> tuple[int, int]:
        """(bytes counted, lines dropped) of a task."""
        row = self.db.query_one("SELECT bytes, dropped FROM log_tasks WHERE task_id = ?", (task_id,))
        return (int(row["bytes"]), int(row["dropped"])) if row is not None else (0, 0)

    def last_id(self) -> int:
        row = self.db.query_one("SELECT MAX(id) AS id FROM log_lines")
        return int(row["id"]) if row is not None and row["id"] is not None else 0

    def start_of_tail(self, task_id: str, tail: int, *, replica: int | None, attempt: int | None,
                      upto: int) -> tuple[float, int] | None:
        """The (ts_key, id) of the first of the last ``tail`` lines (in time order); None: fewer exist."""
        where, params = _where(task_id, replica, attempt)
        row = self.db.query_one(
            f"SELECT ts_key, id FROM log_lines WHERE {where} AND id <= ? ORDER BY ts_key DESC, id DESC LIMIT 1 OFFSET ?",
            [*params, upto, tail - 1],
        )
        return (float(row["ts_key"]), int(row["id"])) if row is not None else None

    def page_by_time(self, task_id: str, *, replica: int | None, attempt: int | None, after: tuple[float, int] | None,
                     upto: int, limit: int = 1000, inclusive: bool = False) -> list[dict[str, Any]]:
        """Lines in time order (ties in arrival order) after ``after`` (or from it, ``inclusive``), ids ≤ ``upto``."""
        where, params = _where(task_id, replica, attempt)
        if after is not None:
            op = ">=" if inclusive else ">"
            where += f" AND (ts_key > ? OR (ts_key = ? AND id {op} ?))"
            params += [after[0], after[0], after[1]]
        rows = self.db.query(f"SELECT * FROM log_lines WHERE {where} AND id <= ? ORDER BY ts_key, id LIMIT ?",
                             [*params, upto, limit])
        return [_line(row) for row in rows]

    def page_by_arrival(self, task_id: str, *, replica: int | None, attempt: int | None, after_id: int,
                        limit: int = 1000) -> list[dict[str, Any]]:
        """Lines stored after row ``after_id``, in arrival order (what a follower gets live)."""
        where, params = _where(task_id, replica, attempt)
        rows = self.db.query(f"SELECT * FROM log_lines WHERE {where} AND id > ? ORDER BY id LIMIT ?", [*params, after_id, limit])
        return [_line(row) for row in rows]


def _where(task_id: str, replica: int | None, attempt: int | None) -> tuple[str, list[Any]]:
    where, params = "task_id = ?", list[Any]([task_id])
    if replica is not None:
        where += " AND replica = ?"
        params.append(replica)
    if attempt is not None:
        where += " AND attempt = ?"
        params.append(attempt)
    return where, params


def _attempt(row: Any) -> AttemptRecord:
    return AttemptRecord(AttemptKey(row["task_id"], int(row["replica"]), int(row["attempt"])), row["node"],
                         int(row["received"]), int(row["dropped"]), bool(row["done"]))


def _line(row: Any) -> dict[str, Any]:
    ts = row["ts_text"] if row["ts_text"] is not None else row["ts_num"]
    return {"_id": int(row["id"]), "_key": (float(row["ts_key"]), int(row["id"])), "replica": int(row["replica"]),
            "attempt": int(row["attempt"]), "node": row["node"], "stream": row["stream"], "line": row["line"],
            "ts": ts, "seq": row["seq"]}
