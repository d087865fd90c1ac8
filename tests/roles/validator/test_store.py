"""The validator's SQLite store: registrations and cursor move together, verdicts are recorded once,
and everything is still there when the file is opened again."""

from __future__ import annotations

from pathlib import Path

from prime.roles.validator.store import (
    DECIDED,
    PENDING,
    REPORTED,
    SKIPPED,
    Registration,
    ValidatorStore,
)
from prime.roles.validator.verdict import Verdict
from prime.store import Database


def reg(i: int, node: str | None = None) -> Registration:
    return Registration(node=node or f"0x{i:040x}", run_id=1, block=10 + i, log_index=0, tx_hash=f"0x{i:064x}")


def open_store(path: Path) -> ValidatorStore:
    return ValidatorStore(Database(path / "v.sqlite"))


def test_registrations_and_cursor_are_saved_together_and_a_reread_batch_adds_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert store.cursor() is None
    assert store.enqueue([reg(1), reg(2)], 13, now=1000.0, deadline_s=60.0) == 2
    assert store.cursor() == 13
    # The follower delivers the same batch again after a crash before its commit: no duplicates.
    assert store.enqueue([reg(1), reg(2)], 13, now=2000.0, deadline_s=60.0) == 0
    rows = store.all()
    assert [r.node for r in rows] == [reg(1).node, reg(2).node]
    assert rows[0].state == PENDING and rows[0].seen_at == 1000.0 and rows[0].deadline_at == 1060.0
    store.close()
    reopened = open_store(tmp_path)
    assert reopened.cursor() == 13 and len(reopened.all()) == 2


def test_a_failed_enqueue_moves_neither_rows_nor_cursor(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.enqueue([reg(1)], 12, now=0.0, deadline_s=1.0)

    class Broken(Registration):
        @property
        def id(self) -> str:
            raise RuntimeError("disk on fire")

    try:
        store.enqueue([reg(2), Broken("0xdead", 1, 20, 0, "0x00")], 21, now=0.0, deadline_s=1.0)
    except RuntimeError:
        pass
    assert store.cursor() == 12
    assert [r.node for r in store.all()] == [reg(1).node]


def test_due_rows_respect_next_attempt_and_exclusions(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.enqueue([reg(1), reg(2), reg(3)], 14, now=100.0, deadline_s=60.0)
    first, second, third = (r.id for r in store.all())
    store.failed_attempt(first, kind="unreachable", error="not announced", retry_at=110.0)
    assert [r.id for r in store.due(105.0, 10)] == [second, third]
    assert [r.id for r in store.due(105.0, 10, exclude=[second])] == [third]
    assert [r.id for r in store.due(111.0, 1)] == [second]  # oldest due first, limited
    assert store.next_due_at() == 100.0
    assert store.next_due_at(exclude=[second, third]) == 110.0
    row = store.get(first)
    assert row.attempts == 1 and row.last_kind == "unreachable" and row.last_error == "not announced"


def test_a_verdict_is_recorded_once_and_only_for_a_pending_row(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.enqueue([reg(1), reg(2)], 13, now=0.0, deadline_s=60.0)
    one, two = (r.id for r in store.all())
    verdict = Verdict(False, "entries", "entries check failed: C[1, 2] is wrong", {"n": 64, "approved": False}, "c1")
    assert store.decide(one, verdict, now=5.0, miner_url="http://127.0.0.1:1")
    other = Verdict(True, None, "all checks passed", {"n": 64, "approved": True}, "c2")
    assert not store.decide(one, other, now=6.0, miner_url=None)  # a decided row keeps its verdict
    row = store.get(one)
    assert row.state == DECIDED and row.approved is False and row.failed_check == "entries"
    assert row.report_hash == "0x" + verdict.report_hash.hex() and row.report == verdict.report
    assert row.challenge_id == "c1" and row.miner_url == "http://127.0.0.1:1"
    # A decided row is due again (to send its transaction), but never challenged: the service
    # only challenges pending rows.
    assert one in [r.id for r in store.due(10.0, 10)]
    store.reported(one, tx_hash="0xabc", now=7.0)
    assert store.get(one).state == REPORTED and store.get(one).tx_hash == "0xabc"
    assert one not in [r.id for r in store.due(10.0, 10)]
    store.skip(two, note="already approved", now=8.0)
    assert store.get(two).state == SKIPPED and store.get(two).result == "skipped"
    assert store.count_open() == 0
    assert store.get(one).to_json()["result"] == "rejected"


def test_a_restart_makes_every_open_row_due_at_once(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.enqueue([reg(1), reg(2)], 13, now=100.0, deadline_s=600.0)
    one, two = (r.id for r in store.all())
    store.failed_attempt(one, kind="unreachable", error="x", retry_at=160.0)
    store.skip(two, note="gone", now=100.0)
    assert store.due(120.0, 10) == []
    assert store.retry_all_now(120.0) == 1  # the skipped row stays closed
    (due,) = store.due(120.0, 10)
    assert due.id == one and due.attempts == 1  # the count of failed attempts is kept
