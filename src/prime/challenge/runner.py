"""Validator side: run one challenge against a miner and produce a signed-off report.

Flow: plan (n, dtype, repeat, k, m, time bound from the claimed specs) → POST
/challenge → measure the time to the commitment → draw k rows and m columns per row
with a CSPRNG *after* the commitment → POST /challenge/{id}/open → checks (verifier.py)
→ ChallengeReport, whose keccak hash goes on chain with approve/reject.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prime.challenge.params import ChallengePlan, plan_challenge
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

_HEX32 = re.compile(r"^[0-9a-f]{64}$")
CHECK_ORDER = ("response", "merkle", "entries", "time")


@dataclass
class ChallengeReport:
    """Outcome of one challenge; ``checks`` maps each check that ran to None (passed) or why it failed."""

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
        from eth_utils import keccak

        return keccak(self.canonical_bytes())


def build_report(plan: ChallengePlan, *, checks: Mapping[str, str | None], elapsed_s: float,
                 root: str = "", miner_elapsed_s: float | None = None,
                 draws: list[Draw] | None = None) -> ChallengeReport:
    """Approve only if every check that ran passed; the reason is the first failure."""
    ordered = {name: checks[name] for name in CHECK_ORDER if name in checks}
    failures = [msg for msg in ordered.values() if msg is not None]
    draws = draws or []
    p = plan.params
    return ChallengeReport(
        approved=not failures, reason=failures[0] if failures else "all checks passed",
        id=p.id, seed=p.seed, n=p.n, dtype=p.dtype, repeat=p.repeat, k=plan.k, m=plan.m,
        elapsed_s=elapsed_s, bound_s=plan.bound_s, checked_rows=len(rows_to_open(draws)),
        checked_entries=sum(len(d.cols) for d in draws), root=root, miner_elapsed_s=miner_elapsed_s,
        pass_probability=plan.pass_probability, checks=ordered)


def parse_commitment(plan: ChallengePlan, reply: Any) -> tuple[bytes | None, float | None, str | None]:
    """(root, miner-reported seconds, problem) from the POST /challenge answer."""
    if not isinstance(reply, dict):
        return None, None, "the commitment is not a JSON object"
    if reply.get("id") != plan.params.id:
        return None, None, "the commitment names a different challenge id"
    root = reply.get("root")
    if not isinstance(root, str) or not _HEX32.match(root):
        return None, None, "the commitment has no 32-byte hex Merkle root"
    claimed = reply.get("elapsed_s")
    claimed = float(claimed) if isinstance(claimed, (int, float)) and not isinstance(claimed, bool) else None
    return bytes.fromhex(root), claimed, None


def parse_openings(reply: Any, n: int) -> tuple[dict[int, RowOpening], str | None]:
    if not isinstance(reply, dict) or not isinstance(reply.get("rows"), list):
        return {}, "the opening is not a JSON object with a 'rows' list"
    openings: dict[int, RowOpening] = {}
    for item in reply["rows"]:
        try:
            opening = RowOpening.from_json(item, n)
        except ValueError as exc:
            return {}, f"malformed opening: {exc}"
        if opening.index in openings:
            return {}, f"row {opening.index} was opened twice"
        openings[opening.index] = opening
    return openings, None


def evaluate_openings(plan: ChallengePlan, root: bytes, draws: list[Draw], open_reply: Any,
                      elapsed_s: float) -> dict[str, str | None]:
    """All post-commitment checks; pure, so tests can run them without HTTP."""
    openings, problem = parse_openings(open_reply, plan.params.n)
    checks: dict[str, str | None] = {"response": problem}
    if problem is None:
        checks["merkle"] = check_openings(root, plan.params.n, rows_to_open(draws), openings)
        checks["entries"] = check_entries(plan.params, draws, openings)
    checks["time"] = check_time(elapsed_s, plan.bound_s)
    return checks


def _retryable(exc: PeerError) -> bool:
    """Unreachable, busy (409) or a server error: try again later rather than reject."""
    return exc.status is None or exc.status == 409 or exc.status >= 500


async def run_challenge(client: Any, miner_url: str, *, specs: Any,
                        params_overrides: Mapping[str, Any] | None = None,
                        rng: secrets.SystemRandom | None = None) -> ChallengeReport:
    """Challenge the miner at ``miner_url`` and return the report (approved or not).

    ``client`` is a prime.auth.client.SignedClient (anything with an async
    ``request(method, url, json=...)``). Raises PeerError only when the miner could not
    be asked at all (unreachable, busy with another challenge, 5xx): a retry later is
    the right answer then, not a rejection.
    """
    plan = plan_challenge(specs, params_overrides)
    base = miner_url.rstrip("/")
    params = plan.params
    started = time.monotonic()
    try:
        reply = await client.request("POST", f"{base}/challenge", json=params.to_json())
    except PeerError as exc:
        if _retryable(exc):
            raise
        return build_report(plan, checks={"response": f"the miner refused the challenge: {exc}"},
                            elapsed_s=time.monotonic() - started)
    elapsed = time.monotonic() - started
    root, claimed, problem = parse_commitment(plan, reply)
    if problem is not None or root is None:
        return build_report(plan, checks={"response": problem, "time": check_time(elapsed, plan.bound_s)},
                            elapsed_s=elapsed, miner_elapsed_s=claimed)
    # Drawn only now, after the miner is bound to its root.
    draws = draw_samples(params.n, plan.k, plan.m, rng)
    try:
        opened = await client.request("POST", f"{base}/challenge/{params.id}/open",
                                      json={"rows": rows_to_open(draws)})
    except PeerError as exc:
        checks = {"response": f"the miner failed to open its rows: {exc}",
                  "time": check_time(elapsed, plan.bound_s)}
        return build_report(plan, checks=checks, elapsed_s=elapsed, root=root.hex(),
                            miner_elapsed_s=claimed, draws=draws)
    checks = evaluate_openings(plan, root, draws, opened, elapsed)
    return build_report(plan, checks=checks, elapsed_s=elapsed, root=root.hex(), miner_elapsed_s=claimed,
                        draws=draws)
