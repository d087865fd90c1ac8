"""Following the Docker engine's event stream for the miner's own containers (``exits.py``).

Two things are read from it: ``kill`` events (a signal sent to one of this miner's
containers; the core keeps those the miner did not ask for), and the stream itself breaking
(the engine went away: dockerd closes its API before it stops the containers on shutdown).
The watcher reconnects with a growing delay; once the engine answers again, the time it was
away is handed on as an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from prime.roles.miner.containers import LABEL_INSTANCE, key_of
from prime.roles.miner.core import Key
from prime.roles.miner.streams import close_stream, iterate_in_thread

log = logging.getLogger(__name__)

OnSignal = Callable[[Key | None, str, str | None], None]  # (key, container id, signal)
OnAway = Callable[[float], None]  # wall clock
OnBack = Callable[[float, float | None], None]  # (wall clock now, last time the stream was known up)


async def watch(executor: Any, on_signal: OnSignal, on_away: OnAway, on_back: OnBack,
                *, retry_s: float = 0.5, retry_max_s: float = 5.0) -> None:
    """Follow the engine's container events of ``executor``'s instance until cancelled."""
    delay = retry_s
    last_up: float | None = None
    away = False
    while True:
        try:
            client = executor.client
            await asyncio.to_thread(client.ping)
            now = time.time()
            on_back(now, last_up if away else None)  # also the first connection: the watch is up
            away = False
            delay = retry_s
            # ``since``: the engine replays what happened from just before the ping (no gap between
            # the ping and the stream); a kill seen twice is remembered once.
            since = int(now) - 1
            filters = {"type": "container", "label": [f"{LABEL_INSTANCE}={executor.instance}"], "event": ["kill"]}
            events = iterate_in_thread(lambda: client.events(decode=True, since=since, filters=filters),
                                       close_stream, "prime-engine-events")
            async with contextlib.aclosing(events):
                async for event in events:
                    last_up = time.time()
                    if not isinstance(event, dict) or event.get("Action") != "kill":
                        continue
                    actor = event.get("Actor") or {}
                    attributes = actor.get("Attributes") or {}
                    container_id = str(actor.get("ID") or event.get("id") or "")
                    if container_id:
                        on_signal(key_of(attributes), container_id, attributes.get("signal"))
            last_up = time.time()  # the stream ended: the engine closed it
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("the engine's event stream broke: %s", exc)
        if not away:
            away = True
            on_away(time.time())
        await asyncio.sleep(delay)
        delay = min(retry_max_s, delay * 2)
