"""Pushing task starts and stops to miners (best effort).

The heartbeat's ``desired`` list is what a miner converges to; a push only saves it the wait
for its next heartbeat. So a failed push is logged and counted, never retried here.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from prime.auth.client import SignedClient
from prime.errors import PeerError
from prime.protocol.heartbeat import DesiredReplica
from prime.roles.master.locator import NodeLocator

log = logging.getLogger(__name__)


class TaskPusher:
    def __init__(self, client: SignedClient, locator: NodeLocator) -> None:
        self.client = client
        self.locator = locator

    async def start(self, node: str, desired: DesiredReplica) -> None:
        """POST {miner}/tasks with the replica's desired entry; PeerError on failure."""
        url = await self.locator.url_for(node)
        try:
            await self.client.request("POST", f"{url}/tasks", audience=node, json=desired.to_json())
        except PeerError as exc:
            await self._maybe_moved(node, url, exc)
            raise

    async def stop(self, node: str, task_id: str) -> None:
        """DELETE {miner}/tasks/{id}; a miner that does not know the task (404) counts as stopped."""
        url = await self.locator.url_for(node)
        try:
            await self.client.request("DELETE", f"{url}/tasks/{quote(task_id, safe='')}", audience=node)
        except PeerError as exc:
            if exc.status == 404:
                return
            await self._maybe_moved(node, url, exc)
            raise

    async def _maybe_moved(self, node: str, url: str, exc: PeerError) -> None:
        if exc.status is None:  # could not connect: ask discovery whether the node moved
            try:
                await self.locator.lookup(node)
            except PeerError:
                pass
