"""A starting miner waits for the chain RPC instead of exiting.

``until_chain_answers(call, rpc_url=..., say=...)`` runs ``call`` (connect, read the run) and,
while the RPC does not answer (refused, reset, stalled: each attempt is cut at
``attempt_timeout_s``), prints one visible line, "the chain RPC at … does not answer; retrying
every N s", and retries with backoff (1 s doubling to ``max_delay_s``) forever, reminding once a
minute; Ctrl-C (or SIGTERM) stops it. Anything else (a wrong chain id, no registry there, a
revert) is raised at once: waiting would not fix it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prime.chain.connection import ChainUnreachable

log = logging.getLogger("prime.miner")

T = TypeVar("T")


def _waitable(exc: BaseException) -> bool:
    return isinstance(exc, ChainUnreachable | TimeoutError)


async def until_chain_answers(
    call: Callable[[], Awaitable[T]],
    *,
    rpc_url: str,
    say: Callable[[str], None],
    attempt_timeout_s: float = 10.0,
    first_delay_s: float = 1.0,
    max_delay_s: float = 15.0,
    remind_every_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``await call()``, retried while the chain RPC does not answer (see the module)."""
    delay = first_delay_s
    started: float | None = None
    reminded = 0.0
    while True:
        try:
            result = await asyncio.wait_for(call(), attempt_timeout_s)
        except Exception as exc:
            if not _waitable(exc):
                raise
            reason = f"no answer within {attempt_timeout_s:g} s" if isinstance(exc, TimeoutError) else "connection failed"
            now = clock()
            if started is None:
                started = reminded = now
                say(f"The chain RPC at {rpc_url} does not answer ({reason}); retrying every {max_delay_s:g} s at most "
                    "until it does (Ctrl-C stops).")
            elif now - reminded >= remind_every_s:
                reminded = now
                say(f"Still waiting for the chain RPC at {rpc_url} ({now - started:.0f} s so far).")
            log.debug("chain RPC at %s does not answer: %s", rpc_url, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
            continue
        if started is not None:
            say(f"The chain RPC at {rpc_url} answers again (after {clock() - started:.0f} s).")
        return result
