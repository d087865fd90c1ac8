"""Re-validation: active nodes are challenged again at random times; a failure ejects and slashes.

Which nodes: each node's latest registration in this validator's store that was decided on
chain (approved by this validator, or by another one first) and not rejected by it
(``ValidatorStore.revalidation_candidates``); at its turn the chain is asked, and only a node
that is Active in that registration's run is challenged. An Approved node that has not joined
yet is asked again at its next turn; one that is out (Left, Ejected, Rejected, registered
again) is dropped.

When: every candidate has its own next turn, drawn independently from an exponential
distribution with mean ``revalidate_every_s`` (``--revalidate-every``) with the OS CSPRNG:
each node is re-challenged as a Poisson process, so the time since its last challenge tells
it nothing about the next one, and nodes are never re-challenged in step. Because the
exponential is memoryless, drawing again after a restart changes nothing.

How: the same path as the first validation (``ValidatorService.challenge``: discovery,
reachability probe, the same plan and verdict code). A pass is recorded in the store and
nothing is sent on chain. A failure is recorded (with its report) *before*
``reportRevalidationFailure(node, reportHash)`` is sent, which ejects the node and slashes
the registry's revalidation penalty; then the verdict note goes to the miner as after a first
validation. A node that cannot be challenged (unreachable, busy) is retried with the first
validation's backoff; an attempt that fails after ``unreachable_after_s`` from the start of the
re-validation is a failure ("unreachable"), reported on chain like any other.

One node is challenged by one validation at a time: a re-challenge and a first validation of
the same node share the service's busy set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from prime.chain.client import RevertError
from prime.chain.types import NodeStatus
from prime.errors import ChainError
from prime.roles.validator.store import DECIDED, REPORTED, SUPERSEDED, Revalidation, Validation
from prime.roles.validator.verdict import Failure, gave_up, give_up_now, retry_delay
from prime.web import METRICS, add_loop

if TYPE_CHECKING:
    from prime.roles.validator.service import ValidatorService

log = logging.getLogger("prime.validator.revalidate")

RESULTS = ("passed", "failed", "unreachable")
REFRESH_S = 2.0  # how often the store is asked for new candidates
WAITING = (NodeStatus.REGISTERED, NodeStatus.APPROVED)  # may still become active in this registration


class RevalidationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.results = Counter("prime_validator_revalidations", "Re-validations decided, by result.", ["result"],
                               registry=registry)
        for result in RESULTS:
            self.results.labels(result)
        self.reports = Counter("prime_validator_revalidation_reports",
                               "reportRevalidationFailure transactions mined.", registry=registry)


class Revalidator:
    """The ``revalidate`` loop of one ValidatorService; ``install(app)`` adds it to the app."""

    def __init__(self, service: ValidatorService, *, mean_s: float, rng: random.Random | None = None) -> None:
        if mean_s <= 0:
            raise ValueError("mean_s must be positive (0 turns re-validation off: do not install it).")
        self.service = service
        self.mean_s = mean_s
        self.rng = rng or random.SystemRandom()
        self.metrics: RevalidationMetrics | None = None
        self._rows: dict[str, Validation] = {}  # registration id -> its row
        self._due: dict[str, float] = {}  # registration id -> when its next turn is (service clock)
        self._out: set[str] = set()  # registrations whose node is out on chain: never again
        self._running: dict[str, asyncio.Task[None]] = {}
        self._refreshed_at = -REFRESH_S
        self._wake = asyncio.Event()

    def install(self, app: web.Application) -> None:
        self.metrics = RevalidationMetrics(app[METRICS])
        app.cleanup_ctx.append(self._lifecycle)  # after the service's own: unwound before it
        add_loop(app, "revalidate", self.tick, interval_s=0.05)

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        self._wake = asyncio.Event()
        yield
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._running.clear()

    def draw(self) -> float:
        """Seconds until a node's next re-challenge: exponential with mean ``mean_s``."""
        return self.rng.expovariate(1.0 / self.mean_s)

    # -- the loop ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Take new candidates from the store (a first turn drawn for each), drop the gone ones."""
        now = self.service.clock()
        rows = {row.id: row for row in self.service.store.revalidation_candidates() if row.id not in self._out}
        for ident in list(self._due):
            if ident not in rows and ident not in self._running:
                del self._due[ident]
        for ident, row in rows.items():
            if ident not in self._due and ident not in self._running:
                # A re-validation left open by a restart resumes at once; a new candidate waits its turn.
                unfinished = self.service.store.open_revalidation(ident) is not None
                self._due[ident] = now if unfinished else now + self.draw()
        self._rows = rows

    async def tick(self) -> None:
        """Start every due turn there is a free slot for, then wait for the next one (≤ 1 s)."""
        if time.monotonic() - self._refreshed_at >= REFRESH_S:
            self.refresh()
            self._refreshed_at = time.monotonic()
        now = self.service.clock()
        busy = self.service._busy_nodes
        for ident, due_at in sorted(self._due.items(), key=lambda item: item[1]):
            if len(self._running) >= self.service.settings.concurrency:
                break
            row = self._rows.get(ident)
            if due_at > now or row is None or ident in self._running or row.node in busy:
                continue
            del self._due[ident]
            busy.add(row.node)
            task = asyncio.create_task(self.turn(row), name=f"revalidate {row.node}")
            self._running[ident] = task
            task.add_done_callback(functools.partial(self._finished, ident, row.node))
        # Until the next turn, at most 1 s; a turn overdue because its node is busy waits 0.25 s.
        future = [at for at in self._due.values() if at > now]
        wait_s = min(1.0, max(0.01, min(future) - now)) if future else 1.0
        if len(future) < len(self._due):
            wait_s = min(wait_s, 0.25)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
        self._wake.clear()

    def _finished(self, ident: str, node: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(ident, None)
        self.service._busy_nodes.discard(node)
        self._wake.set()

    def _again(self, ident: str, at: float) -> None:
        self._due[ident] = at

    # -- one turn ----------------------------------------------------------------------------

    async def turn(self, row: Validation) -> None:
        """One turn of one node: send a decided failure, or check the chain and challenge it."""
        store, settings = self.service.store, self.service.settings
        open_row = store.open_revalidation(row.id)
        try:
            if open_row is not None and open_row.state == DECIDED:
                await self.submit(open_row, row)
                return
            await self.attempt(row, open_row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # our chain connection (or a bug): try again later, nothing counted
            if isinstance(exc, ChainError):
                log.warning("re-validation of %s waits for the chain: %s", row.node, exc)
            else:
                log.exception("re-validation of %s failed unexpectedly", row.node)
            retry_at = self.service.clock() + settings.chain_retry_s
            current = store.open_revalidation(row.id)
            if current is not None:
                store.defer_revalidation(current.id, error=f"{type(exc).__name__}: {exc}", retry_at=retry_at)
            self._again(row.id, retry_at)

    async def attempt(self, row: Validation, open_row: Revalidation | None) -> None:
        service, store, settings = self.service, self.service.store, self.service.settings
        info = await service.registry.get_node(row.node)
        now = service.clock()
        if info.run_id != row.run_id or info.status != NodeStatus.ACTIVE:
            if open_row is not None:
                store.skip_revalidation(open_row.id, now=now,
                                        note=f"no longer active when its turn came: the node is {info.status.label} (run {info.run_id})")
            if open_row is None and info.run_id == row.run_id and info.status in WAITING:
                self._again(row.id, now + self.draw())  # approved, not joined yet: ask again at its next turn
            else:
                self._out.add(row.id)
            return
        current = open_row or store.start_revalidation(row, now=now, deadline_s=settings.unreachable_after_s)
        run = await service._run_info(row.run_id)
        outcome, url = await service.challenge(row, info, run)
        now = service.clock()
        if isinstance(outcome, Failure):
            if not give_up_now(now, current.deadline_at):
                delay = retry_delay(current.attempts + 1, base_s=settings.retry_base_s, max_s=settings.max_retry_delay_s)
                store.revalidation_failed_attempt(current.id, kind=outcome.kind, error=outcome.detail,
                                                  retry_at=now + delay, miner_url=url)
                log.info("cannot re-challenge %s yet (%s); retrying in %.1f s", row.node, outcome.detail, delay)
                self._again(row.id, now + delay)
                return
            outcome = gave_up(row.node, row.run_id, kind=outcome.kind, detail=outcome.detail,
                              attempts=current.attempts + 1, first_seen=current.started_at, deadline=current.deadline_at)
        store.decide_revalidation(current.id, outcome, now=now, miner_url=url)
        if self.metrics:
            self.metrics.results.labels("passed" if outcome.approved else
                                        "unreachable" if outcome.result == "unreachable" else "failed").inc()
        if outcome.approved:
            log.info("node %s passed its re-validation", row.node)
            self._again(row.id, now + self.draw())
            return
        log.info("node %s failed its re-validation: %s", row.node, outcome.reason)
        decided = store.get_revalidation(current.id)
        assert decided is not None
        await self.submit(decided, row)

    async def submit(self, failed: Revalidation, row: Validation) -> None:
        """reportRevalidationFailure for a decided failure, then the verdict note to the miner."""
        service, store = self.service, self.service.store
        assert failed.report_hash is not None
        report_hash = bytes.fromhex(failed.report_hash.removeprefix("0x"))
        try:
            tx = await service.registry.report_revalidation_failure(failed.node, report_hash)
        except RevertError as exc:
            if exc.error_name != "NotRevalidatable":
                raise
            info = await service.registry.get_node(failed.node)
            if info.status == NodeStatus.EJECTED and info.report_hash == report_hash:
                note, state = "this failure was already on chain (sent before a restart)", REPORTED
            else:
                note, state = f"the node was {info.status.label} on chain before the report could land", SUPERSEDED
            store.revalidation_reported(failed.id, tx_hash=None, now=service.clock(), note=note, state=state)
            log.info("node %s: %s", failed.node, note)
            self._out.add(row.id)
            return
        store.revalidation_reported(failed.id, tx_hash=tx.tx_hash, now=service.clock())
        self._out.add(row.id)
        if self.metrics:
            self.metrics.reports.inc()
        log.info("reported the failed re-validation of %s on chain in %s: ejected and slashed", failed.node, tx.tx_hash)
        verdict = dataclasses.replace(row, approved=False, reason=failed.reason, report_hash=failed.report_hash,
                                      miner_url=failed.miner_url, challenge_id=failed.challenge_id)
        await service.send_verdict(verdict)
