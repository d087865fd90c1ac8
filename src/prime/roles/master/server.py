"""Starting the master: check the key on chain, load the state, wire the parts, serve until stopped.

Order matters: the master refuses to start unless its key is a master of the run; the state is
loaded from SQLite and fed ``MasterStarted`` (its downtime is not counted as missed heartbeats
and no invite goes out until the chain follower caught up); then the HTTP API and the loops
(chain follower, health tick, storage sync) start.

The data dir is the shared role skeleton's (``prime.roles.process``): locked for this process
(a second master on it is refused in one sentence) and marked by ``run.json`` with the run's
identity (chain id, registry, run id), so one dir never mixes runs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from prime.errors import ChainError, PrimeError

log = logging.getLogger("prime.master")


MARKER = "run.json"  # the master's marker predates role.json; older ones (without "role") are adopted
ROLE = "master"


@dataclass
class RunningMaster:
    """Handles of a started master (for ``serve`` and in-process tests/benchmarks)."""

    runner: web.AppRunner
    service: Any
    registry: Any
    peer_client: Any
    databases: list[Any]
    data: Any  # the locked DataDir
    _resources: contextlib.AsyncExitStack

    async def close(self) -> None:
        """Stop serving; close the service, the peer client and the database; free the data dir; close the chain."""
        await self._resources.aclose()


async def start_master(
    *,
    settings: Any,
    account: Any,
    rpc_url: str,
    deployment_path: Path,
    host: str,
    port: int,
) -> RunningMaster:
    """Check, load, wire and listen; the caller owns the returned handles (``close()``)."""
    import aiohttp

    from prime.auth.client import SignedClient
    from prime.auth.middleware import SignedService
    from prime.auth.permissions import ChainPermissions
    from prime.auth.replay import ReplayCache
    from prime.auth.signing import Domain
    from prime.auth.transport import AiohttpTransport
    from prime.chain.client import RegistryClient
    from prime.chain.deploy import Deployment
    from prime.chain.events import EventFollower
    from prime.clients.discovery import DiscoveryClient
    from prime.roles.master.adoption import Adoption
    from prime.roles.master.app import add_routes, new_app
    from prime.roles.master.cas import BlobStore
    from prime.roles.master.chainwatch import EVENT_NAMES, ChainWatcher
    from prime.roles.master.dispatch import TaskPusher
    from prime.roles.master.effects import NetworkEffects
    from prime.roles.master.ejection import Ejector
    from prime.roles.master.invites import InviteSender
    from prime.roles.master.locator import NodeLocator
    from prime.roles.master.logkeeper import LogKeeper
    from prime.roles.master.logs import TaskLogs
    from prime.roles.master.logstore import LogStore
    from prime.roles.master.metrics import MasterMetrics
    from prime.roles.master.service import MasterService
    from prime.roles.master.state import MasterStarted, RunEnded
    from prime.roles.master.store import MasterStore, StateCursor
    from prime.roles.master.sync import StorageSync
    from prime.roles.process import open_data_dir, serving
    from prime.store import Database
    from prime.web import HEALTH, METRICS, add_loop, bound_port

    deployment = Deployment.load(deployment_path)
    registry = await RegistryClient.connect(rpc_url, deployment)
    # Closed in reverse: the app (its loops), the service, the peer client, the database, the
    # data dir's lock, the chain connection.
    resources = contextlib.AsyncExitStack()
    resources.push_async_callback(registry.close)
    opened: list[Any] = []
    try:
        run = await _check_run(registry, settings.run_id, account.address)
        # A data dir holds one run's state: refuse to mix runs, registries or chains (and a second master).
        data = resources.enter_context(open_data_dir(
            settings.data_dir, ROLE, marker=MARKER,
            identity={"chain_id": registry.chain_id, "registry": registry.address, "run_id": settings.run_id},
        ))
        data_dir = data.path
        db = Database(data_dir / "master.sqlite")
        resources.callback(db.close)
        opened.append(db)
        store = MasterStore(db)
        adopted = store.adopt_legacy_sync_marks(data_dir)  # marks of an older master's sync.sqlite
        if adopted:
            log.info("adopted %d final-sync marks from %s into master.sqlite", adopted, data_dir / "sync.sqlite")
        blobs = BlobStore(data_dir / "blobs")
        state = store.load(settings.state)

        domain = Domain(registry.chain_id, registry.address)
        replay = ReplayCache.persistent(data_dir / "nonces")
        resources.callback(replay.close)
        app = new_app(SignedService(account, domain, replay))
        metrics = MasterMetrics(app[METRICS], lambda: state)
        peer_client = SignedClient(account, domain=domain, timeout_s=settings.peer_timeout_s, retries=2)
        resources.push_async_callback(peer_client.close)
        permissions = ChainPermissions(registry)
        permissions.attach(app[HEALTH])  # an RPC outage is named in /health at once
        clock = time.time

        def known_url(node: str) -> str | None:
            rec = state.nodes.get(node)
            return rec.url if rec is not None else None

        locator = NodeLocator(DiscoveryClient(peer_client, run.discovery_uri), settings.run_id,
                              known_url, lambda node, url: service.url_resolved(node, url))
        invites = InviteSender(peer_client, account, chain_id=registry.chain_id, registry=registry.address,
                               run_id=settings.run_id, master_url=settings.public_url, locator=locator)
        sync = StorageSync(peer_client, locator, store, blobs, metrics,
                           concurrency=max(1, settings.concurrency // 4), clock=clock)

        async def chain_member(node: str) -> Any:
            if not adoption.holds(node):
                return None  # another master's node (docs/protocol.md, "One master per node")
            if not await permissions.is_active_node(settings.run_id, node):
                return None
            return (await registry.get_node(node)).specs

        effects = NetworkEffects(invites, TaskPusher(peer_client, locator), sync, chain_member, clock=clock)
        service = MasterService(settings, state, store, metrics, effects, clock=clock)
        resources.push_async_callback(service.close)
        adoption = Adoption(registry, settings.run_id, account.address, state=lambda: state, apply=service.apply,
                            invite=invites.send, invite_ttl_s=settings.state.invite_ttl_s, clock=clock)
        await adoption.load()
        follower = EventFollower(registry, EVENT_NAMES, cursor=StateCursor(state, store))
        watcher = ChainWatcher(registry, follower, settings.run_id, lambda: state, service.apply,
                               on_event=lambda name: metrics.chain_events.labels(name).inc(),
                               clock=clock, batch=service.batch, adoption=adoption)

        service.apply(MasterStarted(clock()))
        if run.ended:
            service.apply(RunEnded(clock()))
        # Every attempt's logs are followed and kept (logs.sqlite): readable after the node is gone.
        # The log streams have a client of their own: held open for hours, they never take the
        # peer client's connections.
        log_store = LogStore(data_dir / "logs.sqlite")
        resources.callback(log_store.close)
        log_client = SignedClient(account, domain=domain, timeout_s=settings.peer_timeout_s, retries=1,
                                  transport=AiohttpTransport(connector=aiohttp.TCPConnector(limit=0)))
        resources.push_async_callback(log_client.transport.close)
        logs = TaskLogs(log_store, service.task)
        keeper = LogKeeper(log_client, locator, log_store, lambda: service.state.tasks.values(), service.task,
                           on_stored=logs.changed)
        logs.keeper = keeper
        resources.push_async_callback(keeper.close)
        add_routes(app, service, permissions, logs=logs, blobs=blobs)
        add_loop(app, "logs", keeper.step, interval_s=1.0)
        add_loop(app, "chain", watcher.step, interval_s=settings.poll_interval_s)
        add_loop(app, "tick", service.tick, interval_s=settings.tick_interval_s)
        add_loop(app, "adopt", adoption.step, interval_s=settings.tick_interval_s)
        if settings.eject_after_s > 0:
            ejector = Ejector(registry.with_account(account), settings.run_id, lambda: state, settings.eject_after_s,
                              metrics=metrics, holds=adoption.holds, clock=clock)
            add_loop(app, "eject", ejector.step, interval_s=settings.tick_interval_s)
        # A sync round may move a lot of data: it is not stale while it works.
        add_loop(app, "sync", service.sync_round, interval_s=settings.sync_interval_s,
                 stale_after_s=max(3600.0, 3 * settings.sync_interval_s + 10))
        runner = await resources.enter_async_context(serving(app, host=host, port=port))
    except BaseException:
        await resources.aclose()
        raise
    log.info("master of run %d (%s) listening on http://%s:%d, public URL %s; %d nodes and %d tasks loaded from %s",
             settings.run_id, account.address, host, bound_port(runner), settings.public_url, len(state.nodes),
             len(state.tasks), data_dir)
    return RunningMaster(runner, service, registry, peer_client, opened, data, resources)


async def _check_run(registry: Any, run_id: int, address: str) -> Any:
    try:
        run = await registry.get_run(run_id)
    except ChainError as exc:
        if getattr(exc, "error_name", None) == "RunNotFound":
            raise PrimeError(f"Run {run_id} does not exist on this registry; check --run-id.") from None
        raise
    if not await registry.is_master(run_id, address):
        raise PrimeError(
            f"Key {address} is not a master of run {run_id} on chain; ask the run's owner to add it "
            "(addMaster) or start with a master's --key-file."
        )
    if run.ended:
        log.warning("run %d has ended on chain: this master serves status, logs and files but invites nobody", run_id)
    return run


async def serve(*, stop: Any = None, **kwargs: Any) -> None:
    """Run the master until SIGTERM/SIGINT (or ``stop``, an ``asyncio.Event``)."""
    from prime.roles.process import wait_for_stop_signal

    master = await start_master(**kwargs)
    # Everything loaded so far (libraries, the saved state) lives as long as the process: keep
    # it out of the garbage collector's full passes, which otherwise walk it between heartbeats.
    gc.freeze()
    try:
        await wait_for_stop_signal(stop)
        log.info("master stopping")
    finally:
        await master.close()
