"""Storage sync: keep a copy of every persistent replica's /data in the master's blob store.

Every sync interval, for each persistent replica that is running, the master GETs the miner's
manifest ({path, size, sha256} per file) and fetches only the blobs its content-addressed store
lacks, then saves the manifest (MasterStore.save_manifest). Once a replica finished, one more
("final") sync runs; it is retried with backoff until it succeeds, across restarts (the
``final_syncs`` table records which replicas are done). Re-syncing unchanged data fetches no blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prime.auth.client import SignedClient
from prime.errors import PeerError, PrimeError
from prime.roles.master.cas import BlobStore
from prime.roles.master.locator import NodeLocator
from prime.roles.master.metrics import MasterMetrics
from prime.protocol.errors import ValidationError
from prime.protocol.nodes import NodeState
from prime.protocol.storage import ManifestEntry
from prime.protocol.tasks import ReplicaState
from prime.roles.master.state import MasterState
from prime.roles.master.store import MasterStore
from prime.store import Database

log = logging.getLogger(__name__)

MAX_MANIFEST_FILES = 100_000
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# A replica whose final sync keeps failing is retried after 2, 4, 8 ... s, at most this often.
MAX_RETRY_S = 600.0
# The miner should say final=true once it saw the container finish; after this many final syncs
# that say otherwise the master takes what it got.
FINAL_ATTEMPTS = 3

SYNC_MIGRATIONS = [
    """CREATE TABLE final_syncs (
        task_id TEXT NOT NULL, replica INTEGER NOT NULL, synced_at REAL NOT NULL, files INTEGER NOT NULL,
        PRIMARY KEY (task_id, replica))""",
]


class SyncMarks:
    """Which finished replicas had their final sync (in ``<data>/sync.sqlite``)."""

    def __init__(self, path: str | Path) -> None:
        self.db = Database(path)
        self.db.migrate(SYNC_MIGRATIONS)
        self._done = {(r["task_id"], r["replica"]) for r in self.db.query("SELECT task_id, replica FROM final_syncs", ())}

    def is_final(self, task_id: str, replica: int) -> bool:
        return (task_id, replica) in self._done

    def set_final(self, task_id: str, replica: int, at: float, files: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO final_syncs (task_id, replica, synced_at, files) VALUES (?, ?, ?, ?)",
            (task_id, replica, at, files),
        )
        self._done.add((task_id, replica))


@dataclass(frozen=True)
class SyncResult:
    files: int
    blobs_fetched: int
    bytes_fetched: int
    final: bool  # the miner says the container finished (this manifest will not change)


@dataclass
class _Retry:
    failures: int = 0
    next_at: float = 0.0


@dataclass
class Manifest:
    final: bool
    files: list[ManifestEntry] = field(default_factory=list)


def parse_manifest(answer: Any, task_id: str, replica: int) -> Manifest:
    """A miner's manifest answer, validated (paths cannot climb out; sha256 are hex); PeerError otherwise."""
    try:
        if not isinstance(answer, dict) or not isinstance(answer.get("files"), list):
            raise ValidationError("files", "The manifest must be an object with a 'files' list.")
        if answer.get("task_id", task_id) != task_id or answer.get("replica", replica) != replica:
            raise ValidationError("task_id", "The manifest is for another task or replica.")
        items = answer["files"]
        if len(items) > MAX_MANIFEST_FILES:
            raise ValidationError("files", f"More than {MAX_MANIFEST_FILES} files.")
        by_path = {}
        for i, item in enumerate(items):
            entry = ManifestEntry.from_json(item, f"files[{i}]")
            by_path[entry.path] = entry
        final = answer.get("final", True)
        return Manifest(final is not False, sorted(by_path.values(), key=lambda e: e.path))
    except ValidationError as exc:
        raise PeerError(f"The miner's manifest of task {task_id} replica {replica} is malformed: {exc}") from None


class StorageSync:
    def __init__(
        self,
        client: SignedClient,
        locator: NodeLocator,
        store: MasterStore,
        blobs: BlobStore,
        marks: SyncMarks,
        metrics: MasterMetrics,
        state: Callable[[], MasterState],
        *,
        concurrency: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.locator = locator
        self.store = store
        self.blobs = blobs
        self.marks = marks
        self.metrics = metrics
        self._state = state
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self._in_flight: set[tuple[str, int]] = set()
        self._retry: dict[tuple[str, int], _Retry] = {}
        self._final_attempts: dict[tuple[str, int], int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- one replica -----------------------------------------------------------------------

    async def sync_replica(self, node: str, task_id: str, replica: int) -> SyncResult:
        """Fetch the manifest and the blobs the store lacks; save the manifest. PeerError on failure."""
        url = await self.locator.url_for(node)
        base = f"{url}/tasks/{quote(task_id, safe='')}"
        try:
            answer = await self.client.request("GET", f"{base}/manifest", params={"replica": replica})
        except PeerError as exc:
            if exc.status is None:
                await self._relocate(node)
            raise
        manifest = parse_manifest(answer, task_id, replica)
        wanted = {e.sha256: e.size for e in manifest.files}
        missing = self.store.missing_blobs(wanted)
        fetched = fetched_bytes = 0
        for digest in missing:
            size = wanted[digest]
            if digest == EMPTY_SHA256 and size == 0:
                await self.blobs.write(digest, 0, _no_chunks())  # nothing to fetch
            else:
                async with self.client.stream("GET", f"{base}/blobs/{digest}", params={"replica": replica}) as resp:
                    await self.blobs.write(digest, size, resp.content.iter_chunked(256 * 1024))
                fetched += 1
                fetched_bytes += size
                self.metrics.sync_blobs.inc()
                self.metrics.sync_bytes.inc(size)
            self.store.add_blob(digest, size, self._clock())
        self.store.save_manifest(task_id, replica, manifest.files, self._clock())
        return SyncResult(len(manifest.files), fetched, fetched_bytes, manifest.final)

    async def _relocate(self, node: str) -> None:
        try:
            await self.locator.lookup(node)
        except PeerError:
            pass

    # --- what to sync when ---------------------------------------------------------------------

    def due(self, now: float) -> list[tuple[str, str, int, bool]]:
        """(node, task_id, replica, final) for every replica a sync round should visit now."""
        state = self._state()
        out = []
        for task in state.tasks.values():
            if not task.spec.persistent:
                continue
            for r in task.replicas:
                if r.node is None:
                    continue
                key = (task.id, r.index)
                retry = self._retry.get(key)
                if retry is not None and now < retry.next_at:
                    continue
                if r.state in (ReplicaState.RUNNING, ReplicaState.LOST):
                    node = state.nodes.get(r.node)
                    if node is not None and node.state in (NodeState.HEALTHY, NodeState.JOINED, NodeState.UNHEALTHY):
                        out.append((r.node, task.id, r.index, False))
                elif r.is_final and not self.marks.is_final(task.id, r.index):
                    out.append((r.node, task.id, r.index, True))
        return out

    async def sync_round(self) -> None:
        """Start a sync of every due replica that is not syncing already, and return: a slow or hung
        miner delays only its own replicas, never the round (the concurrency limit bounds the work)."""
        for node, task_id, replica, final in self.due(self._clock()):
            if self._claim(task_id, replica, final):
                task = asyncio.get_running_loop().create_task(self._run(node, task_id, replica, final))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def run_one(self, node: str, task_id: str, replica: int, final: bool) -> SyncResult | None:
        """Sync one replica now unless a sync of it is already running (or its final one is done); never raises."""
        if not self._claim(task_id, replica, final):
            return None
        return await self._run(node, task_id, replica, final)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _claim(self, task_id: str, replica: int, final: bool) -> bool:
        key = (task_id, replica)
        if key in self._in_flight or (final and self.marks.is_final(task_id, replica)):
            return False
        self._in_flight.add(key)
        return True

    async def _run(self, node: str, task_id: str, replica: int, final: bool) -> SyncResult | None:
        key = (task_id, replica)
        try:
            async with self._limit:
                result = await self.sync_replica(node, task_id, replica)
        except (PrimeError, OSError) as exc:
            self._failed(key, node, final, exc)
            return None
        finally:
            self._in_flight.discard(key)
        self._retry.pop(key, None)
        self.metrics.syncs.labels("ok").inc()
        if final:
            attempts = self._final_attempts.get(key, 0) + 1
            self._final_attempts[key] = attempts
            if result.final or attempts >= FINAL_ATTEMPTS:
                self.marks.set_final(task_id, replica, self._clock(), result.files)
                self._final_attempts.pop(key, None)
                log.info("final sync of task %s replica %d from %s: %d files (%d blobs, %d bytes fetched)",
                         task_id, replica, node, result.files, result.blobs_fetched, result.bytes_fetched)
        elif result.blobs_fetched:
            log.info("synced task %s replica %d from %s: %d files, %d new blobs (%d bytes)",
                     task_id, replica, node, result.files, result.blobs_fetched, result.bytes_fetched)
        return result

    def _failed(self, key: tuple[str, int], node: str, final: bool, exc: Exception) -> None:
        self.metrics.syncs.labels("failed").inc()
        if final and isinstance(exc, PeerError) and exc.status == 404:
            # The miner has no data for it (it never started, or its data is gone): nothing to copy.
            self.marks.set_final(key[0], key[1], self._clock(), 0)
            log.info("final sync of task %s replica %d: node %s has no data for it", key[0], key[1], node)
            return
        retry = self._retry.setdefault(key, _Retry())
        retry.failures += 1
        retry.next_at = self._clock() + min(MAX_RETRY_S, 2.0 ** retry.failures)
        log.warning("sync of task %s replica %d from %s failed (%d in a row): %s",
                    key[0], key[1], node, retry.failures, exc)


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator
