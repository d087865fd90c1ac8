"""The validator's records as its store reads them back: one NodeRegistered event
(``Registration``), one first validation (``Validation``) and one re-challenge of an approved
node (``Revalidation``), each from its SQLite row (prime.roles.validator.store)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

PENDING, DECIDED, REPORTED, SUPERSEDED, SKIPPED = "pending", "decided", "reported", "superseded", "skipped"
OPEN_STATES = (PENDING, DECIDED)  # still work to do
PASSED = "passed"  # a re-validation the node passed


@dataclass(frozen=True)
class Registration:
    """One NodeRegistered event, as the follower hands it over."""

    node: str
    run_id: int
    block: int
    log_index: int
    tx_hash: str

    @property
    def id(self) -> str:
        return f"{self.tx_hash}:{self.log_index}"


@dataclass(frozen=True)
class Validation:
    """One row of ``validations``."""

    id: str
    node: str
    run_id: int
    block: int
    log_index: int
    state: str
    seen_at: float
    deadline_at: float
    attempts: int
    next_attempt_at: float
    last_error: str | None
    last_kind: str | None
    miner_url: str | None
    challenge_id: str | None
    approved: bool | None
    failed_check: str | None
    reason: str | None
    report_hash: str | None
    report: dict[str, Any] | None
    decided_at: float | None
    tx_hash: str | None
    reported_at: float | None
    note: str | None

    @property
    def result(self) -> str:
        """approved | rejected | pending | skipped | superseded (for tables)."""
        if self.state in (PENDING, SKIPPED, SUPERSEDED):
            return self.state
        return "approved" if self.approved else "rejected"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "node": self.node, "run_id": self.run_id, "block": self.block,
            "log_index": self.log_index, "state": self.state, "result": self.result,
            "approved": self.approved, "failed_check": self.failed_check, "reason": self.reason,
            "report_hash": self.report_hash, "report": self.report, "tx_hash": self.tx_hash,
            "miner_url": self.miner_url, "challenge_id": self.challenge_id, "attempts": self.attempts,
            "last_error": self.last_error, "seen_at": self.seen_at, "decided_at": self.decided_at,
            "reported_at": self.reported_at, "note": self.note,
        }


def _row(row: sqlite3.Row) -> Validation:
    approved = row["approved"]
    report = row["report_json"]
    return Validation(
        id=row["id"], node=row["node"], run_id=int(row["run_id"]), block=int(row["block"]),
        log_index=int(row["log_index"]), state=row["state"], seen_at=float(row["seen_at"]),
        deadline_at=float(row["deadline_at"]), attempts=int(row["attempts"]),
        next_attempt_at=float(row["next_attempt_at"]), last_error=row["last_error"],
        last_kind=row["last_kind"], miner_url=row["miner_url"], challenge_id=row["challenge_id"],
        approved=None if approved is None else bool(approved), failed_check=row["failed_check"],
        reason=row["reason"], report_hash=row["report_hash"],
        report=json.loads(report) if report else None, decided_at=row["decided_at"],
        tx_hash=row["tx_hash"], reported_at=row["reported_at"], note=row["note"],
    )


@dataclass(frozen=True)
class Revalidation:
    """One row of ``revalidations``: one re-challenge of an approved node."""

    id: str
    registration_id: str
    node: str
    run_id: int
    state: str
    started_at: float
    deadline_at: float
    attempts: int
    next_attempt_at: float
    last_error: str | None
    last_kind: str | None
    miner_url: str | None
    challenge_id: str | None
    passed: bool | None
    failed_check: str | None
    reason: str | None
    report_hash: str | None
    report: dict[str, Any] | None
    decided_at: float | None
    tx_hash: str | None
    reported_at: float | None
    note: str | None

    @property
    def result(self) -> str:
        """passed | failed | pending | skipped | superseded."""
        if self.state in (PENDING, SKIPPED, SUPERSEDED, PASSED):
            return self.state
        return "failed"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "registration_id": self.registration_id, "node": self.node, "run_id": self.run_id,
            "state": self.state, "result": self.result, "passed": self.passed, "failed_check": self.failed_check,
            "reason": self.reason, "report_hash": self.report_hash, "report": self.report, "tx_hash": self.tx_hash,
            "miner_url": self.miner_url, "challenge_id": self.challenge_id, "attempts": self.attempts,
            "last_error": self.last_error, "started_at": self.started_at, "decided_at": self.decided_at,
            "reported_at": self.reported_at, "note": self.note,
        }


def _revalidation(row: sqlite3.Row) -> Revalidation:
    passed = row["passed"]
    report = row["report_json"]
    return Revalidation(
        id=row["id"], registration_id=row["registration_id"], node=row["node"], run_id=int(row["run_id"]),
        state=row["state"], started_at=float(row["started_at"]), deadline_at=float(row["deadline_at"]),
        attempts=int(row["attempts"]), next_attempt_at=float(row["next_attempt_at"]), last_error=row["last_error"],
        last_kind=row["last_kind"], miner_url=row["miner_url"], challenge_id=row["challenge_id"],
        passed=None if passed is None else bool(passed), failed_check=row["failed_check"], reason=row["reason"],
        report_hash=row["report_hash"], report=json.loads(report) if report else None, decided_at=row["decided_at"],
        tx_hash=row["tx_hash"], reported_at=row["reported_at"], note=row["note"],
    )
