"""When this miner's task containers have nobody left to answer to, it stops them itself.

A task container runs for the master that holds the node, and the chain says when that is over:

- **The chain watch ended the miner** (``watch.outcome``: ejected, left, no longer registered,
  registered for another run, rejected): the run's master has given the node's replicas to
  other nodes (or the provider left). What still runs here is a duplicate nobody reads, on the
  provider's GPUs. The miner stops the run's containers before it ends (``ReleaseGuard.on_exit``).
- **Released** (the run ended): the master stops every task and takes the final files of
  persistent ones. A master that is down at the end, and stays down, would leave them running
  for ever: ``grace_s`` after the miner first saw the node Released, it stops what still runs
  (``ReleaseGuard.step``, once). The master's own stop normally comes within a heartbeat.

Only containers that still run (or are being started) are stopped: finished ones go with the
retention rule as before. A persistent replica's files stay in the data dir and are still
served. An ordinary stop of the miner (SIGTERM) stops nothing: a restart adopts what runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prime.chain.types import NodeInfo, NodeStatus
from prime.protocol.tasks import ReplicaState

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 300.0
ACTIVE = frozenset({ReplicaState.PULLING, ReplicaState.RUNNING})


def released(info: NodeInfo | None, run_id: int) -> bool:
    """The node reads Released for ``run_id``: that run ended on chain."""
    return info is not None and info.status == NodeStatus.RELEASED and info.run_id == run_id


def released_too_long(info: NodeInfo | None, run_id: int, released_since: float | None, now: float,
                      grace_s: float) -> bool:
    """The run ended ``grace_s`` or more ago and the miner should stop what its master did not."""
    return released(info, run_id) and released_since is not None and now - released_since >= grace_s


class ReleaseGuard:
    """Reads the chain watch's last record of the node (``last``) and the outcome that ends the
    miner (``ended``: its words; None while there is none); stops the node's running containers
    through ``converger.stop_task`` (a stop the miner asked for: never read as Lost)."""

    def __init__(self, converger: Any, run_id: int, last: Callable[[], NodeInfo | None],
                 ended: Callable[[], str | None], *, grace_s: float = DEFAULT_GRACE_S,
                 say: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.converger = converger
        self.run_id = run_id
        self.last = last
        self.ended = ended
        self.grace_s = grace_s
        self.say = say
        self.clock = clock
        self.released_since: float | None = None
        self.done = False

    async def step(self) -> int:
        """The loop body: past the grace after the run's end, stop what still runs (once)."""
        info = self.last()
        if not released(info, self.run_id):
            self.released_since = None
            return 0
        if self.released_since is None:
            self.released_since = self.clock()
        if self.done or not released_too_long(info, self.run_id, self.released_since, self.clock(), self.grace_s):
            return 0
        self.done = True
        return await self._stop_running(f"run {self.run_id} ended on chain {self.grace_s:g} s ago and no master has stopped them")

    async def on_exit(self) -> int:
        """When the miner ends: stop what runs if the chain's outcome ended it (no master any more)."""
        reason = self.ended()
        return 0 if reason is None else await self._stop_running(reason)

    async def _stop_running(self, reason: str) -> int:
        running = sorted({s.task_id for s in await self.converger.executor.snapshot() if s.state in ACTIVE})
        for task_id in running:
            await self.converger.stop_task(task_id)
        if running:
            line = (f"Stopped {len(running)} task(s) still running on this node ({', '.join(running)}); "
                    f"their files stay in the data dir. Why: {reason.rstrip('.')}.")
            log.warning("%s", line)
            if self.say is not None:
                self.say(line)
        return len(running)
