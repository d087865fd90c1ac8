"""Ejecting dead nodes on chain: a node Dead for longer than ``--eject-after`` is ejected (ejectNode).

A node the master marked Dead still counts as Active on chain: it holds a seat of the run's
``maxNodes`` and its stake stays locked. After the grace the master ejects it; the chain's
NodeEjected then comes back through the chain watcher and the record becomes Left. A node that
heartbeats again before the grace is Healthy again and no transaction is sent.

``due_ejections`` is the pure decision (state in, ejections out); ``Ejector`` is the shell that
sends the transactions, logs why and counts them (``prime_master_ejections{reason,result}``).
Only nodes this master holds are ejected (``holder``: with several masters, the one a node
belongs to decides; see ``membership.holder``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prime.chain.types import NodeStatus
from prime.errors import ChainError
from prime.protocol.nodes import NodeRecord, NodeState

log = logging.getLogger("prime.master")

# Default grace past Dead before the ejection transaction (``prime master start --eject-after``).
DEFAULT_EJECT_AFTER_S = 300.0
# A failed ejection (RPC down, out of gas money) is tried again this long after.
RETRY_AFTER_S = 30.0
# Reverts that mean the node is out of the run already (left, ejected by another, run ended):
# nothing to retry, the chain event brings the news.
ALREADY_OUT = frozenset({"NodeNotActive", "NodeNotInRun", "RunHasEnded"})


@dataclass(frozen=True)
class Ejection:
    node: str
    dead_since: float
    last_heartbeat: float | None
    reason: str  # one sentence for the log


def due_ejections(
    nodes: Iterable[NodeRecord],
    now: float,
    eject_after_s: float,
    *,
    run_ended: bool = False,
    holds: Callable[[str], bool] = lambda node: True,
    not_before: Callable[[str], float] = lambda node: 0.0,
) -> list[Ejection]:
    """The nodes to eject now: Dead for at least ``eject_after_s``, still Active on chain, held by
    this master (``holds``) and not waiting for a retry (``not_before``). Pure; sorted by address."""
    if run_ended:
        return []  # endRun released every node already
    due = []
    for rec in nodes:
        if rec.state != NodeState.DEAD or rec.chain_status != NodeStatus.ACTIVE or rec.state_since is None:
            continue
        if now - rec.state_since < eject_after_s or now < not_before(rec.address) or not holds(rec.address):
            continue
        silent = f"no heartbeat since {now - rec.last_heartbeat:.0f} s ago" if rec.last_heartbeat is not None \
            else "never heartbeated"
        reason = (f"Dead for {now - rec.state_since:.0f} s ({silent}), past the ejection grace of "
                  f"{eject_after_s:.0f} s (--eject-after)")
        due.append(Ejection(rec.address, rec.state_since, rec.last_heartbeat, reason))
    return sorted(due, key=lambda e: e.node.lower())


class Ejector:
    """Sends ``ejectNode`` for every due ejection (one at a time: they share the master's nonce)."""

    def __init__(
        self,
        registry: Any,  # a RegistryClient with the master's account
        run_id: int,
        state: Callable[[], Any],  # the MasterState
        eject_after_s: float,
        *,
        metrics: Any | None = None,  # MasterMetrics (its ``ejections`` counter), or None
        holds: Callable[[str], bool] = lambda node: True,
        clock: Callable[[], float] = time.time,
        retry_after_s: float = RETRY_AFTER_S,
    ) -> None:
        self.registry = registry
        self.run_id = run_id
        self._state = state
        self.eject_after_s = eject_after_s
        self.metrics = metrics
        self.holds = holds
        self.clock = clock
        self.retry_after_s = retry_after_s
        self._retry_at: dict[str, float] = {}
        self.sent: list[str] = []  # tx hashes, newest last (for tests and the log)

    def due(self) -> list[Ejection]:
        state = self._state()
        return due_ejections(state.nodes.values(), self.clock(), self.eject_after_s, run_ended=state.run_ended,
                             holds=self.holds, not_before=lambda node: self._retry_at.get(node, 0.0))

    async def step(self) -> int:
        """Eject every due node; returns how many ejections went through."""
        done = 0
        for ejection in self.due():
            if await self._eject(ejection):
                done += 1
        return done

    async def _eject(self, ejection: Ejection) -> bool:
        log.warning("ejecting node %s from run %d on chain: %s", ejection.node, self.run_id, ejection.reason)
        try:
            result = await self.registry.eject_node(self.run_id, ejection.node)
        except ChainError as exc:
            name = getattr(exc, "error_name", None)
            if name in ALREADY_OUT:
                self._count("already_out")
                log.info("node %s is out of run %d already (%s); nothing to eject", ejection.node, self.run_id, exc)
                self._retry_at[ejection.node] = self.clock() + self.retry_after_s  # until its chain event lands
                return False
            self._count("failed")
            log.warning("ejecting node %s failed (retry in %.0f s): %s", ejection.node, self.retry_after_s, exc)
            self._retry_at[ejection.node] = self.clock() + self.retry_after_s
            return False
        # Not again until its NodeEjected event made the record Left (or, should that never come, a retry).
        self._retry_at[ejection.node] = self.clock() + self.retry_after_s
        self._count("ejected")
        self.sent.append(result.tx_hash)
        log.warning("node %s ejected from run %d (tx %s, block %d): %s; its seat is free and its provider may "
                    "withdraw the stake", ejection.node, self.run_id, result.tx_hash, result.block, ejection.reason)
        return True

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.ejections.labels("dead", result).inc()
