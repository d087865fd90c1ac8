"""The master's content-addressed blob store: ``<root>/ab/cdef…`` named by the sha256 of the content.

A blob is written to a temporary file while its hash is computed, checked against the name it
should have, flushed, and renamed into place, so a blob file that exists is always complete and
correct (a crash leaves at most a temporary file, removed on the next start).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from prime.errors import PrimeError
from prime.protocol.storage import SHA256_RE

_TMP_SUFFIX = ".part"


class BlobMismatch(PrimeError):
    """The bytes received do not have the announced sha256 or size."""


class BlobStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_partial()

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"{sha256[:80]!r} is not a lowercase hex sha256")
        return self.root / sha256[:2] / sha256[2:]

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    async def write(self, sha256: str, size: int, chunks: AsyncIterator[bytes]) -> int:
        """Store the blob read from ``chunks``; BlobMismatch (nothing stored) unless it is exactly
        ``size`` bytes hashing to ``sha256``. Returns the bytes written."""
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        digest = hashlib.sha256()
        written = 0
        fh = open(tmp, "wb")
        try:
            async for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise BlobMismatch(f"Blob {sha256} is longer than the {size} bytes its manifest lists.")
                digest.update(chunk)
                fh.write(chunk)
            if written != size:
                raise BlobMismatch(f"Blob {sha256} has {written} bytes, not the {size} its manifest lists.")
            if digest.hexdigest() != sha256:
                raise BlobMismatch(f"The bytes served as blob {sha256} hash to {digest.hexdigest()}.")
            await asyncio.to_thread(_flush_and_close, fh)
            os.replace(tmp, final)
        except BaseException:
            fh.close()
            tmp.unlink(missing_ok=True)
            raise
        return written

    def _remove_partial(self) -> None:
        for leftover in self.root.glob(f"*/*{_TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


def _flush_and_close(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
