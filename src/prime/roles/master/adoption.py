"""Following the run's masters on chain, and adopting the nodes of a removed master.

The shell around ``membership.Membership`` (the pure rule of which master holds which node):

- at start, ``load()`` rebuilds the membership from the run's whole history (MasterAdded,
  MasterRemoved, NodeJoined, NodeLeft, NodeEjected, filtered by run id on the RPC);
- the chain watcher hands every later event to ``observe()`` before it handles it itself;
- a node that comes to this master (its master was removed) is adopted: the master records it
  as a member (``NodeJoinedOnChain``) and re-invites it (a signed invite, no second joinRun: the
  node is active already); ``step()`` retries an invite the node did not take, with backoff;
- a node that goes from this master to another (this master was removed) is no member here any
  more (``NodeLeftOnChain``): its heartbeats are refused and it is never judged or ejected here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

from prime.chain.events import read_run_events
from prime.chain.types import ChainEvent, NodeStatus
from prime.errors import PrimeError
from prime.protocol.nodes import NO_HARDWARE
from prime.roles.master.membership import EVENT_NAMES, HolderChange, Membership
from prime.roles.master.state import MastershipChanged, MasterState, NodeJoinedOnChain, NodeLeftOnChain

log = logging.getLogger("prime.master")

RETRY_MIN_S = 2.0
RETRY_MAX_S = 60.0


@dataclass
class PendingAdoption:
    node: str
    block: int
    next_try_at: float = 0.0
    failures: int = 0


class Adoption:
    def __init__(
        self,
        registry: Any,
        run_id: int,
        me: str,
        *,
        state: Callable[[], MasterState],
        apply: Callable[[Any], Any],
        invite: Callable[[str, int], Any],  # async (node, expiry) -> ack (InviteSender.send)
        invite_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.run_id = run_id
        self.me = to_checksum_address(me)
        self._state = state
        self._apply = apply
        self._invite = invite
        self.invite_ttl_s = invite_ttl_s
        self.clock = clock
        self.membership = Membership(run_id)
        self.pending: dict[str, PendingAdoption] = {}
        self.adopted: list[str] = []  # nodes whose re-invite was accepted, oldest first

    # -- the view

    def holds(self, node: str) -> bool:
        """Whether this master holds ``node`` (true until the membership is loaded: nothing is known yet)."""
        if self.membership.position is None:
            return True
        return self.membership.holds(self.me, node)

    @property
    def removed(self) -> bool:
        return self.membership.position is not None and not self.membership.is_master(self.me)

    # -- feeding it

    async def load(self) -> int:
        """Rebuild the membership from the run's history; adoptions left unfinished are taken up again."""
        events, head = await read_run_events(self.registry, self.run_id, EVENT_NAMES)
        for event in events:
            self.membership.apply(event)
        if self.membership.position is None:
            self.membership.position = (head, -1)  # nothing happened yet; later events all count
        for node, master in sorted(self.membership.holders.items()):
            joined = self.membership.joined_by.get(node)
            if master == self.me and (joined is None or joined.lower() != self.me.lower()):
                address = to_checksum_address(node)
                rec = self._state().nodes.get(address)
                if rec is None or rec.chain_status != NodeStatus.ACTIVE or rec.last_heartbeat is None:
                    self.pending[address] = PendingAdoption(address, self.membership.position[0])
        log.info("run %d has %d master(s) on chain; this master holds %d node(s)%s", self.run_id,
                 len(self.membership.masters), len(self.membership.held_by(self.me)),
                 f", {len(self.pending)} to adopt" if self.pending else "")
        if self.removed:  # removed while it was down: it invites nobody until it is added back
            self._apply(MastershipChanged(False, self.clock()))
        return len(events)

    def observe(self, event: ChainEvent) -> list[HolderChange]:
        """One chain event, before the watcher handles it (so its NodeJoined asks the new holder)."""
        changes = self.membership.apply(event)
        # Read from the membership, not the event: a replayed or another run's event changes nothing.
        is_master = self.membership.is_master(self.me)
        if event.name in ("MasterRemoved", "MasterAdded") and is_master != self._state().is_master:
            if is_master:
                log.info("this master (%s) was added to run %d on chain (block %d)", self.me, self.run_id, event.block)
            else:
                log.error("this master (%s) was removed from run %d on chain (block %d): its nodes go to the run's "
                          "other masters; it invites, adopts and ejects nobody any more", self.me, self.run_id, event.block)
            self._apply(MastershipChanged(is_master, self.clock()))
        for change in changes:
            self._react(change)
        return changes

    def _react(self, change: HolderChange) -> None:
        node = to_checksum_address(change.node)
        mine_now = change.new is not None and change.new == self.me
        mine_before = change.old is not None and change.old == self.me
        if change.cause == "NodeJoined":
            return  # the watcher handles the join itself (a member here, or another master's node)
        if mine_now and not mine_before:
            log.warning("adopting node %s (%s): re-inviting it, no joinRun needed", node, change.reason)
            self.pending[node] = PendingAdoption(node, change.block)
        elif mine_before and not mine_now and change.cause in ("MasterRemoved", "MasterAdded"):
            log.warning("node %s goes to master %s (%s); it is no member of this master any more", node,
                        change.new or "none", change.reason)
            self.pending.pop(node, None)
            self._apply(NodeLeftOnChain(node, self.clock(), block=change.block))

    # -- the loop

    async def step(self) -> int:
        """Re-invite every node being adopted whose turn it is; returns how many took the invite."""
        done = 0
        for pending in sorted(self.pending.values(), key=lambda p: p.node):
            now = self.clock()
            if now < pending.next_try_at:
                continue
            if not self.membership.holds(self.me, pending.node):
                self.pending.pop(pending.node, None)  # it went elsewhere meanwhile
                continue
            if await self._adopt(pending):
                done += 1
        return done

    async def _adopt(self, pending: PendingAdoption) -> bool:
        node = pending.node
        rec = self._state().nodes.get(node)
        try:
            if rec is None or rec.chain_status != NodeStatus.ACTIVE:
                specs = rec.hardware if rec is not None and rec.hardware != NO_HARDWARE else None
                if specs is None:
                    specs = (await self.registry.get_node(node)).specs
                self._apply(NodeJoinedOnChain(node, self.clock(), specs=specs, block=pending.block))
            expiry = int(math.ceil(self.clock() + self.invite_ttl_s))
            ack = await self._invite(node, expiry)
        except PrimeError as exc:
            pending.failures += 1
            delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(pending.failures - 1, 8))
            pending.next_try_at = self.clock() + delay
            log.info("re-invite of adopted node %s failed (next try in %.0f s): %s", node, delay, exc)
            return False
        self.pending.pop(node, None)
        self.adopted.append(node)
        log.warning("node %s adopted: it took the re-invite at %s (%s)", node, getattr(ack, "url", "?"),
                    "no transaction" if getattr(ack, "tx_hash", None) is None else f"tx {ack.tx_hash}")
        return True
