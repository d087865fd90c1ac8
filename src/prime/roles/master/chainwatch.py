"""Following the registry for one run: chain events in, master state events out.

NodeValidated(approved) / NodeJoined / NodeLeft / NodeEjected of this run become
NodeApprovedOnChain / NodeJoinedOnChain / NodeLeftOnChain / NodeEjectedOnChain (with the block,
so stale facts never undo newer ones); RunEnded of this run is reported to ``on_run_ended``.
The cursor moves only after a batch went through the state (``StateCursor`` stores it in the
same transaction as the changes). The first poll that finds nothing left to read after a start
feeds ``ChainSynced``: no invite goes out before the master's chain view caught up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prime.chain.client import RegistryClient
from prime.chain.events import EventFollower
from prime.chain.types import ChainEvent, Specs
from prime.roles.master.models import NO_HARDWARE
from prime.roles.master.state import (
    ChainSynced,
    Event,
    MasterState,
    NodeApprovedOnChain,
    NodeEjectedOnChain,
    NodeJoinedOnChain,
    NodeLeftOnChain,
)

log = logging.getLogger(__name__)

EVENT_NAMES = ["NodeValidated", "NodeJoined", "NodeLeft", "NodeEjected", "RunEnded"]


class ChainWatcher:
    def __init__(
        self,
        registry: RegistryClient,
        follower: EventFollower,
        run_id: int,
        state: Callable[[], MasterState],
        apply: Callable[[Event], Any],
        *,
        on_run_ended: Callable[[], None] = lambda: None,
        on_event: Callable[[str], None] = lambda name: None,
        max_batches: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.follower = follower
        self.run_id = run_id
        self._state = state
        self._apply = apply
        self._on_run_ended = on_run_ended
        self._on_event = on_event
        self.max_batches = max_batches
        self._clock = clock

    async def step(self) -> int:
        """Read and apply batches until caught up (at most ``max_batches``); returns events applied."""
        applied = 0
        for _ in range(self.max_batches):
            events = await self.follower.poll()
            for event in events:
                if await self._handle(event):
                    applied += 1
            if events:
                await self.follower.commit(events)
            if self.follower.caught_up:
                break
        if self.follower.caught_up and not self._state().chain_synced:
            self._apply(ChainSynced(self._clock()))
            log.info("chain view caught up at block %s; invites may go out", await self.follower.cursor())
        return applied

    async def _handle(self, event: ChainEvent) -> bool:
        args = event.args
        if int(args.get("runId", -1)) != self.run_id:
            return False
        now = self._clock()
        node = args.get("node")
        converted: Event | None = None
        if event.name == "NodeValidated":
            if not args.get("approved"):
                return False
            converted = NodeApprovedOnChain(node, await self._specs(node), now, block=event.block)
        elif event.name == "NodeJoined":
            rec = self._state().nodes.get(node)
            specs = await self._specs(node) if rec is None or rec.hardware == NO_HARDWARE else None
            converted = NodeJoinedOnChain(node, now, specs=specs, block=event.block)
        elif event.name == "NodeLeft":
            converted = NodeLeftOnChain(node, now, block=event.block)
        elif event.name == "NodeEjected":
            converted = NodeEjectedOnChain(node, now, block=event.block)
        elif event.name == "RunEnded":
            log.warning("run %d ended on chain (block %d): no more invites", self.run_id, event.block)
            self._on_run_ended()
            self._on_event(event.name)
            return True
        if converted is None:
            return False
        self._on_event(event.name)
        self._apply(converted)
        return True

    async def _specs(self, node: str) -> Specs:
        return (await self.registry.get_node(node)).specs
