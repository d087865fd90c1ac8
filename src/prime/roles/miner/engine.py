"""The executor's connection to the Docker engine: one SDK client, blocking calls in worker threads.

The client is made at first use (``docker.from_env``) unless one is given. ``close()`` waits for
the calls in flight to come back before it closes a client it made: a caller that was cancelled
(the miner shutting down) does not stop its worker thread, and a call that finished after the
close would open a new engine connection that nobody closes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.errors

from prime.errors import PrimeError

T = TypeVar("T")


class ExecutorError(PrimeError):
    """The Docker engine failed or could not be reached."""


class Engine:
    """``client``: the SDK client (made at first use when none was given); ``call``: one blocking
    SDK call in a worker thread, engine outages as ``ExecutorError``."""

    def __init__(self, client: docker.DockerClient | None = None, *, timeout_s: int = 60) -> None:
        self._client = client
        self._owns_client = client is None  # made here, so closed here; a given one is the giver's
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._busy = 0  # calls whose worker thread has not returned yet

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            with self._lock:  # first use may come from two worker threads at once
                if self._client is None:
                    try:
                        self._client = docker.from_env(timeout=self._timeout_s)
                    except docker.errors.DockerException as exc:
                        raise ExecutorError(f"The Docker engine is not reachable ({exc}); start Docker or set DOCKER_HOST.") from exc
        return self._client

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def tracked() -> T:
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self._busy -= 1

        with self._lock:
            self._busy += 1
        try:
            return await asyncio.to_thread(tracked)
        except docker.errors.APIError:  # NotFound included: the caller decides
            raise
        except docker.errors.DockerException as exc:
            raise ExecutorError(f"The Docker engine failed ({exc}); check that Docker is running.") from exc
        except OSError as exc:  # requests' ConnectionError is an OSError
            raise ExecutorError(f"The Docker engine is not reachable ({exc}); check that Docker is running.") from exc

    async def close(self, wait_s: float = 15.0) -> None:
        """Close a client made here, once the calls in flight are back (at most ``wait_s``); a
        later call connects again. A given client is left as it is."""
        if not self._owns_client:
            return
        deadline = time.monotonic() + wait_s
        while self._busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
