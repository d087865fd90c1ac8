"""The validator service: follow new nodes on chain, challenge each, write the verdict on chain.

Two background loops (both visible in ``/health``):
- ``follow``: NodeRegistered events from the saved cursor (prime.chain.events.EventFollower);
  each batch is written to the store together with the cursor, in one transaction.
- ``dispatch``: starts due validations as tasks, at most ``concurrency`` at a time. One
  attempt = chain check → address from discovery → reachability probe → challenge
  (prime.challenge.runner) → verdict → reportValidation → verdict to the miner (best effort).
  A node that cannot be challenged yet gives its slot back and is retried later with
  backoff, so a slow or absent miner never holds up the rest; after its deadline a failed
  attempt is a rejection ("unreachable").
- ``revalidate`` (unless ``revalidate_every_s`` is 0): active nodes re-challenged at random
  times, a failure ejected and slashed on chain (prime.roles.validator.revalidate).

Nodes sharing an announced IP or a GPU UUID are challenged at the same moment
(prime.roles.validator.grouping); one GPU UUID is accepted on one active node only
(prime.roles.validator.uniqueness).

``/metrics`` counts verdicts by result (approved, rejected, unreachable), failed attempts by
kind, mined reports, and open and running validations.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from eth_account.signers.local import LocalAccount
from prometheus_client import CollectorRegistry, Counter, Gauge
from yarl import URL

from prime.auth.client import (
    DEFAULT_MAX_RESPONSE_BYTES,
    ReplyTooLarge,
    SignedClient,
    read_bounded,
)
from prime.auth.signing import Domain
from prime.auth.transport import AiohttpTransport, Timeout, Transport, TransportError
from prime.chain.client import RegistryClient, RevertError
from prime.chain.events import EventFollower
from prime.chain.types import ChainEvent, NodeInfo, NodeStatus, RunInfo
from prime.challenge.params import ChallengePlan, claim_problem, plan_challenge
from prime.challenge.runner import run_challenge
from prime.clients.discovery import DiscoveryClient
from prime.errors import ChainError, PeerError, PrimeError
from prime.protocol.challenge import MAX_REASON_LENGTH, VerdictNote
from prime.roles.validator.grouping import JointStart
from prime.roles.validator.store import (
    DECIDED,
    SUPERSEDED,
    Registration,
    Validation,
    ValidatorStore,
)
from prime.roles.validator.uniqueness import UuidGuard
from prime.roles.validator.verdict import (
    UNREACHABLE,
    UNREADABLE_ANSWER,
    Failure,
    Verdict,
    from_challenge,
    gave_up,
    give_up_now,
    refused_claim,
    retry_delay,
    too_slow,
    unreadable,
)
from prime.web import METRICS, add_loop, make_app

log = logging.getLogger("prime.validator")

EVENT = "NodeRegistered"
RESULTS = ("approved", "rejected", "unreachable")
# However small the time bound, wait at least this long for a commitment before calling the
# miner too slow: a late answer is still measured and reported with its real time.
MIN_COMMIT_GRACE_S = 10.0
RUN_INFO_TTL_S = 60.0
VERDICT_ANSWER_LIMIT = 4096  # bytes of the miner's {"ok": true} (or error) to a verdict note


@dataclass(frozen=True)
class ValidatorSettings:
    """How the validator works; every field has a CLI option or a sensible fixed value."""

    poll_interval_s: float = 2.0
    concurrency: int = 8
    unreachable_after_s: float = 900.0  # from first sight of a registration to rejection as unreachable
    challenge_n: int | None = None  # matrix size; None: planned from the claimed specs
    challenge_timeout_s: float | None = None  # the time bound; None: from the claimed specs
    from_block: int | None = None  # where to start when no cursor is saved (default: deployment block)
    open_timeout_s: float = 30.0
    probe_timeout_s: float = 5.0
    peer_timeout_s: float = 5.0
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    chain_retry_s: float = 5.0
    revalidate_every_s: float = 6 * 3600.0  # mean time between re-challenges of an active node; 0: never
    joint_settle_s: float = 1.0  # a joint challenge starts this long after its group's latest member is ready
    joint_max_wait_s: float = 5.0  # ... and never later than this after its first; 0 settle: no grouping

    def challenge_overrides(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if self.challenge_n is not None:
            overrides["n"] = self.challenge_n
        if self.challenge_timeout_s is not None:
            overrides["bound_s"] = self.challenge_timeout_s
        return overrides

    @property
    def max_retry_delay_s(self) -> float:
        # At least four tries before the deadline, however short it is.
        return max(self.retry_base_s, min(self.retry_max_s, self.unreachable_after_s / 4))


def fixed_overrides(plan: ChallengePlan) -> dict[str, Any]:
    """Overrides that make ``plan_challenge`` (inside the runner) reproduce ``plan`` exactly."""
    p = plan.params
    return {"id": p.id, "seed": p.seed, "n": p.n, "dtype": p.dtype, "repeat": p.repeat, "k": plan.k,
            "m": plan.m, "bound_s": plan.bound_s}


def opened_rows_limit(plan: ChallengePlan) -> int:
    """The most bytes a miner's answer to this challenge may have: its ``k`` opened rows of ``n``
    numbers (32 bytes each is more than any encoding of one needs) with their Merkle paths."""
    n = plan.params.n
    return DEFAULT_MAX_RESPONSE_BYTES + plan.k * (32 * n + 128 * max(1, n.bit_length()))


class ValidatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.challenges = Counter("prime_validator_challenges", "Verdicts decided, by result.", ["result"], registry=registry)
        for result in RESULTS:
            self.challenges.labels(result)
        self.failed_attempts = Counter(
            "prime_validator_failed_attempts", "Attempts that could not challenge the node, by kind.", ["kind"], registry=registry)
        self.reports = Counter("prime_validator_reports", "reportValidation transactions mined.", registry=registry)
        self.skipped = Counter("prime_validator_skipped", "Registrations no longer awaiting validation when their turn came.", registry=registry)
        self.open = Gauge("prime_validator_open_validations", "Registrations not reported on chain yet.", registry=registry)
        self.running = Gauge("prime_validator_running_validations", "Validations being worked on right now.", registry=registry)


class ValidatorService:
    """The validator's loops and their state; ``build_app()`` gives the aiohttp app that runs them."""

    def __init__(self, registry: RegistryClient, account: LocalAccount, store: ValidatorStore,
                 settings: ValidatorSettings | None = None, *, clock=time.time, transport: Transport | None = None) -> None:
        self.registry = registry
        self.account = account
        self.domain = Domain(registry.chain_id, registry.address)  # what its signed requests are addressed within
        self.store = store
        self.settings = settings or ValidatorSettings()
        self.clock = clock
        self.transport = transport  # None: real sockets; tests may pass an InProcessTransport (theirs to close)
        self.follower = EventFollower(registry, [EVENT], cursor_get=store.cursor, cursor_set=self._save_batch,
                                      start_block=self.settings.from_block)
        self.metrics: ValidatorMetrics | None = None
        self._staged: list[Registration] = []
        self._running: dict[str, asyncio.Task[None]] = {}
        self._busy_nodes: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._runs: dict[int, tuple[float, RunInfo]] = {}
        self._peers: SignedClient | None = None
        self._probe: AiohttpTransport | None = None  # unsigned GET /health, when no transport is given
        self.joint = JointStart(settle_s=self.settings.joint_settle_s, max_wait_s=self.settings.joint_max_wait_s)
        self.uuids = UuidGuard(store, registry, clock=clock)

    # -- the app -----------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = make_app(name="validator")
        self.metrics = ValidatorMetrics(app[METRICS])
        # Registered before the loops: cleaned up after them (aiohttp unwinds in reverse).
        app.cleanup_ctx.append(self._lifecycle)
        add_loop(app, "follow", self.follow_once, interval_s=self.settings.poll_interval_s)
        add_loop(app, "dispatch", self.dispatch_once, interval_s=0.1)
        if self.settings.revalidate_every_s > 0:  # re-challenges of active nodes (prime.roles.validator.revalidate)
            from prime.roles.validator.revalidate import Revalidator

            Revalidator(self, mean_s=self.settings.revalidate_every_s).install(app)
        return app

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        self._wake = asyncio.Event()
        self.store.retry_all_now(self.clock())
        self._peers = SignedClient(self.account, domain=self.domain, timeout_s=self.settings.peer_timeout_s, retries=2,
                                   transport=self.transport)
        self._probe = AiohttpTransport() if self.transport is None else None
        yield
        await self.stop_running()
        await self._peers.close()
        if self._probe is not None:
            await self._probe.close()

    async def stop_running(self) -> None:
        """Cancel validations in flight; their rows stay open and resume after a restart."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._running.clear()
        self._busy_nodes.clear()

    # -- following the chain -----------------------------------------------------------------

    def _stage(self, events: list[ChainEvent]) -> None:
        self._staged = [
            Registration(node=e.args["node"], run_id=int(e.args["runId"]), block=e.block, log_index=e.log_index,
                         tx_hash=e.tx_hash)
            for e in events
        ]

    def _save_batch(self, next_block: int) -> None:
        # The follower calls this once a batch is handled: the batch's registrations and the
        # cursor past it go to SQLite in one transaction (a crash keeps both or neither).
        staged, self._staged = self._staged, []
        added = self.store.enqueue(staged, next_block, now=self.clock(), deadline_s=self.settings.unreachable_after_s)
        if added:
            log.info("%d new node registration(s) to validate", added)
            self._poke()

    async def follow_once(self) -> None:
        """Read NodeRegistered events until caught up with the chain head."""
        for _ in range(100):  # bounded, so /health ticks even while far behind
            self._staged = []
            await self.follower.poll_once(self._stage)
            if self.follower.caught_up:
                break

    # -- dispatching validations -------------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def dispatch_once(self) -> None:
        """Start every due validation there is a free slot for, then wait for work."""
        self.start_due()
        if self.metrics is not None:
            self.metrics.open.set(self.store.count_open())
            self.metrics.running.set(len(self._running))
        next_due = None
        if len(self._running) < self.settings.concurrency:  # else only a finished task (a poke) frees a slot
            next_due = self.store.next_due_at(exclude=self._running.keys())
        wait_s = 1.0 if next_due is None else min(1.0, max(0.01, next_due - self.clock()))
        if self._wake is None:
            await asyncio.sleep(wait_s)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
        self._wake.clear()

    def start_due(self) -> int:
        free = self.settings.concurrency - len(self._running)
        if free <= 0:
            return 0
        started = 0
        for validation in self.store.due(self.clock(), free, exclude=self._running.keys()):
            if validation.node in self._busy_nodes:
                continue  # an older registration of the same node is being worked on: one challenge at a time
            task = asyncio.create_task(self.work(validation), name=f"validate {validation.node}")
            self._running[validation.id] = task
            self._busy_nodes.add(validation.node)
            task.add_done_callback(functools.partial(self._finished, validation.id, validation.node))
            started += 1
        return started

    def _finished(self, validation_id: str, node: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(validation_id, None)
        self._busy_nodes.discard(node)
        self._poke()

    async def work(self, validation: Validation) -> None:
        """One turn of one due validation: send a decided verdict, or make an attempt."""
        try:
            if validation.state == DECIDED:
                await self.submit(validation)
            else:
                await self.attempt(validation)
        except asyncio.CancelledError:
            raise
        except ChainError as exc:
            # Our chain connection failed, not the node: no attempt is counted against it.
            log.warning("validation of %s waits for the chain: %s", validation.node, exc)
            self.store.defer(validation.id, error=str(exc), retry_at=self.clock() + self.settings.chain_retry_s)
        except Exception as exc:  # a bug must not kill the loop nor spin on one row
            log.exception("validation of %s failed unexpectedly", validation.node)
            self.store.defer(validation.id, error=f"{type(exc).__name__}: {exc}",
                             retry_at=self.clock() + self.settings.chain_retry_s)

    # -- one attempt -------------------------------------------------------------------------

    async def attempt(self, validation: Validation) -> None:
        node = await self.registry.get_node(validation.node)
        if node.status != NodeStatus.REGISTERED or node.run_id != validation.run_id:
            note = f"not awaiting validation when its turn came: the node is {node.status.label} (run {node.run_id})"
            self.store.skip(validation.id, note=note, now=self.clock())
            if self.metrics:
                self.metrics.skipped.inc()
            log.info("skipping %s: %s", validation.node, note)
            return
        run = await self._run_info(validation.run_id)
        outcome, url = await self.challenge(validation, node, run)
        now = self.clock()
        if isinstance(outcome, Failure):
            if self.metrics:
                self.metrics.failed_attempts.labels(outcome.kind).inc()
            if not give_up_now(now, validation.deadline_at):
                delay = retry_delay(validation.attempts + 1, base_s=self.settings.retry_base_s,
                                    max_s=self.settings.max_retry_delay_s)
                self.store.failed_attempt(validation.id, kind=outcome.kind, error=outcome.detail, retry_at=now + delay,
                                          miner_url=url)
                log.info("cannot challenge %s yet (%s); retrying in %.1f s", validation.node, outcome.detail, delay)
                return
            outcome = gave_up(validation.node, validation.run_id, kind=outcome.kind, detail=outcome.detail,
                              attempts=validation.attempts + 1, first_seen=validation.seen_at,
                              deadline=validation.deadline_at)
        if self.store.decide(validation.id, outcome, now=now, miner_url=url):
            if self.metrics:
                self.metrics.challenges.labels(outcome.result).inc()
            log.info("node %s %s: %s", validation.node, "approved" if outcome.approved else "rejected", outcome.reason)
        decided = self.store.get(validation.id)
        if decided is not None and decided.state == DECIDED:
            await self.submit(decided)

    async def _run_info(self, run_id: int) -> RunInfo:
        cached = self._runs.get(run_id)
        now = time.monotonic()
        if cached is not None and now - cached[0] < RUN_INFO_TTL_S:
            return cached[1]
        run = await self.registry.get_run(run_id)
        self._runs[run_id] = (now, run)
        return run

    async def _reachable(self, url: str) -> str | None:
        """None when anything answers HTTP at ``url`` (any status), else why not."""
        transport = self.transport or self._probe
        assert transport is not None
        try:
            answer = await transport.send("GET", URL(f"{url}/health"), {}, b"", Timeout(total=self.settings.probe_timeout_s))
            try:
                await read_bounded(answer, 64 * 1024)
            finally:
                answer.release()
        except ReplyTooLarge:
            return None  # it answered
        except TransportError as exc:
            return f"no answer from {url} ({exc.reason})"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return f"no answer from {url} ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
        return None

    async def challenge(self, validation: Validation, node: NodeInfo, run: RunInfo) -> tuple[Verdict | Failure, str | None]:
        """Find the node and challenge it: a verdict, or why it could not be challenged now."""
        assert self._peers is not None
        claim = claim_problem(node.specs)  # a claim the table (or its RAM) refuses is rejected before any challenge
        if claim is not None:
            return refused_claim(validation.node, validation.run_id, node.specs, claim), None
        try:
            address = await DiscoveryClient(self._peers, run.discovery_uri).get_node(validation.node)
        except PeerError as exc:
            return Failure(UNREACHABLE, f"discovery at {run.discovery_uri} could not be asked for its address ({exc})"), None
        if address is None:
            return Failure(UNREACHABLE, f"the node has not announced its address to discovery at {run.discovery_uri}"), None
        url = address.url
        problem = await self._reachable(url)
        if problem is not None:
            return Failure(UNREACHABLE, problem), url
        plan = plan_challenge(node.specs, self.settings.challenge_overrides())
        await self.joint.wait_turn(address.ip, self.store.gpu_uuids_of(validation.node), label=validation.node)
        commit_limit_s = plan.bound_s + max(MIN_COMMIT_GRACE_S, plan.bound_s)
        started = time.monotonic()
        try:
            # No client-side retries: a resent POST /challenge would only meet the first one (409).
            async with SignedClient(self.account, domain=self.domain, timeout_s=commit_limit_s, retries=0,
                                    max_response_bytes=opened_rows_limit(plan), transport=self.transport) as client:
                report = await asyncio.wait_for(
                    run_challenge(client, url, node=validation.node, specs=node.specs, params_overrides=fixed_overrides(plan)),
                    timeout=2 * commit_limit_s + self.settings.open_timeout_s,
                )
        except (TimeoutError, PeerError) as exc:
            elapsed = time.monotonic() - started
            detail = str(exc) or "timed out"
            if elapsed > plan.bound_s:
                # It answered the probe, took the challenge and then gave nothing in time.
                return too_slow(plan, elapsed, detail), url
            if isinstance(exc, PeerError) and exc.status is not None:
                return Failure("response", detail), url  # busy (409) or a server error
            return Failure(UNREACHABLE, detail), url
        except UNREADABLE_ANSWER as exc:
            # Whatever escapes reading the miner's answers (a number out of range, malformed or
            # too deep JSON) is the miner's failure, judged now; never an error of ours, which
            # would only defer the node and retry it for ever (issue 11).
            log.warning("the answer of %s could not be read: %s: %s", validation.node, type(exc).__name__, exc)
            return unreadable(plan, time.monotonic() - started, exc), url
        return from_challenge(await self.uuids.check(validation, node.specs, report)), url

    # -- reporting ---------------------------------------------------------------------------

    async def submit(self, validation: Validation) -> None:
        """reportValidation for a decided row, then tell the miner (best effort)."""
        assert validation.report_hash is not None and validation.approved is not None
        report_hash = bytes.fromhex(validation.report_hash.removeprefix("0x"))
        try:
            tx = await self.registry.report_validation(validation.node, validation.approved, report_hash)
        except RevertError as exc:
            if exc.error_name != "NotAwaitingValidation":
                raise
            info = await self.registry.get_node(validation.node)
            if info.report_hash == report_hash:
                note = "this verdict was already on chain (sent before a restart)"
                self.store.reported(validation.id, tx_hash=None, now=self.clock(), note=note)
            else:
                note = f"another validator decided first: the node is {info.status.label} on chain"
                self.store.reported(validation.id, tx_hash=None, now=self.clock(), state=SUPERSEDED, note=note)
            log.info("node %s: %s", validation.node, note)
            return
        self.store.reported(validation.id, tx_hash=tx.tx_hash, now=self.clock())
        if self.metrics:
            self.metrics.reports.inc()
        log.info("reported node %s %s on chain in %s", validation.node,
                 "approved" if validation.approved else "rejected", tx.tx_hash)
        await self.send_verdict(validation)

    async def send_verdict(self, validation: Validation) -> None:
        """POST /challenge/{id}/verdict so the miner can show why; failures only get logged."""
        if not validation.miner_url or not validation.challenge_id or self._peers is None:
            return
        body = VerdictNote(bool(validation.approved), (validation.reason or "")[:MAX_REASON_LENGTH],
                           validation.report_hash or "").to_json()
        url = f"{validation.miner_url}/challenge/{validation.challenge_id}/verdict"
        try:
            await asyncio.wait_for(self._peers.request("POST", url, audience=validation.node, json=body,
                                                       max_response_bytes=VERDICT_ANSWER_LIMIT),
                                   timeout=4 * self.settings.peer_timeout_s)
        except (TimeoutError, PeerError) as exc:
            log.info("could not tell %s its verdict: %s", validation.node, exc or "timed out")


# -- running it ----------------------------------------------------------------------------------

ROLE = "validator"


async def serve(*, rpc_url: str, deployment_path: Path, account: LocalAccount, data_dir: Path, host: str,
                port: int, settings: ValidatorSettings, stop: asyncio.Event | None = None) -> None:
    """Run the validator until SIGTERM/SIGINT (or ``stop``); refuses to start without VALIDATOR_ROLE."""
    from prime.chain.deploy import Deployment
    from prime.roles.process import open_data_dir, serve_until_stopped

    deployment = Deployment.load(deployment_path)
    registry = await RegistryClient.connect(rpc_url, deployment, account)
    try:
        if not await registry.is_validator(account.address):
            raise PrimeError(
                f"The key {account.address} does not have the validator role on the registry {registry.address}; "
                "ask the registry admin to run `prime chain grant-validator` for it, or use a validator key."
            )
        # One validator per data directory: two would challenge the same nodes twice.
        with open_data_dir(data_dir, ROLE) as data:
            store = _open_store(data.path)
            try:
                service = ValidatorService(registry, account, store, settings)

                def listening(bound: int) -> None:
                    log.info("validator %s listening on http://%s:%d (data in %s, %d open validation(s))",
                             account.address, host, bound, data.path, store.count_open())

                await serve_until_stopped(service.build_app(), host=host, port=port, on_listening=listening, stop=stop)
                log.info("validator stopped")
            finally:
                store.close()
    finally:
        await registry.close()


def _open_store(data_dir: Path) -> ValidatorStore:
    try:
        return ValidatorStore.open(data_dir)
    except OSError as exc:
        raise PrimeError(f"Cannot use data directory {data_dir} ({exc.strerror or exc}); pass a writable --data-dir.") from None
