"""The master's real effects (``service.MasterEffects``): signed HTTP to miners, the blob store, the chain.

Each effect the core waits for turns its outcome into the event it produced: an invite into
``InviteSent`` / ``InviteFailed``, a storage sync into ``SyncSucceeded`` / ``SyncFailed``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from prime.chain.types import Specs
from prime.errors import PrimeError
from prime.protocol.heartbeat import DesiredReplica
from prime.roles.master.dispatch import TaskPusher
from prime.roles.master.events import InviteFailed, InviteSent, SendInvite, SyncFailed, SyncStorage, SyncSucceeded
from prime.roles.master.invites import InviteSender
from prime.roles.master.sync import StorageSync

log = logging.getLogger("prime.master")


class NetworkEffects:
    def __init__(
        self,
        invites: InviteSender,
        pusher: TaskPusher,
        storage: StorageSync,
        chain_member: Callable[[str], Awaitable[Specs | None]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.invites = invites
        self.pusher = pusher
        self.storage = storage
        self._chain_member = chain_member
        self._clock = clock

    async def send_invite(self, ins: SendInvite) -> InviteSent | InviteFailed:
        try:
            ack = await self.invites.send(ins.node, ins.expiry)
        except PrimeError as exc:
            return InviteFailed(ins.node, self._clock(), str(exc), ins.expiry)
        log.info("invite to %s accepted at %s (join tx %s)", ins.node, ack.url, ack.tx_hash or "none: already a member")
        return InviteSent(ins.node, ins.expiry, self._clock(), ack.url)

    async def push_start(self, node: str, desired: DesiredReplica) -> None:
        await self.pusher.start(node, desired)

    async def push_stop(self, node: str, task_id: str) -> None:
        await self.pusher.stop(node, task_id)

    async def sync_storage(self, ins: SyncStorage) -> SyncSucceeded | SyncFailed:
        return await self.storage.sync(ins)

    async def chain_member(self, node: str) -> Specs | None:
        return await self._chain_member(node)
