"""Remember (signer, nonce) pairs for as long as their timestamp is acceptable, across restarts.

A request is accepted only while ``|now - timestamp| <= window``, so a nonce needs
remembering only until ``timestamp + window``; after that the timestamp check alone
rejects a replay. Entries expire in that order (a heap), and memory is capped: when the
cache is full of live entries it refuses new requests (fail closed) rather than forget
a nonce that could then be replayed.

A cache kept only in memory would forget every nonce when the process stops, and for one
window after any restart (which a crash can force) captured requests would be accepted
again. So a role's cache writes each accepted nonce to a ``NonceJournal`` in its data
directory before the request is handled, and a restarted role reads back the live ones.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_RECORD = struct.Struct(">16sQ")  # key (blake2b-128 of signer and nonce), expiry (unix seconds)


class ReplayCacheFull(Exception):
    """More live nonces than ``max_entries``: the server is flooded; refuse for now."""


class NonceJournal:
    """Accepted nonces on disk: append-only files, one per ``window_s`` of wall-clock time.

    Each accepted nonce is one 24-byte ``write`` (no fsync: a crash of the process keeps
    what the kernel was given; a crash of the machine takes longer than a window to come
    back from). Files whose every entry has expired are deleted; a torn last record (the
    process died mid-write) is ignored when reading.
    """

    def __init__(self, directory: Path, window_s: int, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.window_s = max(1, int(window_s))
        self._clock = clock
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._generation = -1

    def _generation_of(self, now: float) -> int:
        return int(now) // self.window_s

    def _path(self, generation: int) -> Path:
        return self.directory / f"nonces-{generation}.bin"

    def _generations(self) -> Iterator[tuple[int, Path]]:
        for path in self.directory.glob("nonces-*.bin"):
            stem = path.stem.removeprefix("nonces-")
            if stem.isascii() and stem.isdigit():
                yield int(stem), path

    def load(self, now: float | None = None) -> list[tuple[bytes, int]]:
        """Every (key, expiry) still live at ``now``; deletes files that hold nothing live."""
        now = self._clock() if now is None else now
        live: list[tuple[bytes, int]] = []
        for generation, path in sorted(self._generations()):
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.warning("cannot read the nonce journal %s (%s); its nonces are forgotten", path, exc)
                continue
            usable = len(data) - len(data) % _RECORD.size
            entries = [(key, expiry) for key, expiry in _RECORD.iter_unpack(data[:usable]) if expiry >= now]
            if entries:
                live.extend(entries)
            elif generation < self._generation_of(now):
                path.unlink(missing_ok=True)
        return live

    def append(self, key: bytes, expiry: int, now: float) -> None:
        generation = self._generation_of(now)
        if generation != self._generation or self._fd is None:
            self._rotate(generation, now)
        assert self._fd is not None
        os.write(self._fd, _RECORD.pack(key, expiry))

    def _rotate(self, generation: int, now: float) -> None:
        self.close()
        self._fd = os.open(self._path(generation), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._generation = generation
        # An entry expires at most 2 windows + 1 s after it was written (timestamps may run a
        # window ahead): files older than 3 generations hold nothing live.
        for old, path in self._generations():
            if old < generation - 3:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ReplayCache:
    def __init__(
        self,
        window_s: int = 60,
        *,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.time,
        journal: NonceJournal | None = None,
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        self.journal = journal
        if journal is not None:
            for key, expires in journal.load(clock()):
                self._expiry[key] = expires
                self._heap.append((expires, key))
            heapq.heapify(self._heap)

    @classmethod
    def persistent(
        cls, directory: Path, window_s: int = 60, *, max_entries: int = 1_000_000, clock: Callable[[], float] = time.time
    ) -> ReplayCache:
        """A cache whose accepted nonces survive a restart (kept under ``directory``)."""
        journal = NonceJournal(directory, window_s, clock=clock)
        return cls(window_s, max_entries=max_entries, clock=clock, journal=journal)

    def __len__(self) -> int:
        return len(self._expiry)

    @staticmethod
    def _key(signer: str, nonce: str) -> bytes:
        # 16-byte digest: fixed small size per entry whatever the nonce length.
        return hashlib.blake2b(f"{signer.lower()}\n{nonce}".encode(), digest_size=16).digest()

    def evict_expired(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        heap, expiry = self._heap, self._expiry
        while heap and heap[0][0] < now:
            expires, key = heapq.heappop(heap)
            if expiry.get(key) == expires:
                del expiry[key]

    def seen(self, signer: str, nonce: str) -> bool:
        return self._key(signer, nonce) in self._expiry

    def remember(self, signer: str, nonce: str, timestamp: int, *, now: float | None = None) -> bool:
        """Record the nonce; False if it was already used (a replay). May raise ReplayCacheFull."""
        now = self._clock() if now is None else now
        key = self._key(signer, nonce)
        if key in self._expiry:
            return False
        if len(self._expiry) >= self.max_entries:
            self.evict_expired(now)
            if len(self._expiry) >= self.max_entries:
                raise ReplayCacheFull(f"{len(self._expiry)} nonces are live; try again shortly")
        elif self._heap and self._heap[0][0] < now:
            self.evict_expired(now)
        expires = timestamp + self.window_s + 1
        if self.journal is not None:
            self.journal.append(key, expires, now)  # on disk before the request is handled
        self._expiry[key] = expires
        heapq.heappush(self._heap, (expires, key))
        return True

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
