"""Checkpoint resume: a new attempt of a persistent replica starts from the master's synced copy.

Before the container of attempt ``a >= 1`` is created, the miner asks its master for the synced
copy of that replica's /data (``GET /tasks/{id}/seed?replica=R``: paths, sizes, sha256; the
master answers only the node the replica is assigned to) and fetches each file its directory lacks
or holds with other content (``GET /tasks/{id}/seed/{sha256}``), verifying size and sha256 before
the file is renamed into place. Files in the directory that the copy does not name are left.

Once per (replica directory, attempt): a marker beside /data (``<data>/tasks/{id}/r{R}/seeded``,
out of the container's reach) records the attempt seeded, so a container re-created for the same
attempt (a miner restart) never rolls its newer files back to the master's copy.

The directory may hold what an earlier attempt's untrusted code left (links to host files,
FIFOs): every directory is opened one component at a time with ``O_NOFOLLOW`` relative to
/data, files are written to a fresh temporary name and renamed over the target, so nothing is
written through a link. A path that cannot be written that way is skipped with a warning.

A seed that fails (master unreachable, an old master without the route: 404) leaves the attempt
to start with what its directory holds; the master still keeps every synced file (a sync never
erases), so nothing is lost, only not resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prime.errors import PeerError, PrimeError
from prime.protocol.errors import ValidationError
from prime.protocol.storage import ManifestEntry
from prime.roles.miner import storage

log = logging.getLogger(__name__)

MARKER = "seeded"
MAX_SEED_FILES = 100_000
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
CHUNK = 256 * 1024


@dataclass(frozen=True)
class SeedResult:
    files: int = 0          # files in the master's copy
    fetched: int = 0        # files written from it
    fetched_bytes: int = 0
    skipped: int = 0        # paths that could not be written safely (or blobs that failed)
    error: str | None = None


class Seeder:
    """Fetches a replica's synced copy from the master (``master()``: its URL and address, or None)."""

    def __init__(self, client: Any, master: Callable[[], tuple[str | None, str | None]]) -> None:
        self.client = client
        self.master = master

    async def seed(self, task_id: str, replica: int, attempt: int, data_dir: Path) -> SeedResult:
        """Put the master's copy of (task, replica) into ``data_dir`` for ``attempt``; never raises PrimeError."""
        if attempt < 1 or await asyncio.to_thread(seeded_attempt, data_dir) >= attempt:
            return SeedResult()
        url, master = self.master()
        if not url or not master:
            return SeedResult(error="no master")
        base = f"{url}/tasks/{quote(task_id, safe='')}/seed"
        try:
            answer = await self.client.request("GET", base, audience=master, params={"replica": replica},
                                               max_response_bytes=MAX_MANIFEST_BYTES)
            files = parse_seed(answer)
        except (PrimeError, OSError) as exc:
            if isinstance(exc, PeerError) and exc.status == 404:
                log.info("task %s replica %d attempt %d: the master has no synced copy to resume from", task_id,
                         replica, attempt)
                mark_seeded(data_dir, attempt)
                return SeedResult()
            log.warning("task %s replica %d attempt %d starts without its synced /data: %s", task_id, replica, attempt,
                        exc)
            return SeedResult(error=str(exc)[:500])
        fetched = fetched_bytes = skipped = 0
        for entry in files:
            try:
                if await asyncio.to_thread(local_sha256, data_dir, entry) == entry.sha256:
                    continue
                tmp = await self._download(base, master, replica, entry, data_dir)
                try:
                    await asyncio.to_thread(place, data_dir, tmp, entry.path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            except (PrimeError, OSError) as exc:
                skipped += 1
                log.warning("task %s replica %d: %s not restored from the master's copy: %s", task_id, replica,
                            entry.path, exc)
                continue
            fetched += 1
            fetched_bytes += entry.size
        mark_seeded(data_dir, attempt)
        log.info("task %s replica %d attempt %d resumes from the master's copy: %d files, %d fetched (%d bytes)%s",
                 task_id, replica, attempt, len(files), fetched, fetched_bytes,
                 f", {skipped} skipped" if skipped else "")
        return SeedResult(len(files), fetched, fetched_bytes, skipped)

    async def _download(self, base: str, master: str, replica: int, entry: ManifestEntry, data_dir: Path) -> Path:
        """The blob in a temporary file beside /data (not inside it), its size and sha256 verified."""
        tmp = data_dir.parent / f".seed-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                async with self.client.stream("GET", f"{base}/{entry.sha256}", audience=master,
                                              params={"replica": replica}) as resp:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > entry.size:
                            raise PeerError(f"the master sent more than the {entry.size} bytes of {entry.path}")
                        digest.update(chunk)
                        out.write(chunk)
            if size != entry.size or digest.hexdigest() != entry.sha256:
                raise PeerError(f"the master's copy of {entry.path} does not match its sha256 {entry.sha256}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        os.chmod(tmp, 0o666)  # the task may run as any uid, without CAP_DAC_OVERRIDE (as /data is 0777)
        return tmp


def parse_seed(answer: Any) -> list[ManifestEntry]:
    """The master's seed answer, validated (paths that climb out or bad hashes: PeerError)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("files"), list):
        raise PeerError("The master's seed answer has no 'files' list.")
    items = answer["files"]
    if len(items) > MAX_SEED_FILES:
        raise PeerError(f"The master's seed lists more than {MAX_SEED_FILES} files.")
    by_path: dict[str, ManifestEntry] = {}
    try:
        for i, item in enumerate(items):
            entry = ManifestEntry.from_json(item, f"files[{i}]")
            by_path[storage.safe_relative_path(entry.path)] = entry
    except (ValidationError, storage.UnsafePath) as exc:
        raise PeerError(f"The master's seed is malformed: {exc}") from None
    return [by_path[p] for p in sorted(by_path)]


def seeded_attempt(data_dir: Path) -> int:
    """The attempt the directory was last seeded for (-1: never)."""
    try:
        return int((data_dir.parent / MARKER).read_text().strip() or "-1")
    except (OSError, ValueError):
        return -1


def mark_seeded(data_dir: Path, attempt: int) -> None:
    marker = data_dir.parent / MARKER
    tmp = marker.with_name(f".{MARKER}-{secrets.token_hex(4)}")
    tmp.write_text(f"{attempt}\n")
    os.replace(tmp, marker)


def local_sha256(data_dir: Path, entry: ManifestEntry) -> str | None:
    """The sha256 of the regular file at the entry's path (None: missing, a link, or another size)."""
    try:
        with storage.open_relative(data_dir, entry.path) as f:
            if os.fstat(f.fileno()).st_size != entry.size:
                return None
            digest = hashlib.sha256()
            while chunk := f.read(CHUNK):
                digest.update(chunk)
            return digest.hexdigest()
    except (FileNotFoundError, OSError, storage.UnsafePath):
        return None


def place(data_dir: Path, tmp: Path, relative: str) -> None:
    """Rename ``tmp`` to ``relative`` under ``data_dir``, creating directories, following no link.

    Raises OSError when a component is a link or not a directory, or the target is a directory."""
    parts = storage.safe_relative_path(relative).split("/")
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            created = False
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=dir_fd)
                created = True
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
            if created:
                os.fchmod(dir_fd, 0o777)  # as /data itself: the task may run as any uid
        try:
            st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"{relative} is a directory in /data")
        # rename replaces a link itself (never its target); the source is beside /data, same filesystem.
        os.rename(tmp, parts[-1], dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
