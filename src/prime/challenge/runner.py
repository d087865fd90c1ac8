"""Validator side: run one challenge against a miner and produce a signed-off report.

Flow: plan (n, dtype, repeat, k, m, time bound from the claimed specs) → POST
/challenge → measure the time to the commitment → draw k rows and m columns per row
with a CSPRNG *after* the commitment → POST /challenge/{id}/open → checks (verifier.py)
→ ChallengeReport, whose keccak hash goes on chain with approve/reject.

The miner's answers are read as bytes (never more than a well-formed answer can take)
and decoded into the messages of prime.protocol.challenge; an answer that is too long,
malformed or about another challenge is the miner's failure (a rejecting report), never
an exception of the validator's.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import msgspec

from prime.auth.client import AnswerTooLarge, ReplyTooLarge
from prime.challenge.params import ChallengeParams, ChallengePlan, plan_challenge
from prime.challenge.prover import RowOpening
from prime.challenge.verifier import (
    Draw,
    check_entries,
    check_openings,
    check_time,
    draw_samples,
    rows_to_open,
)
from prime.errors import PeerError
from prime.protocol.challenge import (
    COMMITMENT_ANSWER_LIMIT,
    CommitmentAnswer,
    OpeningAnswer,
    OpenRequest,
    decoder,
    opening_answer_limit,
)
from prime.protocol.codec import Message

CHECK_ORDER = ("response", "merkle", "entries", "time")


@dataclass
class ChallengeReport:
    """Outcome of one challenge; ``checks`` maps each check that ran to None (passed) or why it failed.

    ``gpu_uuids`` and ``driver`` are what the miner's commitment named as the GPUs that
    computed C (canonical NVML UUIDs, in its --gpu order) and their driver ({version, cuda});
    empty and None for a CPU node, an older miner, or no decodable commitment.
    """

    approved: bool
    reason: str
    id: str
    seed: int
    n: int
    dtype: str
    repeat: int
    k: int
    m: int
    elapsed_s: float
    bound_s: float
    checked_rows: int
    checked_entries: int
    root: str
    miner_elapsed_s: float | None = None
    pass_probability: float = 0.0
    checks: dict[str, str | None] = field(default_factory=dict)
    gpu_uuids: list[str] = field(default_factory=list)
    driver: dict[str, str | None] | None = None
    parts: int = 1  # one per claimed GPU: C_p = A_p·B_p, rows drawn over all of them

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("elapsed_s", "bound_s", "miner_elapsed_s"):
            if out[key] is not None:
                out[key] = round(float(out[key]), 6)
        return out

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def report_hash(self) -> bytes:
        """keccak256 of the canonical JSON (sorted keys, no spaces) — the on-chain reportHash."""
        from eth_utils.crypto import keccak

        return keccak(self.canonical_bytes())


def build_report(plan: ChallengePlan, *, checks: Mapping[str, str | None], elapsed_s: float,
                 root: str = "", miner_elapsed_s: float | None = None,
                 draws: list[Draw] | None = None, commitment: CommitmentAnswer | None = None) -> ChallengeReport:
    """Approve only if every check that ran passed; the reason is the first failure.

    ``commitment`` (the decoded answer, when there was one) gives the GPUs it named.
    """
    ordered = {name: checks[name] for name in CHECK_ORDER if name in checks}
    failures = [msg for msg in ordered.values() if msg is not None]
    draws = draws or []
    p = plan.params
    return ChallengeReport(
        approved=not failures, reason=failures[0] if failures else "all checks passed",
        id=p.id, seed=p.seed, n=p.n, dtype=p.dtype, repeat=p.repeat, k=plan.k, m=plan.m,
        elapsed_s=elapsed_s, bound_s=plan.bound_s, checked_rows=len(rows_to_open(draws)),
        checked_entries=sum(len(d.cols) for d in draws), root=root, miner_elapsed_s=miner_elapsed_s,
        pass_probability=plan.pass_probability, checks=ordered,
        parts=p.parts, gpu_uuids=list(commitment.gpu_uuids) if commitment else [],
        driver=msgspec.to_builtins(commitment.driver) if commitment and commitment.driver else None)


def read_commitment(plan: ChallengePlan, raw: bytes) -> tuple[CommitmentAnswer | None, str | None]:
    """(the decoded POST /challenge answer, None), or (None, why it is not a commitment to this challenge)."""
    try:
        answer = decoder(CommitmentAnswer).decode(raw)
    except msgspec.DecodeError as exc:
        return None, f"the commitment is malformed: {exc}"
    p = plan.params
    if answer.id != p.id:
        return None, "the commitment names a different challenge id"
    if (answer.n, answer.dtype, answer.repeat, answer.parts) != (p.n, p.dtype, p.repeat, p.parts):
        return None, (f"the commitment is for n={answer.n}, dtype={answer.dtype}, repeat={answer.repeat}, "
                      f"parts={answer.parts}, not the n={p.n}, dtype={p.dtype}, repeat={p.repeat}, "
                      f"parts={p.parts} that was asked")
    return answer, None


def read_openings(params: ChallengeParams, raw: bytes) -> tuple[dict[int, RowOpening], str | None]:
    """The opened rows by index from the POST /challenge/{id}/open answer's bytes, or why it is malformed.

    Decoding checks every type and limit; here each row must hold exactly n float32 (4·n
    bytes) and open once, and the answer must name this challenge.
    """
    try:
        answer = decoder(OpeningAnswer).decode(raw)
    except msgspec.DecodeError as exc:
        return {}, f"the opening is malformed: {exc}"
    if answer.id != params.id:
        return {}, "the opening names a different challenge id"
    openings: dict[int, RowOpening] = {}
    for row in answer.rows:
        if row.index in openings:
            return {}, f"row {row.index} was opened twice"
        try:
            openings[row.index] = RowOpening.from_wire(row, params.n)
        except ValueError as exc:
            return {}, f"malformed opening: {exc}"
    return openings, None


def evaluate_openings(plan: ChallengePlan, root: bytes, draws: list[Draw], raw: bytes,
                      elapsed_s: float) -> dict[str, str | None]:
    """All post-commitment checks on the opening answer's bytes; pure, so tests can run them without HTTP."""
    openings, problem = read_openings(plan.params, raw)
    checks: dict[str, str | None] = {"response": problem}
    if problem is None:
        p = plan.params
        checks["merkle"] = check_openings(root, p.n, rows_to_open(draws), openings, rows=p.rows, dtype=p.dtype)
        checks["entries"] = check_entries(plan.params, draws, openings)
    checks["time"] = check_time(elapsed_s, plan.bound_s)
    return checks


def _retryable(exc: PeerError) -> bool:
    """Unreachable, busy (409) or a server error: try again later rather than reject."""
    return exc.status is None or exc.status == 409 or exc.status >= 500


class ChallengeClient(Protocol):
    """What the runner needs of a client (prime.auth.client.SignedClient has it): a POST whose
    answer's bytes come back checked as signed by ``audience`` (the node's own key), at most
    ``max_response_bytes`` of them (AnswerTooLarge past that), raising PeerError for non-2xx
    answers, unsigned answers and unreachable peers."""

    async def request_bytes(self, method: str, url: str, *, audience: str, json: Any = None,
                            max_response_bytes: int | None = None) -> bytes: ...


async def _post(client: ChallengeClient, url: str, message: Message, limit: int, node: str) -> bytes:
    """POST ``message`` to ``node`` and return the answer's bytes (signed by the node); PeerError as
    the client raises it; ReplyTooLarge past ``limit``."""
    try:
        return await client.request_bytes("POST", url, audience=node, json=msgspec.to_builtins(message),
                                          max_response_bytes=limit)
    except AnswerTooLarge:
        raise ReplyTooLarge(limit) from None


async def run_challenge(client: ChallengeClient, miner_url: str, *, node: str, specs: Any,
                        params_overrides: Mapping[str, Any] | None = None,
                        rng: secrets.SystemRandom | None = None) -> ChallengeReport:
    """Challenge the miner at ``miner_url`` and return the report (approved or not).

    ``client`` is a prime.auth.client.SignedClient (anything with its ``request_bytes``, see
    ChallengeClient); ``node`` is the node's address, whose key must sign every answer (an
    answer signed by anyone else is the miner's failure). Raises PeerError only when the miner could not be asked at all
    (unreachable, busy with another challenge, 5xx): a retry later is the right answer
    then, not a rejection. Whatever the miner answers otherwise ends in a report.
    """
    plan = plan_challenge(specs, params_overrides)
    base = miner_url.rstrip("/")
    params = plan.params
    started = time.monotonic()
    commitment: CommitmentAnswer | None = None
    try:
        raw = await _post(client, f"{base}/challenge", params, COMMITMENT_ANSWER_LIMIT, node)
    except PeerError as exc:
        if _retryable(exc):
            raise
        return build_report(plan, checks={"response": f"the miner refused the challenge: {exc}"},
                            elapsed_s=time.monotonic() - started)
    except ReplyTooLarge:
        problem: str | None = f"the commitment is longer than the {COMMITMENT_ANSWER_LIMIT} bytes one can take"
    else:
        commitment, problem = read_commitment(plan, raw)
    elapsed = time.monotonic() - started
    if commitment is None:
        return build_report(plan, checks={"response": problem, "time": check_time(elapsed, plan.bound_s)},
                            elapsed_s=elapsed)
    root, claimed = commitment.root, commitment.elapsed_s
    # Drawn only now, after the miner is bound to its root.
    draws = draw_samples(params.n, plan.k, plan.m, rng, rows=params.rows)
    rows = rows_to_open(draws)
    limit = opening_answer_limit(len(rows), params.n)
    try:
        opened = await _post(client, f"{base}/challenge/{params.id}/open", OpenRequest(rows=rows), limit, node)
    except (PeerError, ReplyTooLarge) as exc:
        why = f"its answer is longer than the {limit} bytes {len(rows)} rows can take" \
            if isinstance(exc, ReplyTooLarge) else str(exc)
        checks = {"response": f"the miner failed to open its rows: {why}",
                  "time": check_time(elapsed, plan.bound_s)}
        return build_report(plan, checks=checks, elapsed_s=elapsed, root=root.hex(),
                            miner_elapsed_s=claimed, draws=draws, commitment=commitment)
    checks = evaluate_openings(plan, root, draws, opened, elapsed)
    return build_report(plan, checks=checks, elapsed_s=elapsed, root=root.hex(), miner_elapsed_s=claimed,
                        draws=draws, commitment=commitment)
