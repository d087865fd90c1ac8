"""Remember (signer, nonce) pairs for as long as their timestamp is acceptable.

A request is accepted only while ``|now - timestamp| <= window``, so a nonce needs
remembering only until ``timestamp + window``; after that the timestamp check alone
rejects a replay. Entries expire in that order (a heap), and memory is capped: when the
cache is full of live entries it refuses new requests (fail closed) rather than forget
a nonce that could then be replayed.
"""

from __future__ import annotations

import hashlib
import heapq
import time
from collections.abc import Callable


class ReplayCacheFull(Exception):
    """More live nonces than ``max_entries``: the server is flooded; refuse for now."""


class ReplayCache:
    def __init__(self, window_s: int = 60, *, max_entries: int = 1_000_000, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

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
        self._expiry[key] = expires
        heapq.heappush(self._heap, (expires, key))
        return True
