"""A task's persistent storage as the master sees it: a manifest and blobs by hash.

The directory is written by the task's container, i.e. by code we do not
trust, while this process runs on the host (often as root). So nothing here
follows a symlink: the walk skips them, and every file is opened one path
component at a time with ``O_NOFOLLOW`` relative to the task directory, so a
container that swaps a file or a directory for a link to ``/etc`` between the
walk and the read gets an error, not a host file.

Hashes are cached by (size, mtime_ns, ctime_ns, inode), so re-listing unchanged
data reads no file content.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from prime.errors import PrimeError

CHUNK = 1024 * 1024
# A file modified this recently may change again within the same mtime tick
# without its size changing; hash it, but do not trust the cache for it yet.
RACY_WINDOW_NS = 2_000_000_000


class UnsafePath(PrimeError):
    """A relative path that could leave the task directory (.., absolute, NUL, ...)."""


class BlobNotFound(PrimeError):
    """No regular file in the task directory has the requested hash."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str  # relative POSIX path under the task's data directory
    size: int
    sha256: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def safe_relative_path(path: str) -> str:
    """Normalise a client-supplied relative path or raise ``UnsafePath``.

    Rejects absolute paths, '..' components, NUL and other control characters,
    and backslashes; drops '.' and empty components ("a//./b" → "a/b").
    """
    if not isinstance(path, str) or not path:
        raise UnsafePath("The path is empty; give a file path relative to the task's data directory.")
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in path):
        raise UnsafePath("The path contains NUL or control characters; give a plain relative file path.")
    if "\\" in path:
        raise UnsafePath("The path contains a backslash; use '/' between the parts of a relative path.")
    if path.startswith("/"):
        raise UnsafePath("The path is absolute; give a path relative to the task's data directory.")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if any(part == ".." for part in parts):
        raise UnsafePath("The path contains '..'; give a path inside the task's data directory.")
    if not parts:
        raise UnsafePath("The path names no file; give a file path relative to the task's data directory.")
    return "/".join(parts)


def open_relative(root: str | Path, relative: str) -> BinaryIO:
    """Open a regular file under ``root`` for reading without following any symlink.

    Raises ``UnsafePath`` for a bad path, FileNotFoundError when it is missing,
    not a regular file, or reached through a symlink.
    """
    parts = safe_relative_path(relative).split("/")
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError as exc:
                raise FileNotFoundError(f"{relative}: no such directory (or a symlink)") from exc
            os.close(dir_fd)
            dir_fd = next_fd
        try:
            # O_NONBLOCK: opening a FIFO planted by the task must not hang us.
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as exc:
            raise FileNotFoundError(f"{relative}: no such file (or a symlink)") from exc
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileNotFoundError(f"{relative}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def hash_file(root: Path, relative: str) -> tuple[str, os.stat_result]:
    """sha256 of one file under ``root`` (opened safely) and its stat from the open descriptor."""
    digest = hashlib.sha256()
    with open_relative(root, relative) as f:
        st = os.fstat(f.fileno())
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest(), st


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass
class _Cached:
    key: tuple[int, int, int, int]
    sha256: str


class ManifestCache:
    """Hashes of each task directory's files, keyed by stat, and the latest hash → path index."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes: dict[str, dict[str, _Cached]] = {}
        self._by_hash: dict[str, dict[str, str]] = {}

    def get(self, root: str, relative: str, key: tuple[int, int, int, int]) -> str | None:
        with self._lock:
            cached = self._hashes.get(root, {}).get(relative)
        return cached.sha256 if cached is not None and cached.key == key else None

    def replace(self, root: str, hashes: dict[str, _Cached], entries: list[ManifestEntry]) -> None:
        # Wholesale replacement: files that disappeared leave the cache with the walk.
        with self._lock:
            self._hashes[root] = hashes
            self._by_hash[root] = {entry.sha256: entry.path for entry in entries}

    def path_for(self, root: str, sha256: str) -> str | None:
        with self._lock:
            return self._by_hash.get(root, {}).get(sha256)

    def forget(self, root: str | Path) -> None:
        with self._lock:
            self._hashes.pop(str(root), None)
            self._by_hash.pop(str(root), None)


_default_cache = ManifestCache()


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """(relative POSIX path, lstat) of every regular file under root; symlinks and specials skipped."""
    found: list[tuple[str, os.stat_result]] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            with os.scandir(root / prefix if prefix else root) as it:
                for entry in it:
                    name = entry.name
                    try:
                        name.encode("utf-8")
                    except UnicodeEncodeError:
                        continue  # not valid UTF-8: cannot be named in a JSON manifest
                    relative = f"{prefix}/{name}" if prefix else name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished while we looked
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(relative)
                    elif stat.S_ISREG(st.st_mode):
                        found.append((relative, st))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return found


def manifest(data_root: str | Path, *, cache: ManifestCache | None = None) -> list[ManifestEntry]:
    """Every regular file under ``data_root`` as (path, size, sha256), sorted by path.

    A missing directory has an empty manifest. Unchanged files are not re-hashed.
    """
    cache = cache or _default_cache
    root = Path(data_root)
    root_key = str(root)
    if not root.is_dir():
        cache.forget(root_key)
        return []
    now_ns = time.time_ns()
    entries: list[ManifestEntry] = []
    hashes: dict[str, _Cached] = {}
    for relative, st in _walk(root):
        key = _key(st)
        sha = cache.get(root_key, relative, key)
        if sha is None:
            try:
                sha, opened = hash_file(root, relative)
            except (FileNotFoundError, OSError):
                continue  # removed or swapped for a link since the walk
            key = _key(opened)
            if now_ns - opened.st_mtime_ns < RACY_WINDOW_NS:
                # Still being written, maybe: list it, re-hash it next time.
                entries.append(ManifestEntry(relative, opened.st_size, sha))
                continue
        hashes[relative] = _Cached(key, sha)
        entries.append(ManifestEntry(relative, key[0], sha))
    entries.sort(key=lambda e: e.path)
    cache.replace(root_key, hashes, entries)
    return entries


def _check_sha256(sha256: str) -> str:
    text = sha256.lower() if isinstance(sha256, str) else ""
    if len(text) != 64 or any(ch not in "0123456789abcdef" for ch in text):
        raise UnsafePath("The blob id is not a sha256 hex digest; ask for a hash from the task's manifest.")
    return text


def blob_relative_path(data_root: str | Path, sha256: str, *, cache: ManifestCache | None = None) -> str:
    """The relative path of a regular file under ``data_root`` whose content has this hash.

    Looks in the latest manifest first and re-lists once when the hash is not
    there. Only regular files found by the symlink-free walk can be named, so a
    hash of anything outside the task directory is never found.
    """
    sha = _check_sha256(sha256)
    cache = cache or _default_cache
    root_key = str(Path(data_root))
    relative = cache.path_for(root_key, sha)
    if relative is None:
        manifest(data_root, cache=cache)
        relative = cache.path_for(root_key, sha)
    if relative is None:
        raise BlobNotFound(f"No file with hash {sha} is in this task's data; fetch a fresh manifest and ask for a hash from it.")
    return relative


def blob_path(data_root: str | Path, sha256: str, *, cache: ManifestCache | None = None) -> Path:
    """The path of the file under ``data_root`` with this hash (raises ``BlobNotFound``).

    To serve it, prefer ``open_blob``: it opens without following symlinks, so a
    task that swaps the file for a link after this lookup gains nothing.
    """
    return Path(data_root) / blob_relative_path(data_root, sha256, cache=cache)


def open_blob(data_root: str | Path, sha256: str, *, cache: ManifestCache | None = None) -> tuple[BinaryIO, int]:
    """Open the blob with this hash for serving: (file object, size). Raises ``BlobNotFound``.

    The file is re-checked after opening (stat unchanged since it was hashed,
    or re-hashed), so what is served is what the hash promises.
    """
    sha = _check_sha256(sha256)
    cache = cache or _default_cache
    relative = blob_relative_path(data_root, sha, cache=cache)
    root = Path(data_root)
    try:
        f = open_relative(root, relative)
    except (FileNotFoundError, OSError) as exc:
        raise BlobNotFound(f"The file with hash {sha} changed or vanished; fetch a fresh manifest.") from exc
    st = os.fstat(f.fileno())
    if cache.get(str(root), relative, _key(st)) != sha:
        digest = hashlib.sha256()
        while chunk := f.read(CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != sha:
            f.close()
            raise BlobNotFound(f"The file with hash {sha} changed since it was listed; fetch a fresh manifest.")
        f.seek(0)
    return f, st.st_size
