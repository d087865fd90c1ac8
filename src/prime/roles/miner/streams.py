"""Blocking iterators (image pulls, followed logs) read in a thread of their own, as async iterators.

The docker SDK is blocking; long-lived streams get a thread each so they never starve the
shared worker pool, with backpressure, and can be cancelled from the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, TypeVar

from docker.types import CancellableStream

T = TypeVar("T")
_DONE = object()
JOIN_S = 2.0  # how long a stopped stream's thread is waited for (a pull cannot be cut short)


async def iterate_in_thread(open_stream: Callable[[], Iterator[T]], close: Callable[[Any], None], name: str) -> AsyncGenerator[T, None]:
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
        stream = None
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
        finally:
            release_stream(stream)

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
        if thread.is_alive():  # let it release its connection before the caller goes on (bounded)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(thread.join, JOIN_S)


def close_stream(stream: Any) -> None:
    """Unblock a read in progress (the SDK shuts the socket down)."""
    if isinstance(stream, CancellableStream):
        stream.close()


def release_stream(stream: Any) -> None:
    """In the reading thread, once its reads are over: close the HTTP response itself. Closing the
    stream alone leaves the engine connection open for as long as the response lives."""
    response = getattr(stream, "_response", None)
    if response is not None:
        try:
            response.close()
        except Exception:
            pass
