"""Inviting an approved node: sign the invite, POST it to the miner, check its acknowledgement.

The invite signature is the one the registry checks in ``joinRun``: the master's EIP-191
signature over ``invite_digest(chain_id, registry, run_id, node, expiry)``. The miner answers
with its own signature over the text ``ack_text(...)`` once it joined (or had already
joined), which proves the invite reached the node's key and not something else at that URL.
Body, answer, digest and text are declared once, in ``prime.protocol.invite``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

from prime.auth.client import SignedClient
from prime.auth.signing import AuthError, recover_message
from prime.chain.client import sign_digest
from prime.errors import PeerError, PrimeError
from prime.protocol.errors import ValidationError
from prime.protocol.invite import InviteAnswer, InviteBody, ack_text, invite_digest
from prime.roles.master.locator import NodeLocator


class InviteError(PrimeError):
    """The invite did not reach the node or the node's answer does not check out."""


@dataclass(frozen=True)
class InviteAck:
    node: str
    run_id: int
    url: str
    tx_hash: str | None


class InviteSender:
    def __init__(
        self,
        client: SignedClient,
        account: Any,
        *,
        chain_id: int,
        registry: str,
        run_id: int,
        master_url: str,
        locator: NodeLocator,
    ) -> None:
        self.client = client
        self.account = account
        self.chain_id = chain_id
        self.registry = to_checksum_address(registry)
        self.run_id = run_id
        self.master_url = master_url
        self.locator = locator

    def invite_body(self, node: str, expiry: int) -> dict[str, Any]:
        signature = sign_digest(self.account, invite_digest(self.chain_id, self.registry, self.run_id, node, expiry))
        return InviteBody(self.run_id, self.master_url, int(expiry), "0x" + signature.hex()).to_json()

    async def send(self, node: str, expiry: int) -> InviteAck:
        """Invite ``node`` (its URL freshly from discovery); InviteError says why it failed."""
        try:
            url = await self.locator.lookup(node)
        except PeerError as exc:
            raise InviteError(f"Could not find node {node} in discovery: {exc}") from None
        try:
            answer = await self.client.request("POST", f"{url}/invite", audience=node, json=self.invite_body(node, expiry))
        except PeerError as exc:
            raise InviteError(f"The invite to {node} at {url} failed: {exc}") from None
        return self.check_ack(node, expiry, url, answer)

    def check_ack(self, node: str, expiry: int, url: str, answer: Any) -> InviteAck:
        if not isinstance(answer, dict):
            raise InviteError(f"Node {node} at {url} answered the invite without a JSON object.")
        try:
            parsed = InviteAnswer.from_json(answer)
        except ValidationError as exc:
            if exc.field == "ack":
                raise InviteError(f"Node {node} answered the invite without a signed acknowledgement.") from None
            raise InviteError(f"Node {node} at {url} answered the invite with a malformed body ({exc}).") from None
        if parsed.node.lower() != node.lower():
            raise InviteError(f"The miner at {url} answered for node {parsed.node!r}, not {node}; discovery may be stale.")
        if parsed.run_id != self.run_id:
            raise InviteError(f"Node {node} acknowledged run {parsed.run_id!r} instead of run {self.run_id}.")
        text = ack_text(self.chain_id, self.registry, self.run_id, node, expiry)
        try:
            signer = recover_message(text, parsed.ack)
            if signer.lower() != node.lower():
                # Tolerate a miner that wrote the addresses in lower case (the text's only free choice).
                signer = recover_message(text.lower(), parsed.ack)
        except AuthError as exc:
            raise InviteError(f"Node {node}'s invite acknowledgement is not a valid signature ({exc.reason}).") from None
        if signer.lower() != node.lower():
            raise InviteError(f"Node {node}'s invite acknowledgement is not signed by the node's key.")
        return InviteAck(node, self.run_id, url, parsed.tx_hash)
