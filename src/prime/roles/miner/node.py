"""The miner's start-up sequence and its life until SIGTERM (or a rejection).

``prepare()`` does everything that can fail before money moves: lock the data dir (the role
skeleton's ``open_data_dir``: a second miner on it is refused in one sentence; the lock is
held until ``close()``), probe the hardware and select GPUs, preflight (Docker, NVIDIA
runtime, data dir, port), read the run from chain and refuse when the node does not meet
its requirements; then registers the node (stake from the provider key) only if it is not
registered yet.

``start()`` adopts the node's existing task containers (never killing or duplicating
them), serves the HTTP API and starts the loops: announce to discovery, follow the
node's status on chain, heartbeat to the master, supervise restart policies.
``wait()`` returns on stop and raises the ``PrimeError`` that ended the miner otherwise.

``run_miner(options, node_account, provider_account, prover=...)`` is the whole thing;
the prover parameter lets tests start a real miner with a cheating prover. The executor is
a dependency (``executor=``; a ``DockerExecutor`` by default, built lazily so nothing here
needs Docker), and ``build_task_runtime`` wires the part that runs tasks (converger and
heartbeats) on its own, so a test can run it with an in-memory executor. What the operator
sees is in ``console.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from rich.console import Console
from rich.markup import escape

from prime import hardware
from prime.auth.client import SignedClient
from prime.auth.middleware import SignedService
from prime.auth.permissions import ChainPermissions
from prime.auth.replay import ReplayCache
from prime.auth.signing import Domain
from prime.chain.client import RegistryClient
from prime.chain.types import NodeInfo, NodeStatus, RunInfo, Specs
from prime.challenge.service import ChallengeService
from prime.clients.discovery import DiscoveryClient
from prime.config import MINER_PORT
from prime.errors import ChainError, PrimeError
from prime.roles.miner import core
from prime.roles.miner.announce import Announcer, choose_announce_ip
from prime.roles.miner.app import build_miner_app
from prime.roles.miner.chainwait import until_chain_answers
from prime.roles.miner.console import MinerConsole
from prime.roles.miner.executor import DockerExecutor
from prime.roles.miner.heartbeat import Converger, HeartbeatLoop
from prime.roles.miner.invite import InviteHandler
from prime.roles.miner.preflight import challenge_prover, run_preflight, task_ports_preflight
from prime.roles.miner.registration import check_discovery_uri, check_run, ensure_registered
from prime.roles.miner.registries import RegistryPolicy
from prime.roles.miner.release import DEFAULT_GRACE_S, ReleaseGuard
from prime.roles.miner.seeding import Seeder
from prime.roles.miner.state import (
    Announcement,
    MinerState,
    MinerStore,
    StateFile,
    Verdict,
)
from prime.roles.miner.tasks_api import TasksApi
from prime.roles.miner.watch import ChainWatch
from prime.roles.process import DataDir, open_data_dir
from prime.web import HEALTH, METRICS, LoopHealth, add_loop, serve

log = logging.getLogger("prime.miner")

DEFAULT_PORT = MINER_PORT
ROLE = "miner"


@dataclass
class MinerOptions:
    """Everything ``prime miner start`` takes (keys are loaded by the caller)."""

    run_id: int
    rpc_url: str
    deployment: Path | Any  # a path or a Deployment
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    gpu: str = "all"
    public_ip: str | None = None
    stake_wei: int | None = None  # None: the registry's minimum
    task_network: str = "bridge"
    announce_interval_s: float = 60.0
    chain_poll_interval_s: float = 5.0
    finished_retention_s: float = 3600.0
    allow_registries: tuple[str, ...] = ()  # --allow-registry; empty: public registries only
    task_ports: tuple[int, int] | None = None  # --task-ports: where group members listen; None: it hosts none
    release_grace_s: float = DEFAULT_GRACE_S  # after the run's end, stop what its master did not (release.py)
    docker_base_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskRuntime:
    """The part of a miner that runs tasks: converging on the master's list, supervising, heartbeats."""

    executor: Any
    converger: Converger
    heartbeat: HeartbeatLoop


def build_task_runtime(
    executor: Any,
    store: MinerStore,
    client: Any,
    gpus: list[int],
    health: LoopHealth,
    *,
    retention_s: float = 3600.0,
    on_progress: Callable[[Any], None] | None = None,
    counter: Any = None,
    clock: Callable[[], float] = time.monotonic,
    still_master: Callable[[str], Awaitable[bool]] | None = None,
    task_ports: tuple[int, int] | None = None,
) -> TaskRuntime:
    """Wire the executor, the converger and the heartbeat loop (no chain, no HTTP server)."""
    policy = core.Policy(retention_s=retention_s)
    converger = Converger(executor, gpus, policy=policy, on_progress=on_progress, clock=clock, task_ports=task_ports)
    heartbeat = HeartbeatLoop(client=client, converger=converger, store=store, health=health, counter=counter,
                              still_master=still_master)
    return TaskRuntime(executor, converger, heartbeat)


def docker_executor(options: MinerOptions, data_dir: Path, address: str) -> DockerExecutor:
    """The production executor (its Docker client is made at first use)."""
    registries = RegistryPolicy.from_flags(options.allow_registries)
    return DockerExecutor(None, data_dir, address, network_mode=options.task_network, registries=registries)


class MinerNode:
    """One node of one run. Use ``prepare``, ``start``, ``wait``, ``close`` (or ``run_miner``)."""

    def __init__(
        self,
        options: MinerOptions,
        node_account: Any,
        provider_account: Any | None = None,
        *,
        prover: Any | None = None,
        console: Console | None = None,
        executor: Any | None = None,
    ) -> None:
        self.options = options
        self.node_account = node_account
        self.provider_account = provider_account or node_account
        self.prover = prover
        self.out = MinerConsole(console)
        self.data_dir = Path(options.data_dir).expanduser()
        self.store = MinerStore(StateFile(self.data_dir))
        self.data: DataDir | None = None  # the locked data dir, from prepare() to close()
        self.registry: Any = None
        self.provider_registry: Any = None
        self.run: RunInfo | None = None
        self.specs: Specs | None = None
        self.gpus: list[int] = []
        self.hardware: hardware.HardwareInfo | None = None
        self.registration_tx: str | None = None
        self._owns_executor = executor is None  # then its engine connections are closed with the node
        self.executor: Any = executor if executor is not None else docker_executor(options, self.data_dir, node_account.address)
        self.converger: Converger | None = None
        self.heartbeat: HeartbeatLoop | None = None
        self.challenge: Any = None
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self._clients: list[Any] = []
        self._replay: ReplayCache | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopped = asyncio.Event()
        self._failure: PrimeError | None = None
        self.release: ReleaseGuard | None = None  # stops what runs once the node has no master (release.py)

    # -- what others read

    @property
    def console(self) -> Console:
        return self.out.console

    @property
    def state(self) -> MinerState:
        """The miner's state (read it; changes go through ``store``)."""
        return self.store.state

    @property
    def state_file(self) -> StateFile:
        return self.store.file

    @property
    def address(self) -> str:
        return self.node_account.address

    @property
    def url(self) -> str:
        host = self.options.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        return f"http://[{host}]:{self.options.port}" if ":" in host else f"http://{host}:{self.options.port}"

    def say(self, text: str, style: str | None = None) -> None:
        self.out.say(text, style)

    def _say_plain(self, text: str) -> None:
        self.say(escape(text))  # a URL like http://[::1]:8545 is no markup

    # -- before any transaction

    async def prepare(self) -> None:
        """Lock the data dir, probe, select GPUs, preflight, read the run, check requirements, then register if needed."""
        options = self.options
        if self.data is None:
            self.data = open_data_dir(self.data_dir, ROLE)
        self.hardware = await asyncio.to_thread(hardware.probe, self.data_dir)
        self.gpus = hardware.select_gpus(self.hardware, options.gpu)
        self.specs = hardware.to_specs(self.hardware, self.gpus)
        failures = await asyncio.to_thread(
            _preflight, bool(self.gpus), self.data_dir, options.port, options.host, options.docker_base_url
        )
        if self.prover is None:  # a caller's prover (tests' cheating ones) is used as it is
            # GPUs offered: torch/cupy on exactly those (imports torch: seconds, so in a thread), or refused.
            self.prover, failure = await asyncio.to_thread(challenge_prover, self.gpus, self.hardware, options.gpu)
            if failure:
                failures.insert(0, failure)
        if failures:
            self.out.errors(failures[1:])
            raise PrimeError(failures[0])
        self.out.node(self.address, self.provider_account.address, self.specs, self.gpus)
        # The chain may be down or stalled as the miner starts: wait for it (a visible line, retries).
        await until_chain_answers(self._connect_chain, rpc_url=options.rpc_url, say=self._say_plain)
        bind_chain = getattr(self.executor, "bind_chain", None)
        if bind_chain is not None:  # the chain is part of the executor's instance id (its containers' label)
            bind_chain(self.registry.chain_id, self.registry.address)
        # --task-ports free, but for this instance's own running members (known from here on).
        failure = await task_ports_preflight(self.executor, options.task_ports, options.host, options.port)
        if failure:
            raise PrimeError(failure)
        run = await until_chain_answers(lambda: self.registry.get_run(options.run_id), rpc_url=options.rpc_url, say=self._say_plain)
        check_run(run, self.specs)
        check_discovery_uri(run)
        choose_announce_ip(options.public_ip, options.host, run.discovery_uri)  # a bad --public-ip fails before any transaction
        self.run = run
        await self.store.open_for(self.address, options.run_id)
        result = await ensure_registered(
            self.registry, self.provider_registry, self.node_account, options.run_id, self.specs, stake_wei=options.stake_wei
        )
        self.registration_tx = result.tx_hash
        if result.tx_hash is not None:
            await self.store.registered(self.address, options.run_id, result.tx_hash)
            self.out.registered(options.run_id, result.info.stake, result.tx_hash)
        else:
            self.out.already_registered(options.run_id, result.info.status.label)

    async def _connect_chain(self) -> None:
        self.registry = await RegistryClient.connect(self.options.rpc_url, self.options.deployment)
        self.provider_registry = self.registry.with_account(self.provider_account)

    # -- serving

    async def start(self) -> None:
        """Adopt containers, serve the API, start the loops."""
        assert self.run is not None, "prepare() first"
        run, options = self.run, self.options  # run: narrowed for the announcer's lambda below
        registries = getattr(self.executor, "registries", None)
        if registries is not None:  # said once the data dir is ours (a refused start prints one sentence only)
            log.info("pulling images from %s", registries.describe())
        # Containers from before a restart are adopted: found by their labels, never restarted here.
        self.out.adopted([s for s in await self.executor.snapshot() if s.container_id is not None])
        unlabelled = await self.executor.unlabelled() if hasattr(self.executor, "unlabelled") else []
        if unlabelled:  # an older miner's: no instance label, so never adopted, stopped or removed
            log.warning("%d container(s) of this node carry no prime.instance label and are left alone (remove them with "
                        "`docker rm -f %s`)", len(unlabelled), " ".join(unlabelled[:5]))
        permissions = ChainPermissions(self.registry)
        # the offered GPUs' UUIDs and the driver, named in every commitment
        gpu_uuids, driver = hardware.identity(self.hardware, self.gpus) if self.hardware else ([], None)
        self.challenge = ChallengeService(self.prover, gpu_uuids=gpu_uuids, driver=driver)
        # Probe the compute backend (imports torch/cupy, looks for GPUs) now, in a thread:
        # done lazily inside the first challenge it would count against the time bound.
        backend = await asyncio.to_thread(lambda: getattr(self.challenge.prover, "name", "custom"))
        self.out.backend(f"{backend} on GPU{'s' if len(self.gpus) > 1 else ''} {', '.join(map(str, self.gpus))}"
                         if self.gpus else backend)
        invite = InviteHandler(
            node_account=self.node_account,
            registry=self.registry,
            provider_registry=self.provider_registry,
            run_id=options.run_id,
            store=self.store,
            on_joined=self._joined,
            on_master_gone=lambda master: self._master_gone(permissions, master),
        )
        health = LoopHealth()  # the heartbeat reports into the app's own once the app exists (below)
        domain = Domain(self.registry.chain_id, self.registry.address)
        runtime = build_task_runtime(
            self.executor, self.store, self._client(SignedClient(self.node_account, domain=domain, timeout_s=10.0, retries=2)),
            self.gpus, health, retention_s=options.finished_retention_s, on_progress=self.out.pull_printer(),
            still_master=lambda master: self._still_master(permissions, master), task_ports=options.task_ports,
        )
        self.converger, self.heartbeat = runtime.converger, runtime.heartbeat
        # A new attempt of a persistent replica resumes from the master's synced copy of its /data.
        self.executor.seeder = Seeder(self._client(SignedClient(self.node_account, domain=domain, timeout_s=30.0, retries=2)),
                                      lambda: (self.store.state.master_url, self.store.state.master))
        assert self.data is not None
        replay = self._replay = ReplayCache.persistent(self.data.path / "nonces")  # replays refused across restarts
        self.app = build_miner_app(
            signing=SignedService(self.node_account, domain, replay),
            permissions=permissions,
            run_id=options.run_id,
            challenge=self.challenge,
            invite=invite,
            tasks=TasksApi(self.executor, self.converger),
            on_verdict=self._verdict,
            current_master=lambda: self.store.state.master,
        )
        self.heartbeat.health = self.app[HEALTH]
        permissions.attach(self.app[HEALTH])  # /health names the chain when permission checks cannot reach it
        self.heartbeat.counter = Counter(
            "prime_miner_heartbeats", "Heartbeats sent to the master, by result.", ["result"], registry=self.app[METRICS]
        )

        discovery = DiscoveryClient(self._client(SignedClient(self.node_account, domain=domain, timeout_s=10.0, retries=2)),
                                    self.run.discovery_uri)
        announcer = Announcer(
            lambda ip, port: discovery.announce(ip, port, options.run_id),
            lambda: choose_announce_ip(options.public_ip, options.host, run.discovery_uri),
            options.port,
            every_s=options.announce_interval_s,
            on_announced=self._announced,
        )
        watch = ChainWatch(
            self.registry, self.address, options.run_id, self.state,
            on_change=self._status_changed, on_outcome=self._fail,
            verdict_grace_s=max(5.0, 2 * options.chain_poll_interval_s),
        )
        self.release = ReleaseGuard(self.converger, options.run_id, lambda: watch.last,
                                    lambda: None if watch.error is None else str(watch.error),
                                    grace_s=options.release_grace_s, say=lambda line: self.say(escape(line), "yellow"))
        tick = min(10.0, options.announce_interval_s)
        add_loop(self.app, "release", self.release.step, interval_s=options.chain_poll_interval_s, max_backoff_s=60.0)
        add_loop(self.app, "announce", announcer.step, interval_s=tick, max_backoff_s=60.0)
        add_loop(self.app, "chain", watch.step, interval_s=options.chain_poll_interval_s, max_backoff_s=60.0)
        add_loop(self.app, "supervise", self.converger.supervise, interval_s=5.0, max_backoff_s=60.0)
        # The node's master removed on chain: noticed between heartbeats too (issue 14).
        add_loop(self.app, "master", lambda: self._check_master(permissions), interval_s=options.chain_poll_interval_s,
                 max_backoff_s=60.0)
        self.runner = await serve(self.app, host=options.host, port=options.port)
        self._tasks.append(asyncio.create_task(self.heartbeat.run(), name="miner:heartbeat"))
        self.out.serving(options.host, options.port, self.run.discovery_uri)

    def _client(self, client: Any) -> Any:
        self._clients.append(client)
        return client

    # -- callbacks from the loops and handlers

    async def _announced(self, result: Any) -> None:
        assert self.run is not None
        await self.store.announced(Announcement(result.ip, result.port, self.run.discovery_uri, result.at))
        self.out.announced(result.ip, result.port)

    def _joined(self, accepted: Any) -> None:
        self.out.invited(accepted.master, accepted.master_url, self.options.run_id, accepted.tx_hash)
        if self.heartbeat is not None:
            self.heartbeat.active = True
            self.heartbeat.wake()

    async def _verdict(self, verdict: Verdict) -> None:
        await self.store.verdict(verdict)
        self.out.verdict(verdict.validator, verdict.approved, verdict.reason)

    async def _still_master(self, permissions: ChainPermissions, master: str) -> bool:
        """Asked on every heartbeat answer: is ``master`` still a master of the run? Read fresh from the
        chain (no cache: a removed master is refused at its very next answer); during a chain outage
        the permission cache's last answer stands. A removed master is forgotten (``_master_gone``)."""
        try:
            still = bool(await self.registry.is_master(self.options.run_id, master))
        except ChainError:
            return bool(await permissions.is_master(self.options.run_id, master))
        if not still:
            await self._master_gone(permissions, master)
        return still

    async def _check_master(self, permissions: ChainPermissions) -> None:
        master = self.store.state.master
        if master is not None:
            await self._still_master(permissions, master)

    async def _master_gone(self, permissions: ChainPermissions, master: str) -> None:
        permissions.cache.clear()  # its pushes are refused from now on, not after the cache's TTL
        if await self.store.master_gone(master):
            self.say(f"Master {master} is no master of run {self.options.run_id} any more: its answers and pushes "
                     "are refused; waiting for another master of the run to adopt this node.", "yellow")
            log.warning("master %s was removed from run %d: not obeyed any more; waiting to be adopted",
                        master, self.options.run_id)

    def _status_changed(self, info: NodeInfo, line: str) -> None:
        self.out.status(line)
        if self.heartbeat is not None:
            # Released (the run ended): heartbeats go on, so the master's stops and final syncs reach the node.
            self.heartbeat.active = info.status in (NodeStatus.ACTIVE, NodeStatus.RELEASED) \
                and info.run_id == self.options.run_id
            if self.heartbeat.active and self.state.master_url:
                self.heartbeat.wake()

    def _fail(self, error: PrimeError) -> None:
        if self._failure is None:
            self._failure = error
        self._stopped.set()

    # -- life and death

    def stop(self) -> None:
        """Ask the miner to stop (SIGTERM/SIGINT do this)."""
        self._stopped.set()

    async def wait(self) -> None:
        """Until stopped; raises the error that ended the miner (a rejection, an ejection)."""
        await self._stopped.wait()
        if self._failure is not None:
            raise self._failure

    async def close(self) -> None:
        """Stop serving and looping; task containers keep running (a restart adopts them) unless the
        chain ended the miner (ejected, left: ``release.ReleaseGuard.on_exit``)."""
        if self.release is not None:
            with contextlib.suppress(Exception):  # the engine away: nothing can be stopped; the close goes on
                await self.release.on_exit()
        self.out.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.converger is not None:
            await self.converger.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self._owns_executor:  # after the server: its log streams read through the engine client
            await self.executor.close()
        if self.challenge is not None:
            self.challenge.release()
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
        if self.registry is not None:
            await self.registry.close()
            self.registry = None
        if self._replay is not None:
            self._replay.close()
            self._replay = None
        if self.data is not None:
            self.data.close()
            self.data = None


def _preflight(gpus_requested: bool, data_dir: Path, port: int, host: str, docker_base_url: str | None) -> list[str]:
    return run_preflight(gpus_requested=gpus_requested, data_dir=data_dir, port=port, host=host, docker_base_url=docker_base_url)


async def run_miner(
    options: MinerOptions,
    node_account: Any,
    provider_account: Any | None = None,
    *,
    prover: Any | None = None,
    console: Console | None = None,
    handle_signals: bool = True,
) -> None:
    """Run a miner until SIGTERM/SIGINT; raises ``PrimeError`` (one sentence) when it cannot
    start or when the node is rejected, ejected or leaves. ``prover`` replaces the honest
    challenge prover (tests start cheating miners this way)."""
    node = MinerNode(options, node_account, provider_account, prover=prover, console=console)
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.stop)
    try:
        await node.prepare()
        await node.start()
        await node.wait()
        node.out.stopping()
    finally:
        await node.close()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
