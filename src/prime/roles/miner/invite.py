"""POST /invite: a master of the run asks the node to join it.

The node trusts nothing in the request until the chain agrees: the request's signer must
be the signer of the invite itself, the invite must be for this node's run and not
expired, and the registry must say (asked now, not from a cache) that the signer is a
master of that run. Only then does the provider key send ``joinRun``; a node that is
already active in the run answers the same acknowledgement without a transaction, so a
master may safely repeat an invite. The master's URL is persisted so a restarted miner
resumes its heartbeats without a new invite.

One master per node (docs/protocol.md): while the node's master is a master of the run, an
invite from another master is refused (409 ``has_master``); once it is not (removed on chain),
another master's invite adopts the node — no second joinRun, the node is active already.

The acknowledgement is the node's EIP-191 signature of
``prime-invite-ack-v1\\n{chain_id}\\n{registry}\\n{run_id}\\n{node}\\n{expiry}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from eth_utils import to_checksum_address

from prime.auth.middleware import SIGNER
from prime.auth.signing import sign_message
from prime.chain.client import RevertError, recover_digest_signer
from prime.chain.types import NodeStatus
from prime.errors import ChainError
from prime.protocol.errors import InvalidJson, ValidationError
from prime.protocol.invite import InviteAnswer, InviteBody, ack_text, invite_digest
from prime.roles.miner.state import MinerStore
from prime.web import ApiError, json_error

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
UINT64_MAX = 2**64 - 1
_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}$")


class InviteRefused(Exception):
    """Why an invite is not accepted: the HTTP status, error name and detail to answer with."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail

    def response(self) -> web.Response:
        return json_error(self.status, self.error, self.detail)


def valid_master_url(url: str) -> bool:
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH or any(c.isspace() for c in url):
        return False
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query and not parts.fragment


def check_invite(body: InviteBody, *, signer: str, node: str, run_id: int, chain_id: int, registry: str, now: float) -> None:
    """Everything about an invite that needs no chain call (pure); raises ``InviteRefused``."""
    if not valid_master_url(body.master_url):
        raise InviteRefused(400, "invalid_invite", "master_url must be an http(s) URL without query or fragment")
    if not 0 <= body.expiry <= UINT64_MAX:
        raise InviteRefused(400, "invalid_invite", "expiry must be a unix time in seconds")
    if not isinstance(body.signature, str) or not _SIGNATURE.match(body.signature):
        raise InviteRefused(400, "invalid_invite", "signature must be 0x followed by 130 hex digits")
    if body.run_id != run_id:
        raise InviteRefused(403, "wrong_run", f"this node serves run {run_id}, not run {body.run_id}")
    if body.expiry <= now:
        raise InviteRefused(403, "invite_expired", f"the invite expired at {body.expiry}; ask for a fresh one")
    try:
        invite_signer = recover_digest_signer(
            invite_digest(chain_id, registry, body.run_id, node, body.expiry), bytes.fromhex(body.signature[2:])
        )
    except Exception:  # a signature that corresponds to no key
        raise InviteRefused(403, "invalid_signature", "the invite signature does not verify") from None
    if invite_signer.lower() != signer.lower():
        raise InviteRefused(
            403, "signature_mismatch", f"the invite is signed by {invite_signer}, but the request by {signer}"
        )


@dataclass(frozen=True)
class InviteAccepted:
    master: str
    master_url: str
    tx_hash: str | None
    ack: str
    expiry: int


class InviteHandler:
    """Checks invites and joins the run; one at a time, so two invites never send two joinRun."""

    def __init__(
        self,
        *,
        node_account: Any,
        registry: Any,
        provider_registry: Any,
        run_id: int,
        store: MinerStore,
        on_joined: Callable[[InviteAccepted], None] | None = None,
        on_master_gone: Callable[[str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_account = node_account
        self.registry = registry
        self.provider_registry = provider_registry
        self.run_id = run_id
        self.store = store
        self.on_joined = on_joined
        self.on_master_gone = on_master_gone
        self.clock = clock
        self._lock = asyncio.Lock()

    async def accept(self, body: InviteBody, signer: str) -> InviteAccepted:
        """Verify and act on one invite; ``InviteRefused`` says why not."""
        node = self.node_account.address
        check_invite(
            body, signer=signer, node=node, run_id=self.run_id,
            chain_id=self.registry.chain_id, registry=self.registry.address, now=self.clock(),
        )
        try:
            is_master = await self.registry.is_master(body.run_id, signer)  # fresh: never from a cache
        except ChainError as exc:
            raise InviteRefused(503, "chain_unavailable", f"could not check the signer on chain: {exc}") from None
        if not is_master:
            raise InviteRefused(403, "not_master", f"{signer} is not a master of run {body.run_id} on chain")
        master_url = body.master_url.rstrip("/")
        async with self._lock:
            await self._check_holder(body.run_id, signer)
            tx_hash = await self._join(body)
            await self.store.joined(master_url, to_checksum_address(signer), tx_hash, self.clock())
        ack = sign_message(self.node_account, ack_text(self.registry.chain_id, self.registry.address, body.run_id, node, body.expiry))
        accepted = InviteAccepted(to_checksum_address(signer), master_url, tx_hash, ack, body.expiry)
        log.info("accepted the invite of master %s (%s) for run %d%s", signer, accepted.master_url, body.run_id,
                 f"; joined in tx {tx_hash}" if tx_hash else "; already active, no transaction")
        if self.on_joined is not None:
            self.on_joined(accepted)
        return accepted

    async def _check_holder(self, run_id: int, signer: str) -> None:
        """Refuse an invite from another master while the node's own master is still a master of the run."""
        current = self.store.state.master
        if current is None or current.lower() == signer.lower():
            return
        try:
            still = await self.registry.is_master(run_id, current)  # fresh, as for the signer
        except ChainError as exc:
            raise InviteRefused(503, "chain_unavailable", f"could not check the node's master on chain: {exc}") from None
        if still:
            raise InviteRefused(
                409, "has_master",
                f"this node is with master {current}, which is still a master of run {run_id}; only it invites the node "
                "(one master per node)",
            )
        log.warning("master %s adopts this node: its master %s is no master of run %d any more", signer, current, run_id)
        if self.on_master_gone is not None:
            await self.on_master_gone(current)

    async def _join(self, body: InviteBody) -> str | None:
        """joinRun unless already active in the run; the tx hash or None."""
        try:
            info = await self.registry.get_node(self.node_account)
        except ChainError as exc:
            raise InviteRefused(503, "chain_unavailable", f"could not read the node's status on chain: {exc}") from None
        if info.status == NodeStatus.ACTIVE and info.run_id == body.run_id:
            return None
        if info.status != NodeStatus.APPROVED or info.run_id != body.run_id:
            raise InviteRefused(
                409, "not_approved",
                f"node {info.node} is {info.status.label} in run {info.run_id}; it can join only once a validator approved it",
            )
        signature = bytes.fromhex(body.signature[2:])
        try:
            result = await self.provider_registry.join_run(body.run_id, self.node_account, body.expiry, signature)
        except RevertError as exc:
            raise InviteRefused(409, "join_refused", str(exc)) from None
        except ChainError as exc:
            raise InviteRefused(503, "chain_unavailable", f"joinRun could not be sent: {exc}") from None
        return result.tx_hash

    async def handle(self, request: web.Request) -> web.Response:
        """Accept an invite from a master of this node's run and join the run on chain.

        Body {run_id, master_url, expiry, signature}: the master's EIP-191 signature over
        invite_digest(chain_id, registry, run_id, node, expiry). The request's signer must be
        the invite's signer and a master of the run on chain (403 otherwise, no transaction).
        Answers {node, run_id, master_url, tx_hash | null, ack}.
        """
        signer: str = request[SIGNER]
        try:
            body = InviteBody.from_json(await request.read())  # typed decoding: no depth to exhaust
        except InvalidJson as exc:
            raise ApiError(400, "invalid_json", str(exc)) from None
        except ValidationError as exc:
            raise ApiError(400, "invalid_body", str(exc)) from None
        try:
            accepted = await self.accept(body, signer)
        except InviteRefused as refused:
            log.warning("refused an invite from %s: %s", signer, refused.detail)
            return refused.response()
        return web.json_response(InviteAnswer(
            self.node_account.address, body.run_id, accepted.master_url, accepted.tx_hash, accepted.ack,
        ).to_json())
