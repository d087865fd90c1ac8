"""Carrying out the core's actions on the Docker engine: start, resume, restart, stop; and
reading back what runs (a snapshot of ``ReplicaStatus``), a replica's state and its logs.

The executor decides nothing about restarts or what should run (``core.py`` does); it only
keeps what an engine call in flight needs: a record of replicas being started (pulling,
or failed before a container existed). Images are made present by ``images.ImagePuller``
(one pull per image, a backoff after a failure, the registry policy asked first).

The docker SDK is blocking; every call runs in a worker thread (``engine.py``), and the long-lived streams
(image pulls, followed logs) get a thread of their own (``streams.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import CancellableStream

from prime.errors import PrimeError
from prime.protocol.tasks import ReplicaState
from prime.roles.miner.containers import (
    LABEL_HASH,
    LABEL_INSTANCE,
    LABEL_NODE,
    LABEL_SPEC,
    LABEL_TASK,
    attempt_of,
    build_container_kwargs,
    instance_id,
    key_of,
    parse_log_frame,
    ports_of,
    read_frames,
    state_from_inspect,
    status_of,
)
from prime.roles.miner.core import Key, Placement, ReplicaStatus
from prime.roles.miner.engine import Engine, ExecutorError
from prime.roles.miner.images import ImagePuller, ProgressCallback
from prime.roles.miner.registries import RegistryPolicy
from prime.roles.miner.streams import close_stream, iterate_in_thread

log = logging.getLogger(__name__)

MAX_RECORDS = 1000
MAX_LOG_LINE = 64 * 1024  # characters of one log line held before it is passed on in pieces


class TaskNotFound(PrimeError):
    """No container or record of this task on this node."""


@dataclass(frozen=True)
class LogLine:
    stream: str  # "stdout" or "stderr"
    text: str  # without the trailing newline
    timestamp: str | None = None  # RFC 3339 from Docker


class DockerExecutor:
    """Runs placements as labelled containers of one node. ``network_mode``: "host" in
    production, "none" in tests. ``client`` None: ``docker.from_env()`` at first use.
    ``registries``: which registries a missing image may be pulled from (None: the default
    policy, public registries only).

    The executor lists, stops and removes only containers labelled with its own instance id
    (``containers.instance_id``: data dir, chain, registry, node), never another miner's, even
    one with the same node key; ``bind_chain`` sets the chain part before any container exists.
    Containers of miners older than the instance label are never touched (nor adopted)."""

    def __init__(
        self,
        client: docker.DockerClient | None,
        data_dir: Path,
        node_address: str,
        *,
        network_mode: str = "host",
        pull_backoff_s: float = 1.0,
        pull_backoff_max_s: float = 300.0,
        stop_timeout_s: int = 10,
        shm_size_mib: int | None = 1024,
        pids_limit: int | None = 4096,
        registries: RegistryPolicy | None = None,
        chain_id: int | None = None,
        registry_address: str | None = None,
    ) -> None:
        self.engine = Engine(client)  # the SDK client and the worker threads its blocking calls run in
        self._docker = self.engine.call
        self.data_dir = Path(data_dir)
        # Fills a new attempt's /data from the master's synced copy (seeding.Seeder; None: never).
        self.seeder: Any = None
        self.node_address = node_address
        self.instance = instance_id(self.data_dir, node_address, chain_id, registry_address)
        self.network_mode = network_mode
        self.stop_timeout_s = stop_timeout_s
        self.shm_size_mib = shm_size_mib
        self.pids_limit = pids_limit
        self._locks: dict[Key, asyncio.Lock] = {}
        self._generation: dict[Key, int] = {}  # bumped by stop/replace: a start in flight gives up
        self._starting: Counter[Key] = Counter()
        # Containers this executor is stopping and removing (ids): one that exits on the stop
        # signal (a task that traps SIGTERM and exits 0) reads Stopped, not Completed, until gone.
        self._removing: set[str] = set()
        # Records of replicas with no container: Pulling, failed before a container, Stopped.
        self._records: OrderedDict[Key, ReplicaStatus] = OrderedDict()
        self.images = ImagePuller(lambda: self.client, self._docker,
                                  registries if registries is not None else RegistryPolicy(),
                                  backoff_s=pull_backoff_s, backoff_max_s=pull_backoff_max_s)

    @property
    def registries(self) -> RegistryPolicy:
        """Which registries a missing image may be pulled from (``images.ImagePuller``)."""
        return self.images.registries

    @registries.setter
    def registries(self, policy: RegistryPolicy) -> None:
        self.images.registries = policy

    def bind_chain(self, chain_id: int, registry_address: str) -> None:
        """The chain and registry this miner serves: part of its instance id (call before any container)."""
        self.instance = instance_id(self.data_dir, self.node_address, chain_id, registry_address)

    # -- engine access

    @property
    def client(self) -> docker.DockerClient:
        return self.engine.client

    async def close(self) -> None:
        """Close the engine connections of a client this executor made, once its calls are back."""
        await self.engine.close()

    def _lock(self, key: Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def task_dir(self, task_id: str) -> Path:
        return self.data_dir / "tasks" / task_id

    def task_data_dir(self, task_id: str, replica: int = 0) -> Path:
        """The host directory mounted at /data for one replica of a persistent task (its manifest root):
        ``<data dir>/tasks/{task}/r{replica}/data``. Replica 0 of a task started by an older miner
        (``<data dir>/tasks/{task}/data``, shared by every replica then) keeps that directory."""
        data = self.task_dir(task_id) / f"r{int(replica)}" / "data"
        if replica == 0 and not data.exists():
            legacy = self.task_dir(task_id) / "data"
            if legacy.is_dir():
                return legacy
        return data

    def _prepare_data_dir(self, task_id: str, replica: int = 0) -> Path:
        data = self.task_data_dir(task_id, replica)
        data.mkdir(parents=True, exist_ok=True)
        # The task dir stays private to the miner's user; /data itself is open to any uid,
        # because the container runs without CAP_DAC_OVERRIDE and may use another uid.
        os.chmod(self.task_dir(task_id), 0o700)
        os.chmod(data, 0o777)
        return data

    # -- reading state from Docker

    def _list_containers_blocking(self, task_id: str | None = None) -> list[Any]:
        # Only this instance's containers: another miner's (even with this node key) are invisible.
        filters = [f"{LABEL_INSTANCE}={self.instance}", f"{LABEL_NODE}={self.node_address}"]
        if task_id is not None:
            filters.append(f"{LABEL_TASK}={task_id}")
        # ignore_removed: a container removed between Docker's list and its inspect is simply gone.
        return self.client.containers.list(all=True, filters={"label": filters}, ignore_removed=True)

    async def unlabelled(self) -> list[str]:
        """Names of containers with this node's label but no instance label (miners before it): never touched."""
        def names() -> list[str]:
            listed = self.client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={self.node_address}"}, ignore_removed=True)
            return sorted(c.name for c in listed if LABEL_INSTANCE not in (c.labels or {}))
        return await self._docker(names)

    async def _containers(self, task_id: str | None = None) -> list[Any]:
        return await self._docker(self._list_containers_blocking, task_id)

    async def _containers_of(self, key: Key) -> list[Any]:
        """The replica's containers, newest first (more than one only when a removal failed)."""
        found = [c for c in await self._containers(key[0]) if key_of(c.labels) == key]
        return sorted(found, key=_created, reverse=True)

    async def _container(self, key: Key) -> Any | None:
        found = await self._containers_of(key)
        return found[0] if found else None

    async def _remove_stale(self, key: Key, spec_hash: str) -> Any | None:
        """Remove the replica's containers of another spec (or attempt); the one that matches, if any."""
        keep = None
        for container in await self._containers_of(key):
            if keep is None and (container.labels or {}).get(LABEL_HASH) == spec_hash:
                keep = container
                continue
            log.info("task %s replica %s changed; replacing its container", *key)
            await self._remove(container)
        return keep

    def _record(self, status: ReplicaStatus) -> ReplicaStatus:
        self._records[status.key] = status
        self._records.move_to_end(status.key)
        while len(self._records) > MAX_RECORDS:  # bounded: the oldest records go first
            self._records.popitem(last=False)
        return status

    async def status(self, task_id: str, replica: int = 0) -> ReplicaStatus | None:
        """The replica's state from Docker (or this executor's record when it has no container)."""
        container = await self._container((task_id, replica))
        if container is not None:
            return self._status_of(container)
        return self._records.get((task_id, replica))

    def _status_of(self, container: Any) -> ReplicaStatus:
        """``status_of``, but a container that exited while this executor removes it is Stopped."""
        status = status_of(container)
        if container.id in self._removing and status.state in (ReplicaState.COMPLETED, ReplicaState.FAILED):
            return dataclasses.replace(status, state=ReplicaState.STOPPED, reason=None)
        return status

    async def snapshot(self) -> list[ReplicaStatus]:
        """Every replica of this node: its containers, plus replicas being started or failed before starting."""
        newest: dict[Key, Any] = {}
        for container in sorted(await self._containers(), key=_created):
            key = key_of(container.labels)
            if key is not None:
                newest[key] = container  # one per replica: the newest (older ones go at its next start or stop)
        statuses = [self._status_of(c) for c in newest.values()]
        seen = set(newest)
        for key, record in self._records.items():
            if key not in seen and record.state is not ReplicaState.STOPPED:
                statuses.append(record)
        return sorted(statuses, key=lambda s: s.key)

    async def held_ports(self) -> set[int]:
        """The ports this instance's running group members listen on (from their spec labels): a
        restarted miner that adopts them finds those ports of its --task-ports busy, by its own."""
        running = [c for c in await self._containers() if state_from_inspect(c.attrs)[0] is ReplicaState.RUNNING]
        return {port for c in running for port in ports_of((c.labels or {}).get(LABEL_SPEC))}

    # -- starting

    async def start(self, placement: Placement, on_progress: ProgressCallback | None = None, *, replace: bool = False) -> ReplicaStatus:
        """Create and start the placement's container, pulling its image only if missing; any other
        container of the replica is removed first (``replace`` also abandons a start in flight).

        Never raises for a task's own failure: an unpullable image or an unstartable container
        comes back as ``Failed`` with a reason.
        """
        key, spec_hash = placement.key, placement.spec_hash()
        if replace:
            self._generation[key] = self._generation.get(key, 0) + 1
        generation = self._generation.get(key, 0)
        self._starting[key] += 1
        try:
            async with self._lock(key):
                container = await self._remove_stale(key, spec_hash)
                if container is not None:
                    return status_of(container)  # started meanwhile (a push and a heartbeat)
                self._record(self._pending(placement, ReplicaState.PULLING))
            failure = await self.images.ensure(placement.spec.image, on_progress)
            async with self._lock(key):
                if self._generation.get(key, 0) != generation:  # stopped or replaced meanwhile
                    return self._records.get(key) or ReplicaStatus(key[0], key[1], ReplicaState.STOPPED)
                if failure is not None:
                    return self._record(self._pending(placement, ReplicaState.FAILED, failure))
                container = await self._remove_stale(key, spec_hash)  # a concurrent start may have created it
                if container is not None:
                    return status_of(container)
                return await self._create_and_start(placement)
        finally:
            self._starting[key] -= 1
            if self._starting[key] <= 0:
                del self._starting[key]

    @staticmethod
    def _pending(placement: Placement, state: ReplicaState, reason: str | None = None) -> ReplicaStatus:
        return ReplicaStatus(
            placement.task_id, placement.replica, state, reason=reason, spec_hash=placement.spec_hash(), restart=placement.restart
        )

    async def _create_and_start(self, placement: Placement) -> ReplicaStatus:
        data_mount = None
        if placement.spec.persistent:
            try:
                data_mount = await asyncio.to_thread(self._prepare_data_dir, placement.task_id, placement.replica)
            except OSError as exc:
                reason = f"its data directory could not be created ({exc}); check the miner's --data-dir"
                return self._record(self._pending(placement, ReplicaState.FAILED, reason))
            if self.seeder is not None:  # a new attempt resumes from the master's copy (seeding.py)
                await self.seeder.seed(placement.task_id, placement.replica, placement.desired.attempt, data_mount)
        kwargs = build_container_kwargs(
            placement,
            node_address=self.node_address,
            instance=self.instance,
            data_mount=data_mount,
            network_mode=self.network_mode,
            shm_size_mib=self.shm_size_mib,
            pids_limit=self.pids_limit,
        )
        try:
            try:
                container = await self._docker(self.client.containers.create, **kwargs)
            except docker.errors.APIError as exc:
                if exc.status_code != 409 or not await self._remove_leftover(kwargs["name"]):
                    raise
                container = await self._docker(self.client.containers.create, **kwargs)
        except docker.errors.APIError as exc:
            reason = f"Docker refused to create its container: {exc.explanation or exc}"
            return self._record(self._pending(placement, ReplicaState.FAILED, reason))
        self._records.pop(placement.key, None)
        await self._start(container)
        return status_of(container)

    async def _remove_leftover(self, name: str) -> bool:
        """A container of this very name (a leftover of this instance) is removed; never another's."""
        try:
            container = await self._docker(self.client.containers.get, name)
        except docker.errors.NotFound:
            return True  # gone meanwhile: the name is free
        if (container.labels or {}).get(LABEL_INSTANCE) != self.instance:
            return False
        log.info("removing leftover container %s before creating it again", name)
        await self._remove(container)
        return True

    async def _start(self, container: Any) -> None:
        try:
            await self._docker(container.start)
        except docker.errors.APIError as exc:
            log.info("container %s did not start: %s", container.name, exc.explanation or exc)
        await self._docker(container.reload)

    async def resume(self, key: Key, container_id: str) -> ReplicaStatus | None:
        """Start a container that was created but never started (if it still is)."""
        return await self._start_existing(key, container_id, ReplicaState.PULLING)

    async def restart(self, key: Key, container_id: str) -> ReplicaStatus | None:
        """Start a failed container again (if it still is failed)."""
        return await self._start_existing(key, container_id, ReplicaState.FAILED)

    async def _start_existing(self, key: Key, container_id: str, expected: ReplicaState) -> ReplicaStatus | None:
        async with self._lock(key):
            container = await self._container(key)
            if container is None or container.id != container_id:
                return None if container is None else status_of(container)
            if state_from_inspect(container.attrs)[0] is expected:  # nobody did it meanwhile
                await self._start(container)
            return status_of(container)

    # -- stopping

    async def _remove(self, container: Any) -> None:
        self._removing.add(container.id)
        try:
            await self._stop_and_remove(container)
        finally:
            self._removing.discard(container.id)

    async def _stop_and_remove(self, container: Any) -> None:
        try:
            await self._docker(container.stop, timeout=self.stop_timeout_s)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            pass  # removal below forces it
        try:
            await self._docker(container.remove, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise ExecutorError(f"Docker could not remove container {container.name}: {exc.explanation or exc}") from exc

    async def stop(self, task_id: str, replica: int | None = None) -> bool:
        """Stop and remove the task's container(s) (one replica, or all); False when there were none.

        A start in flight for the task is abandoned: no container is created after it.
        """
        found_keys = {key_of(c.labels) for c in await self._containers(task_id)}
        keys: set[Key] = {k for k in found_keys if k is not None}
        keys |= {k for k in self._records if k[0] == task_id}
        keys |= {k for k in self._starting if k[0] == task_id}
        keys = {k for k in keys if replica is None or k[1] == replica}
        found = False
        for key in sorted(keys):
            self._generation[key] = self._generation.get(key, 0) + 1
            async with self._lock(key):
                containers = await self._containers_of(key)
                for container in containers:
                    await self._remove(container)
                if containers:
                    found = True
                elif key in self._starting or (key in self._records and self._records[key].state is not ReplicaState.STOPPED):
                    found = True
                self._record(ReplicaStatus(key[0], key[1], ReplicaState.STOPPED))
        return found

    # -- logs

    async def logs(self, task_id: str, *, replica: int = 0, follow: bool = False, tail: int | None = None,
                   attempt: int | None = None, skip: int = 0) -> AsyncIterator[LogLine]:
        """The task's output as lines (stdout and stderr, in order); with ``follow``, until it exits.

        ``attempt``: that attempt's container (TaskNotFound if the replica's is another's);
        ``skip``: leave out the first N lines (a reader that has them). A line longer than
        ``MAX_LOG_LINE`` characters comes out in pieces of about that size (a line without end
        never sits in memory). Runs the blocking read in its own thread; stopping the
        iteration early closes the stream.
        """
        container = await self._container((task_id, replica))
        if container is None:
            raise TaskNotFound(f"Task {task_id} has no container on this node, so it has no logs.")
        found = attempt_of((container.labels or {}).get(LABEL_SPEC))
        if attempt is not None and found is not None and found != attempt:
            raise TaskNotFound(f"Task {task_id} replica {replica} has no container of attempt {attempt} on this node.")
        api = self.client.api
        container_id = container.id

        def open_frames() -> Iterator[tuple[int, bytes]]:
            # The SDK's logs() drops which stream a frame came from; read the multiplexed frames ourselves.
            params = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": int(follow), "tail": "all" if tail is None else int(tail)}
            response = api._get(api._url("/containers/{0}/logs", container_id), params=params, stream=True)
            api._raise_for_status(response)
            api._disable_socket_timeout(api._get_raw_response_socket(response))
            return CancellableStream(read_frames(response), response)

        buffers = {"stdout": "", "stderr": ""}
        timestamps: dict[str, str | None] = {"stdout": None, "stderr": None}
        counted = 0
        frames = iterate_in_thread(open_frames, close_stream, f"prime-logs-{task_id}")
        async with contextlib.aclosing(frames):  # closes the HTTP stream when our caller stops early
            async for stream_type, payload in frames:
                stream = "stderr" if stream_type == 2 else "stdout"
                timestamp, text = parse_log_frame(payload)
                if not buffers[stream]:
                    timestamps[stream] = timestamp
                buffers[stream] += text
                while "\n" in buffers[stream] or len(buffers[stream]) > MAX_LOG_LINE:
                    if "\n" in buffers[stream]:
                        line, buffers[stream] = buffers[stream].split("\n", 1)
                    else:  # a piece of a line without end (cut at frame boundaries: the same on every read)
                        line, buffers[stream] = buffers[stream], ""
                    counted += 1
                    if counted > skip:
                        yield LogLine(stream, line, timestamps[stream])
                    timestamps[stream] = timestamp
        for stream, rest in buffers.items():
            if rest:  # a last line without a newline
                counted += 1
                if counted > skip:
                    yield LogLine(stream, rest, timestamps[stream])


def _created(container: Any) -> str:
    """Docker's creation time as sortable text (RFC 3339 in UTC, its fraction padded to 9 digits)."""
    created = str((container.attrs or {}).get("Created") or "")
    head, _, fraction = created.rstrip("Z").partition(".")
    return f"{head}.{fraction.ljust(9, '0')}"

