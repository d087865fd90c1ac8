"""Run the master's tasks as Docker containers, and find them again after a restart.

Docker itself is the record of what runs: every container carries labels
(task id, replica, node, spec hash and the whole spec), so a restarted miner
*adopts* its running containers instead of starting duplicates, and
``reconcile(desired)`` can compare what runs with what should run by hash.

Docker never restarts a task container on its own (restart policy "no"): a
task that asks for ``restart="on-failure"`` is restarted here, with exponential
backoff, whenever ``ensure_running``/``reconcile``/``supervise`` look at it.

The docker SDK is blocking; every call runs in a worker thread, and the
long-lived streams (image pulls, followed logs) get a thread of their own so
they never starve the shared pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import requests
from docker.types import CancellableStream, DeviceRequest, LogConfig, Mount

from prime.errors import PrimeError

log = logging.getLogger(__name__)

LABEL_TASK = "prime.task_id"
LABEL_NODE = "prime.node"
LABEL_REPLICA = "prime.replica"
LABEL_HASH = "prime.spec_hash"
LABEL_SPEC = "prime.spec"
LABEL_GPUS = "prime.gpus"

# Docker names allow [a-zA-Z0-9][a-zA-Z0-9_.-]*; the id is also a directory name on the host.
TASK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESTART_POLICIES = ("never", "on-failure")


class InvalidTaskSpec(PrimeError):
    """A task spec that cannot be run as given (bad id, image, env, GPUs...)."""


class TaskNotFound(PrimeError):
    """No container or record of this task on this node."""


class ExecutorError(PrimeError):
    """The Docker engine failed or could not be reached."""


class TaskState(StrEnum):
    PULLING = "Pulling"  # preparing: image pull, or container created but not started yet
    RUNNING = "Running"
    COMPLETED = "Completed"  # exited 0
    FAILED = "Failed"  # exited non-zero, or could not be started (reason says why)
    STOPPED = "Stopped"  # stopped and removed on request


GpuRequest = list[int] | str | int  # [] none, [0, 2] these indices, "all", or a count


@dataclass(frozen=True)
class TaskSpec:
    """What to run: one replica of one task."""

    task_id: str
    image: str
    command: list[str] = field(default_factory=list)  # empty: the image's own CMD
    env: dict[str, str] = field(default_factory=dict)
    gpus: GpuRequest = field(default_factory=list)
    replica: int = 0
    persistent: bool = False  # bind <data_dir>/tasks/<task_id>/data at /data
    cpu_limit: float | None = None  # CPUs, e.g. 1.5
    memory_limit_mib: int | None = None
    restart: str = "never"  # or "on-failure": restarted here with exponential backoff
    max_restarts: int | None = None  # None: no limit (with on-failure)

    def __post_init__(self) -> None:
        _validate_spec(self)

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.replica)

    @property
    def container_name(self) -> str:
        return container_name(self.task_id, self.replica)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSpec:
        """Build from JSON-like data; wrong types raise ``InvalidTaskSpec``."""
        if not isinstance(data, dict):
            raise InvalidTaskSpec("The task spec must be a JSON object.")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidTaskSpec(f"The task spec has unknown field(s) {', '.join(unknown)}; remove them.")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidTaskSpec(f"The task spec is incomplete: {exc}.") from exc

    def spec_hash(self) -> str:
        """A stable hash of everything that shapes the container; a change means replace it."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def container_name(task_id: str, replica: int = 0) -> str:
    """``prime-task-{id}``, with ``-r{n}`` for replicas after the first."""
    return f"prime-task-{task_id}" if replica == 0 else f"prime-task-{task_id}-r{replica}"


def _validate_spec(spec: TaskSpec) -> None:
    if not isinstance(spec.task_id, str) or not TASK_ID_RE.match(spec.task_id):
        raise InvalidTaskSpec("The task id must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit.")
    if not isinstance(spec.image, str) or not spec.image or any(ch.isspace() for ch in spec.image) or "\x00" in spec.image:
        raise InvalidTaskSpec("The task's image must be a non-empty image reference such as 'ubuntu:22.04'.")
    if not isinstance(spec.command, list) or not all(isinstance(a, str) and "\x00" not in a for a in spec.command):
        raise InvalidTaskSpec("The task's command must be a list of strings (argv), e.g. [\"python\", \"train.py\"].")
    if not isinstance(spec.env, dict) or not all(
        isinstance(k, str) and ENV_NAME_RE.match(k) and isinstance(v, str) and "\x00" not in v for k, v in spec.env.items()
    ):
        raise InvalidTaskSpec("The task's env must map variable names (letters, digits, '_') to string values.")
    gpus = spec.gpus
    if isinstance(gpus, bool) or not (
        gpus == "all"
        or (isinstance(gpus, int) and gpus >= 0)
        or (isinstance(gpus, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in gpus) and len(set(gpus)) == len(gpus))
    ):
        raise InvalidTaskSpec("The task's gpus must be \"all\", a GPU count, or a list of distinct GPU indices.")
    if isinstance(spec.replica, bool) or not isinstance(spec.replica, int) or spec.replica < 0:
        raise InvalidTaskSpec("The task's replica index must be a non-negative integer.")
    if not isinstance(spec.persistent, bool):
        raise InvalidTaskSpec("The task's persistent flag must be true or false.")
    if spec.cpu_limit is not None and (isinstance(spec.cpu_limit, bool) or not isinstance(spec.cpu_limit, int | float) or spec.cpu_limit <= 0):
        raise InvalidTaskSpec("The task's cpu_limit must be a positive number of CPUs.")
    if spec.memory_limit_mib is not None and (
        isinstance(spec.memory_limit_mib, bool) or not isinstance(spec.memory_limit_mib, int) or spec.memory_limit_mib < 6
    ):
        raise InvalidTaskSpec("The task's memory_limit_mib must be an integer of at least 6 (MiB).")
    if spec.restart not in RESTART_POLICIES:
        raise InvalidTaskSpec("The task's restart policy must be \"never\" or \"on-failure\".")
    if spec.max_restarts is not None and (isinstance(spec.max_restarts, bool) or not isinstance(spec.max_restarts, int) or spec.max_restarts < 0):
        raise InvalidTaskSpec("The task's max_restarts must be a non-negative integer.")


@dataclass(frozen=True)
class TaskStatus:
    task_id: str
    replica: int
    state: TaskState
    exit_code: int | None = None
    reason: str | None = None  # why it failed, in words
    container_id: str | None = None
    spec_hash: str | None = None
    restarts: int = 0
    gpus: str | None = None  # the GPU indices it was given ("0,2", "all", "")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data


@dataclass(frozen=True)
class PullProgress:
    """One event of an image pull; per layer when ``layer`` is set."""

    image: str
    layer: str | None
    status: str
    current: int | None = None
    total: int | None = None


@dataclass(frozen=True)
class LogLine:
    stream: str  # "stdout" or "stderr"
    text: str  # without the trailing newline
    timestamp: str | None = None  # RFC 3339 from Docker


ProgressCallback = Callable[[PullProgress], None]


# ---------------------------------------------------------------- pure helpers


def state_from_inspect(attrs: dict[str, Any]) -> tuple[TaskState, int | None, str | None]:
    """(state, exit code, reason) from a container's ``docker inspect`` data."""
    st = attrs.get("State") or {}
    status = st.get("Status", "")
    exit_code = st.get("ExitCode")
    error = st.get("Error") or None
    if status in ("running", "restarting", "paused"):
        return TaskState.RUNNING, None, None
    if status == "created":
        if error:
            return TaskState.FAILED, exit_code if exit_code else 128, f"the container could not start: {error}"
        return TaskState.PULLING, None, None
    if status == "removing":
        return TaskState.STOPPED, exit_code, None
    # exited / dead
    if exit_code == 0 and not error:
        return TaskState.COMPLETED, 0, None
    if st.get("OOMKilled"):
        return TaskState.FAILED, exit_code, "killed for using more memory than its limit"
    if error:
        return TaskState.FAILED, exit_code, error
    return TaskState.FAILED, exit_code, f"exited with code {exit_code}"


def gpu_assignment(requested: GpuRequest, node_gpus: list[int] | None, in_use: set[int]) -> list[int] | str:
    """The GPU indices a task gets: a list of indices, or "all" (every GPU Docker can see).

    ``node_gpus`` is the node's selected GPUs (None: not known, every GPU of the host).
    A count picks free GPUs among the node's; raises ``InvalidTaskSpec`` when they do not fit.
    """
    if requested == "all":
        return "all" if node_gpus is None else list(node_gpus)
    if isinstance(requested, list):
        if node_gpus is not None:
            foreign = [i for i in requested if i not in node_gpus]
            if foreign:
                raise InvalidTaskSpec(f"The task asks for GPU {foreign[0]}, which this node does not offer (it offers {node_gpus or 'none'}).")
        return sorted(requested)
    count = int(requested)
    if count == 0:
        return []
    if node_gpus is None:
        raise InvalidTaskSpec("The task asks for a GPU count but this node's GPUs are not known; ask for GPU indices or \"all\".")
    free = [i for i in node_gpus if i not in in_use]
    if len(free) < count:
        raise InvalidTaskSpec(f"The task needs {count} GPU(s) but only {len(free)} of this node's GPUs are free.")
    return free[:count]


def gpus_label(assigned: list[int] | str) -> str:
    return assigned if isinstance(assigned, str) else ",".join(map(str, assigned))


def build_container_kwargs(
    spec: TaskSpec,
    *,
    node_address: str,
    gpus: list[int] | str,
    data_mount: Path | None,
    network_mode: str,
    shm_size_mib: int | None = 1024,
    pids_limit: int | None = 4096,
) -> dict[str, Any]:
    """Keyword arguments of ``client.containers.create`` for this spec (pure; unit tested)."""
    labels = {
        LABEL_TASK: spec.task_id,
        LABEL_NODE: node_address,
        LABEL_REPLICA: str(spec.replica),
        LABEL_HASH: spec.spec_hash(),
        # The whole spec, so that a restarted miner knows what it adopted (restart policy, ...).
        LABEL_SPEC: json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":")),
        LABEL_GPUS: gpus_label(gpus),
    }
    env = dict(spec.env)
    env["PRIME_TASK_ID"] = spec.task_id
    env["PRIME_REPLICA"] = str(spec.replica)
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": spec.container_name,
        "labels": labels,
        "environment": env,
        "detach": True,
        "tty": False,
        "network_mode": network_mode,
        "privileged": False,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        # Restarts are the executor's decision (with backoff), never Docker's.
        "restart_policy": {"Name": "no"},
        # Bounded json-file logs: readable by `logs`, and a chatty task cannot fill the disk.
        "log_config": LogConfig(type=LogConfig.types.JSON, config={"max-size": "50m", "max-file": "3"}),
    }
    if spec.command:
        kwargs["command"] = list(spec.command)
    if gpus == "all":
        kwargs["device_requests"] = [DeviceRequest(driver="nvidia", count=-1, capabilities=[["gpu"]])]
    elif gpus:
        # By index: on hosts with mixed cards the task gets exactly the GPUs it was given.
        kwargs["device_requests"] = [DeviceRequest(driver="nvidia", device_ids=[str(i) for i in gpus], capabilities=[["gpu"]])]
    if data_mount is not None:
        kwargs["mounts"] = [Mount(target="/data", source=str(data_mount), type="bind", read_only=False)]
    if spec.cpu_limit is not None:
        kwargs["nano_cpus"] = int(spec.cpu_limit * 1e9)
    if spec.memory_limit_mib is not None:
        kwargs["mem_limit"] = f"{spec.memory_limit_mib}m"
        kwargs["memswap_limit"] = f"{spec.memory_limit_mib}m"  # no swap beyond the limit
    if shm_size_mib:
        kwargs["shm_size"] = f"{shm_size_mib}m"  # data loaders need more than Docker's 64 MiB
    if pids_limit:
        kwargs["pids_limit"] = pids_limit
    return kwargs


def backoff_delay(restarts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before restart number ``restarts + 1``: base, 2·base, 4·base … capped."""
    return min(max_s, base_s * (2 ** min(restarts, 32)))


def _parse_log_frame(payload: bytes) -> tuple[str | None, str]:
    """Split Docker's "<RFC3339 timestamp> <text>" (timestamps=1) into its parts."""
    text = payload.decode("utf-8", errors="replace")
    head, sep, rest = text.partition(" ")
    if sep and len(head) >= 20 and head[4:5] == "-" and head[10:11] == "T":
        return head, rest
    return None, text


# ---------------------------------------------------------------- threads ↔ asyncio

T = TypeVar("T")
_DONE = object()


async def _iterate_in_thread(open_stream: Callable[[], Iterator[T]], close: Callable[[Any], None], name: str) -> AsyncIterator[T]:
    """Iterate a blocking iterator in its own thread, with backpressure, cancellable from here.

    ``open_stream`` runs in the thread; ``close(stream)`` is called from the loop
    when the consumer stops early, to unblock the thread's read.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
    stop = threading.Event()
    holder: dict[str, Any] = {}

    def put(item: Any) -> bool:
        try:
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        except RuntimeError:  # loop closed
            return False
        while True:
            try:
                future.result(timeout=0.25)
                return True
            except concurrent.futures.TimeoutError:
                if stop.is_set():
                    future.cancel()
                    return False
            except Exception:
                return False

    def work() -> None:
        try:
            stream = open_stream()
            holder["stream"] = stream
            if stop.is_set():
                close(stream)
                return
            for item in stream:
                if stop.is_set() or not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            if not stop.is_set():
                put(exc)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        stream = holder.get("stream")
        if stream is not None:
            try:
                close(stream)
            except Exception:
                pass


def _close_stream(stream: Any) -> None:
    if isinstance(stream, CancellableStream):
        stream.close()


# ---------------------------------------------------------------- the executor


@dataclass
class _RestartTrack:
    restarts: int = 0
    next_at: float | None = None  # monotonic time of the next restart, once a failure was seen


class DockerExecutor:
    """Runs ``TaskSpec``s as labelled containers of one node.

    ``node_gpus``: the GPU indices this node offers (``--gpu``); None means every
    GPU Docker sees. ``network_mode``: "host" in production, "none" in tests.
    """

    def __init__(
        self,
        client: docker.DockerClient | None,
        data_dir: Path,
        node_address: str,
        *,
        network_mode: str = "host",
        node_gpus: list[int] | None = None,
        restart_backoff_s: float = 1.0,
        restart_backoff_max_s: float = 300.0,
        stop_timeout_s: int = 10,
        shm_size_mib: int | None = 1024,
        pids_limit: int | None = 4096,
    ) -> None:
        self._client = client
        self._client_lock = threading.Lock()
        self.data_dir = Path(data_dir)
        self.node_address = node_address
        self.network_mode = network_mode
        self.node_gpus = None if node_gpus is None else list(node_gpus)
        self.restart_backoff_s = restart_backoff_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.shm_size_mib = shm_size_mib
        self.pids_limit = pids_limit
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._gpu_lock = asyncio.Lock()
        self._generation: dict[str, int] = {}
        # Records of tasks with no container: Pulling, failed before a container, Stopped.
        self._records: OrderedDict[tuple[str, int], TaskStatus] = OrderedDict()
        self._specs: dict[tuple[str, int], TaskSpec] = {}
        self._restarts: dict[tuple[str, int], _RestartTrack] = {}
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._pull_listeners: dict[str, list[ProgressCallback]] = {}
        self._pull_failures: dict[str, tuple[int, float, str]] = {}  # image → (failures, retry_at, reason)

    # -- engine access

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            with self._client_lock:  # first use may come from two worker threads at once
                if self._client is None:
                    try:
                        self._client = docker.from_env(timeout=60)
                    except docker.errors.DockerException as exc:
                        raise ExecutorError(f"The Docker engine is not reachable ({exc}); start Docker or set DOCKER_HOST.") from exc
        return self._client

    async def _docker(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking SDK call in a worker thread; engine outages become ``ExecutorError``."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError:
            raise
        except docker.errors.DockerException as exc:
            raise ExecutorError(f"The Docker engine failed ({exc}); check that Docker is running.") from exc
        except OSError as exc:  # requests' ConnectionError is an OSError
            raise ExecutorError(f"The Docker engine is not reachable ({exc}); check that Docker is running.") from exc

    def _lock(self, key: tuple[str, int]) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def task_dir(self, task_id: str) -> Path:
        return self.data_dir / "tasks" / task_id

    def task_data_dir(self, task_id: str) -> Path:
        """The host directory mounted at /data for a persistent task (its manifest root)."""
        return self.task_dir(task_id) / "data"

    def _prepare_data_dir(self, task_id: str) -> Path:
        data = self.task_data_dir(task_id)
        data.mkdir(parents=True, exist_ok=True)
        # The task dir stays private to the miner's user; /data itself is open to any uid,
        # because the container runs without CAP_DAC_OVERRIDE and may use another uid.
        os.chmod(self.task_dir(task_id), 0o700)
        os.chmod(data, 0o777)
        return data

    # -- reading state from Docker

    def _list_containers_blocking(self, task_id: str | None = None) -> list[Any]:
        filters = [f"{LABEL_NODE}={self.node_address}"]
        if task_id is not None:
            filters.append(f"{LABEL_TASK}={task_id}")
        # ignore_removed: a container removed between Docker's list and its inspect is simply gone.
        return self.client.containers.list(all=True, filters={"label": filters}, ignore_removed=True)

    async def _containers(self, task_id: str | None = None) -> list[Any]:
        return await self._docker(self._list_containers_blocking, task_id)

    @staticmethod
    def _key_of(container: Any) -> tuple[str, int] | None:
        labels = container.labels or {}
        try:
            return labels[LABEL_TASK], int(labels.get(LABEL_REPLICA, "0"))
        except (KeyError, ValueError):
            return None

    async def _container(self, key: tuple[str, int]) -> Any | None:
        for container in await self._containers(key[0]):
            if self._key_of(container) == key:
                return container
        return None

    def _status_of(self, container: Any) -> TaskStatus:
        key = self._key_of(container) or ("?", 0)
        state, exit_code, reason = state_from_inspect(container.attrs)
        labels = container.labels or {}
        track = self._restarts.get(key)
        return TaskStatus(
            task_id=key[0],
            replica=key[1],
            state=state,
            exit_code=exit_code,
            reason=reason,
            container_id=container.id,
            spec_hash=labels.get(LABEL_HASH),
            restarts=track.restarts if track else 0,
            gpus=labels.get(LABEL_GPUS),
        )

    def _record(self, status: TaskStatus) -> TaskStatus:
        self._records[(status.task_id, status.replica)] = status
        self._records.move_to_end((status.task_id, status.replica))
        while len(self._records) > 1000:  # bounded: the oldest records go first
            self._records.popitem(last=False)
        return status

    async def status(self, task_id: str, replica: int = 0) -> TaskStatus | None:
        """The task's state from Docker (or this executor's record when it has no container)."""
        container = await self._container((task_id, replica))
        if container is not None:
            return self._status_of(container)
        return self._records.get((task_id, replica))

    async def list_states(self) -> list[TaskStatus]:
        """Every task of this node: its containers, plus tasks still pulling or failed before starting."""
        statuses = [self._status_of(c) for c in await self._containers() if self._key_of(c) is not None]
        seen = {(s.task_id, s.replica) for s in statuses}
        for key, record in self._records.items():
            if key not in seen and record.state is not TaskState.STOPPED:
                statuses.append(record)
        return sorted(statuses, key=lambda s: (s.task_id, s.replica))

    async def adopt(self) -> list[TaskStatus]:
        """Take over the labelled containers of this node (after a miner restart); returns their states."""
        statuses = []
        for container in await self._containers():
            key = self._key_of(container)
            if key is None:
                continue
            try:
                self._specs[key] = TaskSpec.from_dict(json.loads((container.labels or {}).get(LABEL_SPEC, "")))
            except (ValueError, InvalidTaskSpec):
                log.warning("container %s has no readable prime.spec label; it is reported but not supervised", container.name)
            statuses.append(self._status_of(container))
        return statuses

    def known_specs(self) -> list[TaskSpec]:
        """Specs this executor runs or adopted."""
        return list(self._specs.values())

    # -- starting

    async def ensure_running(self, spec: TaskSpec, on_progress: ProgressCallback | None = None) -> TaskStatus:
        """Make sure this spec has its container: adopt a matching one, replace a changed one,
        pull (only if missing) and start a new one. Never raises for a task's own failure:
        an unpullable image or an unstartable container comes back as ``Failed`` with a reason.
        """
        key = spec.key
        generation = self._generation.get(spec.task_id, 0)
        async with self._lock(key):
            self._specs[key] = spec
            container = await self._container(key)
            if container is not None:
                if (container.labels or {}).get(LABEL_HASH) == spec.spec_hash():
                    return await self._supervise_container(spec, container)
                log.info("task %s replica %s changed; replacing its container", spec.task_id, spec.replica)
                await self._remove(container)
                self._restarts.pop(key, None)

        failure = await self._ensure_image(spec, on_progress)
        if failure is not None:
            return self._record(TaskStatus(spec.task_id, spec.replica, TaskState.FAILED, reason=failure, spec_hash=spec.spec_hash()))

        async with self._lock(key):
            if self._generation.get(spec.task_id, 0) != generation:
                return self._records.get(key) or TaskStatus(spec.task_id, spec.replica, TaskState.STOPPED)
            container = await self._container(key)  # a concurrent call may have created it
            if container is not None and (container.labels or {}).get(LABEL_HASH) == spec.spec_hash():
                return self._status_of(container)
            if container is not None:
                await self._remove(container)
            return await self._create_and_start(spec)

    async def _supervise_container(self, spec: TaskSpec, container: Any) -> TaskStatus:
        """Start a created-but-never-started container; restart a failed one per its policy."""
        state, _, reason = state_from_inspect(container.attrs)
        key = spec.key
        if state is TaskState.PULLING:  # created, not started (the miner stopped in between)
            await self._start(container)
            return self._status_of(container)
        if state is not TaskState.FAILED or spec.restart != "on-failure":
            return self._status_of(container)
        track = self._restarts.setdefault(key, _RestartTrack())
        if spec.max_restarts is not None and track.restarts >= spec.max_restarts:
            return self._status_of(container)
        now = time.monotonic()
        if track.next_at is None:
            track.next_at = now + backoff_delay(track.restarts, self.restart_backoff_s, self.restart_backoff_max_s)
            log.info("task %s failed (%s); restart %d in %.1fs", spec.task_id, reason, track.restarts + 1, track.next_at - now)
        if now < track.next_at:
            return self._status_of(container)
        track.restarts += 1
        track.next_at = None
        await self._start(container)
        return self._status_of(container)

    async def _start(self, container: Any) -> None:
        try:
            await self._docker(container.start)
        except docker.errors.APIError as exc:
            log.info("container %s did not start: %s", container.name, exc.explanation or exc)
        await self._docker(container.reload)

    async def _create_and_start(self, spec: TaskSpec) -> TaskStatus:
        self._records.pop(spec.key, None)
        self._record(TaskStatus(spec.task_id, spec.replica, TaskState.PULLING, spec_hash=spec.spec_hash()))
        data_mount = None
        if spec.persistent:
            try:
                data_mount = await asyncio.to_thread(self._prepare_data_dir, spec.task_id)
            except OSError as exc:
                return self._fail(spec, f"its data directory could not be created ({exc}); check the miner's --data-dir")
        # One allocation at a time, until the container exists: two count-based tasks must not pick the same GPU.
        async with self._gpu_lock:
            try:
                gpus = gpu_assignment(spec.gpus, self.node_gpus, await self._gpus_in_use())
            except InvalidTaskSpec as exc:
                return self._fail(spec, exc.message)
            kwargs = build_container_kwargs(
                spec,
                node_address=self.node_address,
                gpus=gpus,
                data_mount=data_mount,
                network_mode=self.network_mode,
                shm_size_mib=self.shm_size_mib,
                pids_limit=self.pids_limit,
            )
            try:
                container = await self._docker(self.client.containers.create, **kwargs)
            except docker.errors.APIError as exc:
                return self._fail(spec, f"Docker refused to create its container: {exc.explanation or exc}")
        self._records.pop(spec.key, None)
        self._restarts[spec.key] = _RestartTrack()
        await self._start(container)
        return self._status_of(container)

    def _fail(self, spec: TaskSpec, reason: str) -> TaskStatus:
        return self._record(TaskStatus(spec.task_id, spec.replica, TaskState.FAILED, reason=reason, spec_hash=spec.spec_hash()))

    async def _gpus_in_use(self) -> set[int]:
        used: set[int] = set()
        for container in await self._containers():
            state, _, _ = state_from_inspect(container.attrs)
            label = (container.labels or {}).get(LABEL_GPUS, "")
            if state in (TaskState.RUNNING, TaskState.PULLING):
                if label == "all":
                    used.update(self.node_gpus or [])
                else:
                    used.update(int(i) for i in label.split(",") if i.isdigit())
        return used

    # -- images

    async def _ensure_image(self, spec: TaskSpec, on_progress: ProgressCallback | None) -> str | None:
        """None when the image is present (pulled if it was missing), else why it is not."""
        try:
            await self._docker(self.client.images.get, spec.image)
            return None
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:
            return f"the image reference '{spec.image}' is not valid ({exc.explanation or exc})"
        failed = self._pull_failures.get(spec.image)
        if failed is not None and time.monotonic() < failed[1]:
            return failed[2]  # pulled and failed moments ago; retried after a backoff, not on every call
        self._record(TaskStatus(spec.task_id, spec.replica, TaskState.PULLING, spec_hash=spec.spec_hash()))
        if on_progress is not None:
            self._pull_listeners.setdefault(spec.image, []).append(on_progress)
        pull = self._pulls.get(spec.image)
        if pull is None:  # one pull per image, however many tasks wait for it
            pull = self._pulls[spec.image] = asyncio.create_task(self._pull(spec.image))
        try:
            await asyncio.shield(pull)
        except Exception as exc:
            reason = f"the image '{spec.image}' is not available locally and could not be pulled: {_short(exc)}"
            count = (failed[0] if failed else 0) + 1
            retry_at = time.monotonic() + backoff_delay(count - 1, self.restart_backoff_s, self.restart_backoff_max_s)
            self._pull_failures[spec.image] = (count, retry_at, reason)
            return reason
        finally:
            if on_progress is not None and on_progress in self._pull_listeners.get(spec.image, []):
                self._pull_listeners[spec.image].remove(on_progress)
        self._pull_failures.pop(spec.image, None)
        return None

    async def _pull(self, image: str) -> None:
        try:
            events = _iterate_in_thread(
                lambda: self.client.api.pull(image, stream=True, decode=True), _close_stream, f"prime-pull-{image}"
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    if not isinstance(event, dict):
                        continue
                    if "error" in event:
                        raise ExecutorError(str(event.get("error")))
                    detail = event.get("progressDetail") or {}
                    progress = PullProgress(
                        image=image,
                        layer=event.get("id"),
                        status=str(event.get("status", "")),
                        current=detail.get("current"),
                        total=detail.get("total"),
                    )
                    for listener in list(self._pull_listeners.get(image, [])):
                        try:
                            listener(progress)
                        except Exception:  # a printing callback must not break the pull
                            log.exception("pull progress callback failed")
            # A pull can end without an error event yet leave no image (e.g. a platform mismatch).
            await self._docker(self.client.images.get, image)
        finally:
            self._pulls.pop(image, None)

    # -- stopping

    async def _remove(self, container: Any) -> None:
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

        A pull in flight for the task is abandoned: no container is created after it.
        """
        self._generation[task_id] = self._generation.get(task_id, 0) + 1
        keys = {self._key_of(c) for c in await self._containers(task_id)}
        keys |= {k for k in self._records if k[0] == task_id}
        keys |= {k for k in self._specs if k[0] == task_id}
        keys = {k for k in keys if k is not None and (replica is None or k[1] == replica)}
        found = False
        for key in sorted(keys):
            async with self._lock(key):
                container = await self._container(key)
                if container is not None:
                    await self._remove(container)
                    found = True
                elif key in self._records and self._records[key].state is not TaskState.STOPPED:
                    found = True
                self._specs.pop(key, None)
                self._restarts.pop(key, None)
                self._record(TaskStatus(key[0], key[1], TaskState.STOPPED))
        return found

    # -- converging

    async def reconcile(self, desired: list[TaskSpec], on_progress: ProgressCallback | None = None) -> list[TaskStatus]:
        """Converge this node's containers on ``desired``: start the missing, stop the undesired,
        replace the changed (by spec hash), leave matching ones alone. Returns the desired tasks' states.
        """
        wanted = {spec.key: spec for spec in desired}
        present = {self._key_of(c) for c in await self._containers()}
        pending = {k for k, r in self._records.items() if r.state is not TaskState.STOPPED}
        for key in sorted(k for k in (present | pending) if k is not None and k not in wanted):
            await self.stop(key[0], key[1])
        results = await asyncio.gather(*(self.ensure_running(spec, on_progress) for spec in wanted.values()), return_exceptions=True)
        statuses = []
        for spec, result in zip(wanted.values(), results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                log.warning("task %s could not be reconciled: %s", spec.task_id, result)
                result = self._fail(spec, _short(result))
            statuses.append(result)
        return statuses

    async def supervise(self) -> list[TaskStatus]:
        """Apply restart policies to this node's existing containers (call periodically, even
        while no master answers); never recreates a container that is gone."""
        statuses = []
        for container in await self._containers():
            key = self._key_of(container)
            spec = self._specs.get(key) if key else None
            if spec is None or (container.labels or {}).get(LABEL_HASH) != spec.spec_hash():
                if key is not None:
                    statuses.append(self._status_of(container))
                continue
            async with self._lock(key):
                statuses.append(await self._supervise_container(spec, container))
        return statuses

    async def wait(self, task_id: str, replica: int = 0, timeout_s: float | None = None) -> TaskStatus:
        """Block (off the loop) until the task's container exits; its final state."""
        container = await self._container((task_id, replica))
        if container is None:
            raise TaskNotFound(f"Task {task_id} has no container on this node.")
        try:
            await asyncio.to_thread(container.wait, timeout=timeout_s)
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError) as exc:
            # docker-py reports its own read timeout as either of these.
            raise ExecutorError(f"Task {task_id} did not finish within {timeout_s}s.") from exc
        await self._docker(container.reload)
        return self._status_of(container)

    # -- logs

    async def logs(self, task_id: str, *, replica: int = 0, follow: bool = False, tail: int | None = None) -> AsyncIterator[LogLine]:
        """The task's output as lines (stdout and stderr, in order); with ``follow``, until it exits.

        Runs the blocking read in its own thread; stopping the iteration early closes the stream.
        """
        container = await self._container((task_id, replica))
        if container is None:
            raise TaskNotFound(f"Task {task_id} has no container on this node, so it has no logs.")
        api = self.client.api
        container_id = container.id

        def open_frames() -> Iterator[tuple[int, bytes]]:
            # The SDK's logs() drops which stream a frame came from; read the multiplexed frames ourselves.
            params = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": int(follow), "tail": "all" if tail is None else int(tail)}
            response = api._get(api._url("/containers/{0}/logs", container_id), params=params, stream=True)
            api._raise_for_status(response)
            api._disable_socket_timeout(api._get_raw_response_socket(response))
            return CancellableStream(_read_frames(response), response)

        buffers = {"stdout": "", "stderr": ""}
        timestamps: dict[str, str | None] = {"stdout": None, "stderr": None}
        frames = _iterate_in_thread(open_frames, _close_stream, f"prime-logs-{task_id}")
        async with contextlib.aclosing(frames):  # closes the HTTP stream when our caller stops early
            async for stream_type, payload in frames:
                stream = "stderr" if stream_type == 2 else "stdout"
                timestamp, text = _parse_log_frame(payload)
                if not buffers[stream]:
                    timestamps[stream] = timestamp
                buffers[stream] += text
                while "\n" in buffers[stream]:
                    line, buffers[stream] = buffers[stream].split("\n", 1)
                    yield LogLine(stream, line, timestamps[stream])
                    timestamps[stream] = timestamp
        for stream, rest in buffers.items():
            if rest:  # a last line without a newline
                yield LogLine(stream, rest, timestamps[stream])


def _read_frames(response: Any) -> Iterator[tuple[int, bytes]]:
    """Docker's multiplexed stream: 8-byte header (stream type, length), then the payload."""
    while True:
        header = _read_exact(response, 8)
        if len(header) < 8:
            return
        stream_type, length = struct.unpack(">BxxxL", header)
        if length == 0:
            continue
        payload = _read_exact(response, length)
        if not payload:
            return
        yield stream_type, payload


def _read_exact(response: Any, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = response.raw.read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _short(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__
