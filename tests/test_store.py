"""prime.store.Database: WAL, migrations by user_version, transactions, thread use."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from prime.errors import PrimeError
from prime.store import Database, split_statements

SCHEMA = [
    "CREATE TABLE nodes (address TEXT PRIMARY KEY, status TEXT NOT NULL)",
    """
    CREATE TABLE tasks (id TEXT PRIMARY KEY, node TEXT REFERENCES nodes(address));
    CREATE INDEX tasks_by_node ON tasks(node);
    """,
]


def test_wal_and_migrations_apply_once(tmp_path) -> None:
    path = tmp_path / "sub" / "state.db"
    db = Database(path)
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert db.migrate(SCHEMA) == 2
    assert db.schema_version == 2
    db.execute("INSERT INTO nodes VALUES (?, ?)", ("0xa", "healthy"))
    db.close()

    reopened = Database(path)
    assert reopened.migrate(SCHEMA) == 0  # nothing re-run: the row survives
    assert [tuple(r) for r in reopened.query("SELECT * FROM nodes")] == [("0xa", "healthy")]
    assert reopened.migrate([*SCHEMA, "ALTER TABLE nodes ADD COLUMN ip TEXT"]) == 1
    assert reopened.schema_version == 3
    assert reopened.query_one("SELECT ip FROM nodes WHERE address = ?", ("0xa",))["ip"] is None
    reopened.close()


def test_a_failing_migration_leaves_the_previous_version(tmp_path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate(SCHEMA[:1])
    with pytest.raises(sqlite3.OperationalError):
        db.migrate([SCHEMA[0], "CREATE TABLE ok (x); CREATE TABLE broken (;"])
    assert db.schema_version == 1
    assert db.query("SELECT name FROM sqlite_master WHERE name = 'ok'") == []  # rolled back as a unit


def test_newer_schema_is_refused(tmp_path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate(SCHEMA)
    with pytest.raises(PrimeError, match="newer than this prime knows"):
        db.migrate(SCHEMA[:1])


def test_transaction_commits_or_rolls_back(tmp_path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate(SCHEMA)
    with db.transaction():
        db.execute("INSERT INTO nodes VALUES ('0xa', 'healthy')")
        db.execute("INSERT INTO tasks VALUES ('t1', '0xa')")
    with pytest.raises(RuntimeError), db.transaction():
        db.execute("INSERT INTO nodes VALUES ('0xb', 'healthy')")
        raise RuntimeError("crash mid-update")
    assert [r["address"] for r in db.query("SELECT address FROM nodes")] == ["0xa"]
    with pytest.raises(sqlite3.IntegrityError):  # foreign keys are on
        db.execute("INSERT INTO tasks VALUES ('t2', '0xmissing')")


def test_nested_transaction_joins_the_outer_one(tmp_path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate(SCHEMA)
    with pytest.raises(ValueError), db.transaction():
        with db.transaction():
            db.execute("INSERT INTO nodes VALUES ('0xa', 'x')")
        raise ValueError
    assert db.query("SELECT * FROM nodes") == []


def test_execute_returns_rowcount_and_lastrowid(tmp_path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate(["CREATE TABLE log (id INTEGER PRIMARY KEY, line TEXT)"])
    assert db.execute("INSERT INTO log (line) VALUES (:line)", {"line": "a"}).lastrowid == 1
    db.executemany("INSERT INTO log (line) VALUES (?)", [("b",), ("c",)])
    assert db.execute("UPDATE log SET line = 'z' WHERE id > 1").rowcount == 2


def test_threads_share_one_database(tmp_path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate(["CREATE TABLE n (v INTEGER)"])

    def work(k: int) -> None:
        for i in range(100):
            with db.transaction():
                db.execute("INSERT INTO n VALUES (?)", (k * 1000 + i,))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert db.query_one("SELECT count(*) AS c FROM n")["c"] == 400


async def test_awaiting_inside_a_transaction_is_detected(tmp_path) -> None:
    db = Database(tmp_path / "s.db")
    db.migrate(["CREATE TABLE n (v INTEGER)"])
    entered = asyncio.Event()
    release = asyncio.Event()

    async def careless() -> None:
        with db.transaction():
            db.execute("INSERT INTO n VALUES (1)")
            entered.set()
            await release.wait()

    task = asyncio.create_task(careless())
    await entered.wait()
    with pytest.raises(RuntimeError, match="do not await inside a transaction"):
        db.execute("INSERT INTO n VALUES (2)")
    release.set()
    await task
    assert [r["v"] for r in db.query("SELECT v FROM n")] == [1]


def test_split_statements_respects_strings_and_triggers() -> None:
    script = "CREATE TABLE a (x TEXT); INSERT INTO a VALUES ('x;y'); CREATE TRIGGER t AFTER INSERT ON a BEGIN DELETE FROM a WHERE 0; END;"
    assert len(split_statements(script)) == 3


def test_unopenable_database_is_one_sentence(tmp_path) -> None:
    bad = tmp_path / "not.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PrimeError, match="Cannot open the database"):
        Database(bad)
