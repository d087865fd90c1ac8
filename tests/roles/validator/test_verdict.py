"""Verdicts name the failed check, hash their report canonically, and retries back off."""

from __future__ import annotations

import json

from eth_utils import keccak

from prime.challenge.params import plan_challenge
from prime.challenge.runner import build_report
from prime.roles.validator.verdict import (
    APPROVED_REASON,
    Verdict,
    from_challenge,
    gave_up,
    give_up_now,
    retry_delay,
    too_slow,
)

CPU = {"gpu_count": 0, "ram_mib": 4096}


def plan():
    return plan_challenge(CPU, {"id": "c1", "seed": 7, "n": 16, "bound_s": 2.0})


def test_passed_challenge_is_approved_with_the_runners_report_hash() -> None:
    report = build_report(plan(), checks={"response": None, "merkle": None, "entries": None, "time": None}, elapsed_s=0.1)
    verdict = from_challenge(report)
    assert verdict.approved and verdict.check is None and verdict.reason == APPROVED_REASON
    assert verdict.result == "approved" and verdict.challenge_id == "c1"
    # The on-chain hash is the one the challenge module defines for its report.
    assert verdict.report_hash == report.report_hash()


def test_failed_challenge_names_the_first_failed_check() -> None:
    checks = {"response": None, "merkle": "row 3 does not match", "entries": "C[1, 2] is wrong", "time": None}
    verdict = from_challenge(build_report(plan(), checks=checks, elapsed_s=0.1))
    assert not verdict.approved and verdict.check == "merkle" and verdict.result == "rejected"
    assert verdict.reason == "merkle check failed: row 3 does not match"


def test_a_miner_that_never_commits_fails_the_time_check() -> None:
    verdict = too_slow(plan(), 12.5, "timed out")
    assert verdict.check == "time" and verdict.reason.startswith("time check failed: ")
    assert "12.500 s" in verdict.reason and "2.000 s" in verdict.reason
    assert verdict.report["elapsed_s"] == 12.5 and verdict.report["approved"] is False


def test_giving_up_is_unreachable_with_a_hashable_report() -> None:
    verdict = gave_up("0xabc", 4, kind="unreachable", detail="no answer from http://10.0.0.1:9", attempts=5,
                      first_seen=100.0, deadline=700.0)
    assert verdict.result == "unreachable" and verdict.reason == "unreachable: no answer from http://10.0.0.1:9"
    assert verdict.report["reason"] == "unreachable" and verdict.report["attempts"] == 5
    canonical = json.dumps(verdict.report, sort_keys=True, separators=(",", ":")).encode()
    assert verdict.report_hash == keccak(canonical)
    busy = gave_up("0xabc", 4, kind="response", detail="409 busy", attempts=3, first_seen=0.0, deadline=1.0)
    assert busy.check == "response" and busy.result == "rejected" and busy.reason.startswith("response check failed")


def test_different_outcomes_hash_differently() -> None:
    a = gave_up("0xabc", 1, kind="unreachable", detail="x", attempts=1, first_seen=0.0, deadline=1.0)
    b = gave_up("0xabd", 1, kind="unreachable", detail="x", attempts=1, first_seen=0.0, deadline=1.0)
    assert a.report_hash != b.report_hash
    assert Verdict(True, None, "ok", {"a": 1}).report_hash == Verdict(True, None, "ok", {"a": 1}).report_hash


def test_retry_delay_doubles_up_to_the_cap() -> None:
    assert [retry_delay(n, base_s=1.0, max_s=10.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert retry_delay(10_000, base_s=1.0, max_s=60.0) == 60.0
    assert retry_delay(0, base_s=2.0, max_s=60.0) == 2.0


def test_only_an_attempt_after_the_deadline_gives_up() -> None:
    assert not give_up_now(99.9, 100.0)
    assert give_up_now(100.0, 100.0)


def test_an_answer_that_cannot_be_read_is_a_rejection_naming_it() -> None:
    """Issue 11: what reading a miner's answer raises (OverflowError, RecursionError, a decode
    error) is the miner's failure, judged at once, not an error of the validator's."""
    from prime.challenge.params import plan_challenge
    from prime.roles.validator.verdict import UNREADABLE_ANSWER, unreadable

    plan = plan_challenge({"gpu_count": 0, "ram_mib": 4096}, {"n": 64})
    for exc in (OverflowError("int too large to convert to float"), RecursionError("deep"), ValueError("bad")):
        assert isinstance(exc, UNREADABLE_ANSWER)
        verdict = unreadable(plan, 0.5, exc)
        assert not verdict.approved and verdict.check == "response" and verdict.result == "rejected"
        assert verdict.reason.startswith("response check failed: the miner's answer could not be read")
        assert type(exc).__name__ in verdict.reason and verdict.report["checks"]["response"]
