"""Where a node's miner listens: the master's record, else the run's discovery service.

Lookups are cached for a few seconds and shared between concurrent askers, so a burst of
pushes, log reads and syncs to one node costs one discovery request. A lookup that finds a
new address reports it (``on_resolved``) so the state keeps the latest URL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prime.auth.permissions import TTLCache
from prime.clients.discovery import DiscoveryClient
from prime.errors import PeerError


class NodeUnreachable(PeerError):
    """The master has no address for a node (it never announced itself to discovery)."""


class NodeLocator:
    def __init__(
        self,
        discovery: DiscoveryClient,
        run_id: int,
        known_url: Callable[[str], str | None],
        on_resolved: Callable[[str, str], None],
        *,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.discovery = discovery
        self.run_id = run_id
        self._known_url = known_url
        self._on_resolved = on_resolved
        self._cache = TTLCache(ttl_s, clock=clock)

    async def lookup(self, node: str) -> str:
        """The node's URL as discovery has it now (cached briefly); NodeUnreachable if it never announced."""

        async def fetch() -> str:
            record = await self.discovery.get_node(node)
            if record is None:
                raise NodeUnreachable(
                    f"Node {node} has not announced its address to discovery at {self.discovery.base_url}; "
                    "it must run `prime miner start` so it announces itself."
                )
            if record.run_id != self.run_id:
                raise NodeUnreachable(
                    f"Node {node} announced itself for run {record.run_id}, not run {self.run_id}."
                )
            return record.url

        url = await self._cache.get(node.lower(), fetch)
        if url != self._known_url(node):
            self._on_resolved(node, url)
        return url

    async def url_for(self, node: str) -> str:
        """The last known URL of ``node`` (from its invite or an earlier lookup), else discovery's.

        After a call to that URL failed to connect, ``lookup`` asks discovery whether the node moved.
        """
        return self._known_url(node) or await self.lookup(node)
