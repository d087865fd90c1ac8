"""Storage sync, carried out: copy a persistent replica's /data into the master's blob store.

The core decides which replica to sync when (``syncplan``: every round for running replicas,
a final sync once one finished, retries with backoff, the marks in ``master.sqlite``); this
module does one ``SyncStorage``: GET the miner's manifest ({path, size, sha256} per file), fetch
only the blobs the content-addressed store lacks, merge the manifest into the synced one
(MasterStore.save_manifest: a sync never erases files another node's copy listed),
and answer the event it produced, ``SyncSucceeded`` or ``SyncFailed``. Re-syncing unchanged data
fetches no blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from prime.auth.client import SignedClient
from prime.errors import PeerError, PrimeError
from prime.protocol.errors import ValidationError
from prime.protocol.storage import ManifestEntry
from prime.roles.master.cas import BlobStore
from prime.roles.master.events import SyncFailed, SyncStorage, SyncSucceeded
from prime.roles.master.locator import NodeLocator
from prime.roles.master.metrics import MasterMetrics
from prime.roles.master.store import MasterStore

log = logging.getLogger(__name__)

MAX_MANIFEST_FILES = 100_000
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class SyncResult:
    files: int
    blobs_fetched: int
    bytes_fetched: int
    final: bool  # the miner says the container finished (this manifest will not change)


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
        metrics: MasterMetrics,
        *,
        concurrency: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.locator = locator
        self.store = store
        self.blobs = blobs
        self.metrics = metrics
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)

    async def sync(self, ins: SyncStorage) -> SyncSucceeded | SyncFailed:
        """Carry out one ``SyncStorage`` (at most ``concurrency`` at a time); never raises PrimeError."""
        try:
            async with self._limit:
                result = await self.sync_replica(ins.node, ins.task_id, ins.replica)
        except (PrimeError, OSError) as exc:
            self.metrics.syncs.labels("failed").inc()
            not_found = isinstance(exc, PeerError) and exc.status == 404
            if ins.final and not_found:
                log.info("final sync of task %s replica %d: node %s has no data for it", ins.task_id, ins.replica,
                         ins.node)
            else:
                log.warning("sync of task %s replica %d from %s failed: %s", ins.task_id, ins.replica, ins.node, exc)
            return SyncFailed(ins.node, ins.task_id, ins.replica, ins.final, self._clock(), str(exc)[:1000], not_found)
        self.metrics.syncs.labels("ok").inc()
        if ins.final or result.blobs_fetched:
            log.info("%s task %s replica %d from %s: %d files, %d new blobs (%d bytes)",
                     "final sync of" if ins.final else "synced", ins.task_id, ins.replica, ins.node, result.files,
                     result.blobs_fetched, result.bytes_fetched)
        return SyncSucceeded(ins.node, ins.task_id, ins.replica, ins.final, self._clock(), result.files,
                             result.blobs_fetched, result.bytes_fetched, result.final)

    # --- one replica -----------------------------------------------------------------------

    async def sync_replica(self, node: str, task_id: str, replica: int) -> SyncResult:
        """Fetch the manifest and the blobs the store lacks; save the manifest. PeerError on failure."""
        url = await self.locator.url_for(node)
        base = f"{url}/tasks/{quote(task_id, safe='')}"
        try:
            answer = await self.client.request("GET", f"{base}/manifest", audience=node, params={"replica": replica})
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
                async with self.client.stream("GET", f"{base}/blobs/{digest}", audience=node, params={"replica": replica}) as resp:
                    await self.blobs.write(digest, size, resp.content.iter_chunked(256 * 1024))
                fetched += 1
                fetched_bytes += size
                self.metrics.sync_blobs.inc()
                self.metrics.sync_bytes.inc(size)
            self.store.add_blob(digest, size, self._clock())
        # Merged, never replaced: files another node's copy listed stay (syncplan.dropped).
        self.store.save_manifest(task_id, replica, manifest.files, self._clock(), source=node)
        return SyncResult(len(manifest.files), fetched, fetched_bytes, manifest.final)

    async def _relocate(self, node: str) -> None:
        try:
            await self.locator.lookup(node)
        except PeerError:
            pass

async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator
