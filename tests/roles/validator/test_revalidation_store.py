"""The re-validation rows of the validator's store (which registrations are candidates, the states
a re-challenge goes through, the migration of an existing database) and the scheduler's draw."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from prime.roles.validator.revalidate import Revalidator
from prime.roles.validator.store import (
    DECIDED,
    MIGRATIONS,
    PASSED,
    PENDING,
    REPORTED,
    SKIPPED,
    Registration,
    ValidatorStore,
)
from prime.roles.validator.verdict import Verdict
from prime.store import Database


def reg(i: int, node: str | None = None, block: int | None = None) -> Registration:
    return Registration(node=node or f"0x{i:040x}", run_id=1, block=block or 10 + i, log_index=0, tx_hash=f"0x{i:064x}")


def verdict(approved: bool) -> Verdict:
    return Verdict(approved, None if approved else "entries", "all checks passed" if approved else "entries check failed: x",
                   {"n": 64, "approved": approved}, "challenge-1")


def decided_on_chain(store: ValidatorStore, registration: Registration, approved: bool) -> None:
    store.decide(registration.id, verdict(approved), now=1.0, miner_url="http://m")
    store.reported(registration.id, tx_hash="0xt", now=2.0)


def test_candidates_are_each_nodes_latest_decided_registration_not_rejected_here(tmp_path: Path) -> None:
    store = ValidatorStore(Database(tmp_path / "v.sqlite"))
    approved, rejected, pending, again_old, again_new = reg(1), reg(2), reg(3), reg(4, "0xAA", 20), reg(5, "0xAA", 30)
    store.enqueue([approved, rejected, pending, again_old, again_new], 100, now=0.0, deadline_s=60.0)
    decided_on_chain(store, approved, True)
    decided_on_chain(store, rejected, False)
    decided_on_chain(store, again_old, True)  # the node registered again since: only the new row counts
    decided_on_chain(store, again_new, True)
    assert [r.id for r in store.revalidation_candidates()] == [approved.id, again_new.id]
    store.skip(pending.id, note="approved by another validator first", now=3.0)  # may be active too
    assert [r.id for r in store.revalidation_candidates()] == [approved.id, pending.id, again_new.id]


def test_a_re_challenge_goes_pending_then_passed_or_decided_then_reported(tmp_path: Path) -> None:
    store = ValidatorStore(Database(tmp_path / "v.sqlite"))
    r = reg(1)
    store.enqueue([r], 100, now=0.0, deadline_s=60.0)
    decided_on_chain(store, r, True)
    (row,) = store.revalidation_candidates()

    first = store.start_revalidation(row, now=10.0, deadline_s=30.0)
    assert (first.id, first.state, first.deadline_at) == (f"{r.id}#1", PENDING, 40.0)
    store.revalidation_failed_attempt(first.id, kind="unreachable", error="down", retry_at=12.0, miner_url="http://m")
    assert store.open_revalidation(r.id).attempts == 1
    assert store.decide_revalidation(first.id, verdict(True), now=13.0, miner_url=None)
    assert store.get_revalidation(first.id).state == PASSED and store.open_revalidation(r.id) is None
    assert store.revalidation_candidates() == [row]  # a pass changes nothing

    second = store.start_revalidation(row, now=20.0, deadline_s=30.0)
    assert second.id == f"{r.id}#2"
    assert store.decide_revalidation(second.id, verdict(False), now=21.0, miner_url=None)
    assert not store.decide_revalidation(second.id, verdict(True), now=22.0, miner_url=None)  # decided once
    decided = store.open_revalidation(r.id)
    assert decided.state == DECIDED and decided.result == "failed" and decided.report_hash == "0x" + verdict(False).report_hash.hex()
    store.revalidation_reported(second.id, tx_hash="0xabc", now=23.0)
    done = store.get_revalidation(second.id)
    assert (done.state, done.tx_hash, done.failed_check, done.report) == (REPORTED, "0xabc", "entries", {"n": 64, "approved": False})
    assert store.revalidation_candidates() == []  # ejected: never re-challenged again
    assert [x.to_json()["result"] for x in store.revalidations(node=r.node.upper())] == ["passed", "failed"]


def test_a_re_challenge_of_a_node_gone_meanwhile_is_skipped(tmp_path: Path) -> None:
    store = ValidatorStore(Database(tmp_path / "v.sqlite"))
    r = reg(1)
    store.enqueue([r], 100, now=0.0, deadline_s=60.0)
    decided_on_chain(store, r, True)
    started = store.start_revalidation(store.revalidation_candidates()[0], now=1.0, deadline_s=5.0)
    store.skip_revalidation(started.id, note="left", now=2.0)
    assert store.get_revalidation(started.id).state == SKIPPED and store.revalidation_candidates() == []


def test_an_existing_database_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    old = Database(tmp_path / "v.sqlite")
    old.migrate(MIGRATIONS[:1])  # a database written before re-validation existed
    old.execute("INSERT INTO validations (id, node, run_id, block, log_index, state, seen_at, deadline_at, next_attempt_at) "
                "VALUES ('x:0', '0x01', 1, 5, 0, 'pending', 0, 60, 0)")
    old.close()
    store = ValidatorStore(Database(tmp_path / "v.sqlite"))
    assert store.db.schema_version == len(MIGRATIONS) == 3
    assert [r.id for r in store.all()] == ["x:0"] and store.revalidations() == []


def test_turns_are_exponential_with_the_stated_mean() -> None:
    service = SimpleNamespace(clock=lambda: 0.0)
    revalidator = Revalidator(service, mean_s=600.0, rng=random.Random(12))  # type: ignore[arg-type]
    draws = [revalidator.draw() for _ in range(20_000)]
    assert statistics.fmean(draws) == pytest.approx(600.0, rel=0.03)
    assert statistics.median(draws) == pytest.approx(600.0 * 0.6931, rel=0.05)  # ln 2 · mean: exponential, not uniform
    assert min(draws) >= 0.0 and Revalidator(service, mean_s=1.0).rng.__class__ is random.SystemRandom  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Revalidator(service, mean_s=0.0)  # type: ignore[arg-type]
