"""Following the registry for one run: chain events in, master state events out.

NodeValidated(approved) / NodeJoined / NodeLeft / NodeEjected of this run become
NodeApprovedOnChain / NodeJoinedOnChain / NodeLeftOnChain / NodeEjectedOnChain (with the block,
so stale facts never undo newer ones); RunEnded of this run becomes ``RunEnded``.
With an ``adoption`` (adoption.py), MasterAdded / MasterRemoved are followed too and every event
goes through it first: a NodeJoined through another master's invite makes the node that master's
(``NodeLeftOnChain`` here: never judged, scheduled on or ejected by this master), and the nodes of
a removed master are adopted by the one the rule picks (docs/protocol.md, "One master per node").
The cursor moves only after a batch went through the state (``StateCursor`` stores it in the
same transaction as the changes). The first poll that finds nothing left to read after a start
feeds ``ChainSynced``: no invite goes out before the master's chain view caught up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from prime.chain.client import RegistryClient
from prime.chain.events import EventFollower
from prime.chain.types import ChainEvent, Specs
from prime.protocol.nodes import NO_HARDWARE
from prime.roles.master.state import (
    ChainSynced,
    Event,
    MasterState,
    NodeApprovedOnChain,
    NodeEjectedOnChain,
    NodeJoinedOnChain,
    NodeLeftOnChain,
    RunEnded,
)

log = logging.getLogger(__name__)

NODE_EVENT_NAMES = ("NodeValidated", "NodeJoined", "NodeLeft", "NodeEjected")
MASTER_EVENT_NAMES = ("MasterAdded", "MasterRemoved")
EVENT_NAMES = [*NODE_EVENT_NAMES, "RunEnded", *MASTER_EVENT_NAMES]

# Node specs are read from chain for every newly approved node; a master that starts on a run
# with thousands of nodes reads them this many at a time instead of one after the other.
SPEC_READS_IN_FLIGHT = 16


class ChainWatcher:
    def __init__(
        self,
        registry: RegistryClient,
        follower: EventFollower,
        run_id: int,
        state: Callable[[], MasterState],
        apply: Callable[[Event], Any],
        *,
        on_event: Callable[[str], None] = lambda name: None,
        max_batches: int = 50,
        clock: Callable[[], float] = time.time,
        batch: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        adoption: Any | None = None,  # adoption.Adoption: .observe(event), .holds(node)
    ) -> None:
        self.registry = registry
        self.follower = follower
        self.run_id = run_id
        self._state = state
        self._apply = apply
        self._on_event = on_event
        self.max_batches = max_batches
        self._clock = clock
        self._batch = batch
        self.adoption = adoption

    async def step(self) -> int:
        """Read and apply batches until caught up (at most ``max_batches``); returns events applied."""
        applied = 0
        for _ in range(self.max_batches):
            events = await self.follower.poll()
            specs = await self._prefetch_specs(events)
            with self._batch():  # one write for the batch, together with the cursor (commit)
                for event in events:
                    if await self._handle(event, specs):
                        applied += 1
            if events:
                await self.follower.commit(events)
            if self.follower.caught_up:
                break
        if self.follower.caught_up and not self._state().chain_synced:
            self._apply(ChainSynced(self._clock()))
            log.info("chain view caught up at block %s; invites may go out", await self.follower.cursor())
        return applied

    async def _prefetch_specs(self, events: list[ChainEvent]) -> dict[str, Specs]:
        """The specs every event of the batch will need (see ``_node_needing_specs``), read concurrently."""
        wanted = {node for node in map(self._node_needing_specs, events) if node is not None}
        if len(wanted) < 2:
            return {}  # nothing to gain; _handle reads a single one itself
        limit = asyncio.Semaphore(SPEC_READS_IN_FLIGHT)

        async def read(node: str) -> tuple[str, Specs]:
            async with limit:
                return node, await self._specs(node)

        return dict(await asyncio.gather(*(read(node) for node in sorted(wanted))))

    def _node_needing_specs(self, event: ChainEvent) -> str | None:
        """The node whose specs handling ``event`` needs: one of this run approved, or joined
        without the master knowing its hardware yet; None for every other event."""
        args = event.args
        if int(args.get("runId", -1)) != self.run_id:
            return None
        if event.name == "NodeValidated" and args.get("approved"):
            return str(args["node"])
        if event.name == "NodeJoined":
            node = str(args["node"])
            rec = self._state().nodes.get(node)
            if rec is None or rec.hardware == NO_HARDWARE:
                return node
        return None

    async def _read_specs(self, node: str, prefetched: Mapping[str, Specs] | None) -> Specs:
        return (prefetched or {}).get(node) or await self._specs(node)

    async def _handle(self, event: ChainEvent, prefetched: Mapping[str, Specs] | None = None) -> bool:
        args = event.args
        if int(args.get("runId", -1)) != self.run_id:
            return False
        now = self._clock()
        converted: Event | None = None
        if self.adoption is not None:
            self.adoption.observe(event)
        if event.name in MASTER_EVENT_NAMES:
            self._on_event(event.name)
            return self.adoption is not None
        if event.name == "RunEnded":
            log.warning("run %d ended on chain (block %d): every node of the run is released; no more invites or "
                        "ejections; every task is stopped (persistent ones get their final sync) and their files "
                        "and logs stay readable", self.run_id, event.block)
            converted = RunEnded(now)
        elif event.name in NODE_EVENT_NAMES:
            node = str(args["node"])  # each of these events names its node
            if event.name == "NodeValidated":
                if not args.get("approved"):
                    return False
                converted = NodeApprovedOnChain(node, await self._read_specs(node, prefetched), now, block=event.block)
            elif event.name == "NodeJoined" and self.adoption is not None and not self.adoption.holds(node):
                log.info("node %s joined run %d with the invite of master %s, which holds it; not a member here",
                         node, self.run_id, args.get("master"))
                converted = NodeLeftOnChain(node, now, block=event.block)
            elif event.name == "NodeJoined":
                specs = await self._read_specs(node, prefetched) if self._node_needing_specs(event) else None
                converted = NodeJoinedOnChain(node, now, specs=specs, block=event.block)
            elif event.name == "NodeLeft":
                converted = NodeLeftOnChain(node, now, block=event.block)
            elif event.name == "NodeEjected":
                converted = NodeEjectedOnChain(node, now, block=event.block)
        if converted is None:
            return False
        self._on_event(event.name)
        self._apply(converted)
        return True

    async def _specs(self, node: str) -> Specs:
        return (await self.registry.get_node(node)).specs
