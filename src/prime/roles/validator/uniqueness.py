"""One GPU UUID on one active node: the validator's check of a passing challenge's GPU UUIDs.

A commitment names the UUIDs of the GPUs that computed it (prime.challenge.service). When a
challenge passed and its report names UUIDs, ``UuidGuard.check`` holds them to
``verdict.gpu_uuid_problem``: each named once, as many as the claimed GPUs, and none held by
another node. A node *holds* a UUID recorded for it in this validator's store while it is
Approved or Active on chain (asked at decision time, so a node that left, was rejected or
ejected frees its UUIDs), or while this validator's own approval of it is not on chain yet.
A report that passes has its UUIDs recorded for its node (replacing the node's earlier set:
a re-validation never conflicts with itself) before the verdict is stored.

Checks and records run one at a time (a lock), so two nodes reporting one UUID at the same
moment cannot both pass. The rule holds per validator, over the UUIDs in its own store; across
validators it would need the UUIDs on chain (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from prime.chain.types import NodeStatus
from prime.challenge.runner import ChallengeReport
from prime.roles.validator.store import OPEN_STATES, Validation, ValidatorStore
from prime.roles.validator.verdict import gpu_uuid_problem, with_uuid_check

HOLDING = (NodeStatus.APPROVED, NodeStatus.ACTIVE)


def claimed_gpu_count(specs: Any) -> int:
    value = specs.get("gpu_count") if isinstance(specs, Mapping) else getattr(specs, "gpu_count", 0)
    return int(value or 0)


class UuidGuard:
    """The UUID rule against this validator's store and the chain (``registry.get_node``)."""

    def __init__(self, store: ValidatorStore, registry: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self._lock = asyncio.Lock()

    async def holds(self, node: str, validation_id: str) -> bool:
        """Does ``node`` (recorded for ``validation_id``) hold its recorded UUIDs right now?"""
        info = await self.registry.get_node(node)
        if info.status in HOLDING:
            return True
        if info.status == NodeStatus.REGISTERED:  # our approval of that registration not on chain yet
            row = self.store.get(validation_id)
            return row is not None and row.state in OPEN_STATES
        return False

    async def check(self, validation: Validation, specs: Any, report: ChallengeReport) -> ChallengeReport:
        """``report`` with the UUID rule applied (a passing report naming no UUIDs is left as it is)."""
        if not report.approved or not report.gpu_uuids:
            return report
        async with self._lock:
            holders: dict[str, str] = {}
            verdicts: dict[str, bool] = {}
            for uuid, node, validation_id in self.store.gpu_uuid_records(report.gpu_uuids, exclude_node=validation.node):
                key = f"{node}|{validation_id}"
                if key not in verdicts:
                    verdicts[key] = await self.holds(node, validation_id)
                if verdicts[key]:
                    holders.setdefault(uuid, node)
            problem = gpu_uuid_problem(report.gpu_uuids, claimed_gpu_count(specs), holders)
            if problem is None:
                self.store.record_gpu_uuids(validation.node, validation.id, report.gpu_uuids, now=self.clock())
            return with_uuid_check(report, problem)
