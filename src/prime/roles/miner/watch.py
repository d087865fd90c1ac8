"""Following the node's own status on chain: what to tell the operator, and when to stop.

Registered → (validator) → Approved → (invite, joinRun) → Active. A rejection ends the
miner with the reason: the validator's own words when it sent a verdict (POST
/challenge/{id}/verdict), else what the chain says. Leaving or being ejected ends it too.
``describe`` and ``outcome`` are pure; ``ChainWatch.step`` is the loop body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prime.chain.types import NodeInfo, NodeStatus
from prime.errors import PrimeError
from prime.roles.miner.state import MinerState

log = logging.getLogger(__name__)


def describe(info: NodeInfo, run_id: int, state: MinerState) -> str:
    """One status line for the operator."""
    status = info.status
    if status == NodeStatus.REGISTERED:
        return f"Registered for run {run_id}; waiting for a validator to challenge and approve the node."
    if status == NodeStatus.APPROVED:
        return f"Approved for run {run_id}; waiting for an invite from a master of the run."
    if status == NodeStatus.ACTIVE:
        if state.master_url:
            return f"Active in run {run_id}; heartbeating to the master at {state.master_url}."
        return f"Active in run {run_id} but no master is known locally; waiting for a master to invite the node again."
    if status == NodeStatus.RELEASED and info.run_id == run_id:
        return (f"Run {run_id} ended on chain: the node is released and idle (its stake is withdrawable now: "
                "prime miner withdraw); the master stops its tasks and takes their final files, and this miner keeps "
                "serving their files and logs until you stop it.")
    return f"Node status on chain: {status.label} (run {info.run_id})."


def rejection_reason(info: NodeInfo, state: MinerState) -> str:
    verdict = state.verdict
    report = "0x" + info.report_hash.hex()
    if verdict is not None and not verdict.approved and (verdict.report_hash.lower() == report or not any(info.report_hash)):
        return f"validator {verdict.validator} rejected it: {verdict.reason.rstrip('.')} (report {report})"
    if verdict is not None and not verdict.approved:
        return f"validator {verdict.validator} said: {verdict.reason.rstrip('.')} (on-chain report {report})"
    return f"the chain records status rejected with report {report} and no validator sent a reason"


def outcome(info: NodeInfo, run_id: int, state: MinerState, *, verdict_wait_over: bool) -> PrimeError | None:
    """The error that ends the miner for this chain status, or None to keep going.

    For a rejection without a verdict yet, None until ``verdict_wait_over`` (a validator
    sends its verdict right after writing it on chain).
    """
    status = info.status
    node = info.node
    if status == NodeStatus.REJECTED and info.run_id == run_id:
        if state.verdict is None and not verdict_wait_over:
            return None
        return PrimeError(
            f"Node {node} was rejected for run {run_id}: {rejection_reason(info, state)}; fix the node, withdraw the stake and register again."
        )
    if status == NodeStatus.EJECTED:
        return PrimeError(f"Node {node} was ejected from run {info.run_id} by a master; its stake can now be withdrawn with the provider key.")
    if status == NodeStatus.LEFT:
        return PrimeError(f"Node {node} has left run {info.run_id}; its stake can now be withdrawn with the provider key.")
    if status == NodeStatus.NONE:
        return PrimeError(f"Node {node} is no longer registered on chain; start the miner again to register it.")
    if info.run_id != run_id:
        return PrimeError(f"Node {node} is now registered for run {info.run_id}, not run {run_id}; start the miner with --run-id {info.run_id}.")
    return None


@dataclass
class WatchResult:
    info: NodeInfo
    changed: bool


class ChainWatch:
    """Polls the node's record; reports changes and, once, the error that ends the miner."""

    def __init__(
        self,
        registry: Any,
        node: str,
        run_id: int,
        state: MinerState,
        *,
        on_change: Callable[[NodeInfo, str], None],
        on_outcome: Callable[[PrimeError], None],
        verdict_grace_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.node = node
        self.run_id = run_id
        self.state = state
        self.on_change = on_change
        self.on_outcome = on_outcome
        self.verdict_grace_s = verdict_grace_s
        self.clock = clock
        self.last: NodeInfo | None = None
        self._rejected_seen_at: float | None = None
        self.error: PrimeError | None = None  # the outcome that ends the miner, once there is one

    async def step(self) -> WatchResult | None:
        if self.error is not None:
            return None
        info = await self.registry.get_node(self.node)
        changed = self.last is None or (info.status, info.run_id) != (self.last.status, self.last.run_id)
        self.last = info
        if changed:
            self.on_change(info, describe(info, self.run_id, self.state))
        if info.status == NodeStatus.REJECTED and self._rejected_seen_at is None:
            self._rejected_seen_at = self.clock()
        wait_over = self._rejected_seen_at is not None and self.clock() - self._rejected_seen_at >= self.verdict_grace_s
        error = outcome(info, self.run_id, self.state, verdict_wait_over=wait_over)
        if error is not None:
            self.error = error
            self.on_outcome(error)
        return WatchResult(info, changed)
