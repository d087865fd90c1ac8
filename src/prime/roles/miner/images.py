"""Making a task's image present on the node: pulled when missing, from an allowed registry only.

One pull per image, however many replicas wait for it; a failed or refused pull is remembered
with a growing backoff, so that every heartbeat does not pull (or ask the policy) again. Before
any pull the ``RegistryPolicy`` (``registries.py``) says whether the image's registry may be
contacted at all; an image already present runs without asking, and contacts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors

from prime.errors import PrimeError
from prime.roles.miner.core import backoff_delay
from prime.roles.miner.registries import RegistryPolicy
from prime.roles.miner.streams import close_stream, iterate_in_thread

log = logging.getLogger(__name__)

MAX_FAILURES = 1000  # failed images remembered (the oldest go first)


@dataclass(frozen=True)
class PullProgress:
    """One event of an image pull; per layer when ``layer`` is set; the last one has ``done``."""

    image: str
    layer: str | None
    status: str
    current: int | None = None
    total: int | None = None
    done: bool = False  # the pull's last event: it ended (``error`` None: the image is present)
    error: str | None = None


ProgressCallback = Callable[[PullProgress], None]


class PullFailed(PrimeError):
    """The registry answered the pull with an error event."""


class ImagePuller:
    """``ensure(image)``: None once the image is present, else the reason it is not.

    ``client``: the executor's Docker client (made at first use); ``call``: the executor's way
    of running a blocking SDK call in a thread (its engine errors mapped)."""

    def __init__(
        self,
        client: Callable[[], docker.DockerClient],
        call: Callable[..., Awaitable[Any]],
        registries: RegistryPolicy,
        *,
        backoff_s: float,
        backoff_max_s: float,
    ) -> None:
        self._client = client
        self._call = call
        self.registries = registries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._listeners: dict[str, list[ProgressCallback]] = {}
        self._failures: dict[str, tuple[int, float, str]] = {}  # image → (failures, retry_at, reason)

    async def ensure(self, image: str, on_progress: ProgressCallback | None) -> str | None:
        """None when the image is present (pulled if it was missing), else why it is not."""
        try:
            await self._call(self._client().images.get, image)
            return None
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:
            return f"the image reference '{image}' is not valid ({exc.explanation or exc})"
        failed = self._failures.get(image)
        if failed is not None and time.monotonic() < failed[1]:
            return failed[2]  # failed moments ago; retried after a backoff, not on every call
        # Present images ran above without asking: no registry is contacted for them. A missing
        # one is pulled only from a registry the policy allows; a refused one is never contacted.
        refusal = await self.registries.check(image)
        if refusal is not None:
            log.info("not pulling %s: %s", image, refusal)
            self._back_off(image, failed, refusal)
            return refusal
        if on_progress is not None:
            self._listeners.setdefault(image, []).append(on_progress)
        pull = self._pulls.get(image)
        if pull is None:  # one pull per image, however many tasks wait for it
            pull = self._pulls[image] = asyncio.create_task(self._pull(image))
        try:
            await asyncio.shield(pull)
        except Exception as exc:
            reason = f"the image '{image}' is not available locally and could not be pulled: {short_error(exc)}"
            self._back_off(image, failed, reason)
            return reason
        finally:
            if on_progress is not None and on_progress in self._listeners.get(image, []):
                self._listeners[image].remove(on_progress)
        self._failures.pop(image, None)
        return None

    def _back_off(self, image: str, failed: tuple[int, float, str] | None, reason: str) -> None:
        """Remember a failed pull (or a refused one) so the next tries wait a growing delay."""
        count = (failed[0] if failed else 0) + 1
        retry_at = time.monotonic() + backoff_delay(count - 1, self.backoff_s, self.backoff_max_s)
        self._failures.pop(image, None)
        self._failures[image] = (count, retry_at, reason)  # newest last
        while len(self._failures) > MAX_FAILURES:  # bounded: the oldest go first
            del self._failures[next(iter(self._failures))]

    def _tell(self, progress: PullProgress) -> None:
        for listener in list(self._listeners.get(progress.image, [])):
            try:
                listener(progress)
            except Exception:  # a printing callback must not break the pull
                log.exception("pull progress callback failed")

    async def _pull(self, image: str) -> None:
        error: str | None = None
        try:
            events = iterate_in_thread(
                lambda: self._client().api.pull(image, stream=True, decode=True), close_stream, f"prime-pull-{image}"
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    if not isinstance(event, dict):
                        continue
                    if "error" in event:
                        raise PullFailed(str(event.get("error")))
                    detail = event.get("progressDetail") or {}
                    progress = PullProgress(
                        image=image,
                        layer=event.get("id"),
                        status=str(event.get("status", "")),
                        current=detail.get("current"),
                        total=detail.get("total"),
                    )
                    self._tell(progress)
            # A pull can end without an error event yet leave no image (e.g. a platform mismatch).
            await self._call(self._client().images.get, image)
        except BaseException as exc:
            error = short_error(exc)
            raise
        finally:
            self._pulls.pop(image, None)
            self._tell(PullProgress(image=image, layer=None, status="failed" if error else "done", done=True, error=error))


def short_error(exc: BaseException) -> str:
    """Docker's own explanation of a failure when it has one, else the exception's text."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__
