"""A small SQLite helper every role's store builds on.

One connection per ``Database``, usable from the event loop and from worker threads
(``check_same_thread=False`` + a lock). WAL journaling so readers never block the writer
and a crash loses at most the last transaction. Schema changes are a list of SQL
statements applied in order; ``PRAGMA user_version`` counts how many already ran, so a
store opened by a newer version migrates forward exactly once.

Statements outside ``transaction()`` commit on their own. Inside ``transaction()`` never
``await``: the lock would let another coroutine of the same thread slip its statements
into the open transaction, so that is detected and refused.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prime.errors import PrimeError

Params = Sequence[Any] | dict[str, Any]


def split_statements(script: str) -> list[str]:
    """The SQL statements of ``script`` (so one migration step may hold several)."""
    statements: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):  # the ';' was not inside a string or trigger
            if buffer.strip(" \t\r\n;"):
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip(" \t\r\n;"):
        statements.append(buffer.strip())  # let sqlite report the syntax error
    return statements


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        return None


class Database:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            try:
                Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PrimeError(f"Cannot create the directory for the database {self.path} ({exc.strerror}); check --data-dir.") from None
        try:
            self._conn = sqlite3.connect(
                str(Path(self.path).expanduser()) if self.path != ":memory:" else self.path,
                check_same_thread=False,
                isolation_level=None,  # autocommit; transaction() issues BEGIN itself
                timeout=busy_timeout_s,
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # durable with WAL up to the last checkpointed commit
            self._conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            raise PrimeError(f"Cannot open the database {self.path} ({exc}); check the file or move it aside.") from None
        self._lock = threading.RLock()
        self._tx_owner: tuple[int, asyncio.Task[Any] | None] | None = None

    # --- plumbing -------------------------------------------------------------------------

    def _check_not_interleaved(self) -> None:
        owner = self._tx_owner
        if owner is not None and owner[0] == threading.get_ident() and owner[1] is not _current_task():
            raise RuntimeError("another coroutine is inside Database.transaction(); do not await inside a transaction")

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- statements -----------------------------------------------------------------------

    def execute(self, sql: str, params: Params = ()) -> sqlite3.Cursor:
        """Run one statement (committed at once unless inside ``transaction()``).

        The returned cursor's ``lastrowid``/``rowcount`` are safe to read; fetch rows with
        ``query`` instead.
        """
        with self._lock:
            self._check_not_interleaved()
            return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Params]) -> sqlite3.Cursor:
        with self._lock:
            self._check_not_interleaved()
            if self._conn.in_transaction:
                return self._conn.executemany(sql, rows)
            with self.transaction():
                return self._conn.executemany(sql, rows)

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        with self._lock:
            self._check_not_interleaved()
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """All statements inside commit together or not at all (BEGIN IMMEDIATE ... COMMIT).

        Nested use joins the outer transaction.
        """
        with self._lock:
            self._check_not_interleaved()
            if self._tx_owner is not None:
                yield self  # nested: the outer block commits
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._tx_owner = (threading.get_ident(), _current_task())
            try:
                yield self
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")
            finally:
                self._tx_owner = None

    # --- schema ---------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, statements: list[str]) -> int:
        """Apply ``statements[user_version:]`` in order, each with its version bump, atomically.

        One entry may be a script of several statements; it counts as one version.
        Returns the number of statements applied now. Append to the list to change the
        schema; never edit or reorder statements that were released.
        """
        with self._lock:
            current = self.schema_version
            if current > len(statements):
                raise PrimeError(
                    f"The database {self.path} has schema version {current}, newer than this prime knows ({len(statements)}); upgrade prime."
                )
            for version, statement in enumerate(statements[current:], start=current + 1):
                with self.transaction():
                    for part in split_statements(statement):
                        self._conn.execute(part)
                    self._conn.execute(f"PRAGMA user_version = {version}")
            return len(statements) - current
