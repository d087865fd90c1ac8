"""What the validator decides about one node, and when it tries again: pure logic, no I/O.

A ``Verdict`` is approve/reject plus the report whose keccak hash goes on chain. Its reason
always names the check that failed (``"entries check failed: ..."``, ``"unreachable: ..."``)
so an operator, the miner and a test can tell a cheater from a slow or absent node.

A node that cannot be challenged yet (not announced, connection refused, busy, 5xx) is
retried with exponential backoff; only when an attempt fails after its deadline is it
rejected, with the kind of its last failure as the failed check.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from eth_utils import keccak

from prime.challenge.params import ChallengePlan
from prime.challenge.runner import ChallengeReport, build_report

APPROVED_REASON = "all checks passed"
UNREACHABLE = "unreachable"
# Kinds of a failed attempt: the node could not be reached at all, or it answered but could
# not take the challenge (busy with another one, a server error on its side).
FAILURE_KINDS = (UNREACHABLE, "response")


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces: the bytes whose keccak is the on-chain report hash."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def report_hash(data: Mapping[str, Any]) -> bytes:
    return keccak(canonical_json(data))


@dataclass(frozen=True)
class Verdict:
    """Approve or reject, the failed check (None when approved), one reason, the report."""

    approved: bool
    check: str | None
    reason: str
    report: dict[str, Any]
    challenge_id: str | None = None

    @property
    def report_hash(self) -> bytes:
        return report_hash(self.report)

    @property
    def result(self) -> str:
        """approved | rejected | unreachable (the label of the challenges metric)."""
        if self.approved:
            return "approved"
        return UNREACHABLE if self.check == UNREACHABLE else "rejected"


def failed_check(report: ChallengeReport) -> str | None:
    """The first check (in the runner's order) that failed, None if all passed."""
    for name, problem in report.checks.items():
        if problem is not None:
            return name
    return None


def from_challenge(report: ChallengeReport) -> Verdict:
    """The verdict of a challenge that ran: the runner's report, its reason prefixed by the check."""
    check = failed_check(report)
    if report.approved or check is None:
        return Verdict(True, None, APPROVED_REASON, report.to_json(), report.id)
    return Verdict(False, check, f"{check} check failed: {report.reason}", report.to_json(), report.id)


def too_slow(plan: ChallengePlan, elapsed_s: float, detail: str) -> Verdict:
    """The miner took the challenge but gave no commitment within the time limit."""
    problem = (
        f"the miner gave no commitment within {elapsed_s:.3f} s, more than the {plan.bound_s:.3f} s "
        f"the claimed hardware needs ({detail})"
    )
    return from_challenge(build_report(plan, checks={"time": problem}, elapsed_s=elapsed_s))


# What reading a peer's answer can raise beyond PeerError: msgspec's errors and prime's
# ValidationError are ValueErrors; OverflowError, RecursionError and UnicodeError for numbers,
# nesting and text no message can hold.
UNREADABLE_ANSWER: tuple[type[Exception], ...] = (ValueError, OverflowError, RecursionError, UnicodeError, msgspec.DecodeError)


def unreadable(plan: ChallengePlan, elapsed_s: float, exc: BaseException) -> Verdict:
    """The miner answered something that could not be read: rejected, naming what."""
    problem = f"the miner's answer could not be read ({type(exc).__name__}: {str(exc)[:300]})"
    return from_challenge(build_report(plan, checks={"response": problem}, elapsed_s=elapsed_s))


CLAIM = "claim"  # the failed check of a claim refused before any challenge (classes.check_claim)


def refused_claim(node: str, run_id: int, specs: Any, problem: str) -> Verdict:
    """Rejected before any challenge: the claimed hardware is not one the table can hold it to."""
    fields = ("gpu_count", "gpu_model", "gpu_memory_mib", "cpu_cores", "ram_mib", "disk_gib")
    claimed = {f: (specs.get(f) if isinstance(specs, Mapping) else getattr(specs, f, None)) for f in fields}
    report = {"approved": False, "reason": CLAIM, "detail": problem, "node": node, "run_id": run_id,
              "specs": claimed}
    return Verdict(False, CLAIM, f"{CLAIM} check failed: {problem}", report)


GPU_UUID = "gpu_uuid"  # the failed check of a report whose GPU UUIDs another active node holds, or that are wrong


def gpu_uuid_problem(uuids: Sequence[str], gpu_count: int, holders: Mapping[str, str]) -> str | None:
    """Why a passing challenge's GPU UUIDs cannot be accepted, or None. Only a report that names
    UUIDs is held to this: each named once, as many as the claimed ``gpu_count``, and none in
    ``holders`` (UUID -> the other node, Approved or Active on chain, that this validator recorded it for)."""
    if not uuids:
        return None
    seen: set[str] = set()
    for uuid in uuids:
        if uuid in seen:
            return f"the commitment names GPU {uuid} twice"
        seen.add(uuid)
    if len(uuids) != gpu_count:
        return f"the commitment names {len(uuids)} GPU UUID(s) but the node claims {gpu_count} GPU(s)"
    for uuid in uuids:
        if uuid in holders:
            return (f"GPU {uuid} is already the GPU of node {holders[uuid]}, which is approved or active on chain: "
                    "one GPU is accepted on one active node only")
    return None


def with_uuid_check(report: ChallengeReport, problem: str | None) -> ChallengeReport:
    """The report with the GPU UUID rule's outcome as its last check (a failure rejects it)."""
    checks = {**report.checks, GPU_UUID: problem}
    if problem is None:
        return dataclasses.replace(report, checks=checks)
    return dataclasses.replace(report, approved=False, reason=problem, checks=checks)


def gave_up(node: str, run_id: int, *, kind: str, detail: str, attempts: int, first_seen: float,
            deadline: float) -> Verdict:
    """Rejected after the deadline because no attempt could run a challenge."""
    check = kind if kind in FAILURE_KINDS else UNREACHABLE
    report = {
        "approved": False,
        "reason": check,
        "detail": detail,
        "node": node,
        "run_id": run_id,
        "attempts": attempts,
        "first_seen": round(first_seen, 3),
        "deadline": round(deadline, 3),
    }
    if check == UNREACHABLE:
        reason = f"unreachable: {detail}"
    else:
        reason = f"{check} check failed: the node could not take a challenge before the deadline ({detail})"
    return Verdict(False, check, reason, report)


@dataclass(frozen=True)
class Failure:
    """An attempt that could not run a challenge; ``kind`` is one of FAILURE_KINDS."""

    kind: str
    detail: str


def retry_delay(attempts: int, *, base_s: float, max_s: float) -> float:
    """Seconds before attempt ``attempts + 1``: base, 2·base, 4·base, ... capped at max_s."""
    return min(max_s, base_s * 2 ** max(0, min(attempts - 1, 30)))


def give_up_now(now: float, deadline: float) -> bool:
    """After a failed attempt: reject (True) or try again later (False)."""
    return now >= deadline
