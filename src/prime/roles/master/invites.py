"""Inviting an approved node: sign the invite, POST it to the miner, check its acknowledgement.

The invite signature is the one the registry checks in ``joinRun``: the master's EIP-191
signature over ``invite_digest(chain_id, registry, run_id, node, expiry)``. The miner answers
with its own signature over the text ``invite_ack_text(...)`` once it joined (or had already
joined), which proves the invite reached the node's key and not something else at that URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

from prime.auth.client import SignedClient
from prime.auth.signing import AuthError, recover_message
from prime.chain.client import invite_digest, sign_digest
from prime.errors import PeerError, PrimeError
from prime.roles.master.locator import NodeLocator

ACK_PROTOCOL = "prime-invite-ack-v1"


class InviteError(PrimeError):
    """The invite did not reach the node or the node's answer does not check out."""


def invite_ack_text(chain_id: int, registry: str, run_id: int, node: str, expiry: int) -> str:
    """What the node signs to acknowledge an invite (addresses in checksum form)."""
    return f"{ACK_PROTOCOL}\n{chain_id}\n{to_checksum_address(registry)}\n{run_id}\n{to_checksum_address(node)}\n{expiry}"


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
        return {"run_id": self.run_id, "master_url": self.master_url, "expiry": int(expiry),
                "signature": "0x" + signature.hex()}

    async def send(self, node: str, expiry: int) -> InviteAck:
        """Invite ``node`` (its URL freshly from discovery); InviteError says why it failed."""
        try:
            url = await self.locator.lookup(node)
        except PeerError as exc:
            raise InviteError(f"Could not find node {node} in discovery: {exc}") from None
        try:
            answer = await self.client.request("POST", f"{url}/invite", json=self.invite_body(node, expiry))
        except PeerError as exc:
            raise InviteError(f"The invite to {node} at {url} failed: {exc}") from None
        return self.check_ack(node, expiry, url, answer)

    def check_ack(self, node: str, expiry: int, url: str, answer: Any) -> InviteAck:
        if not isinstance(answer, dict):
            raise InviteError(f"Node {node} at {url} answered the invite without a JSON object.")
        claimed, run_id, ack = answer.get("node"), answer.get("run_id"), answer.get("ack")
        if not isinstance(claimed, str) or claimed.lower() != node.lower():
            raise InviteError(f"The miner at {url} answered for node {claimed!r}, not {node}; discovery may be stale.")
        if run_id != self.run_id:
            raise InviteError(f"Node {node} acknowledged run {run_id!r} instead of run {self.run_id}.")
        if not isinstance(ack, str):
            raise InviteError(f"Node {node} answered the invite without a signed acknowledgement.")
        text = invite_ack_text(self.chain_id, self.registry, self.run_id, node, expiry)
        try:
            signer = recover_message(text, ack)
            if signer.lower() != node.lower():
                # Tolerate a miner that wrote the addresses in lower case (the text's only free choice).
                signer = recover_message(text.lower(), ack)
        except AuthError as exc:
            raise InviteError(f"Node {node}'s invite acknowledgement is not a valid signature ({exc.reason}).") from None
        if signer.lower() != node.lower():
            raise InviteError(f"Node {node}'s invite acknowledgement is not signed by the node's key.")
        tx_hash = answer.get("tx_hash")
        return InviteAck(node, self.run_id, url, tx_hash if isinstance(tx_hash, str) else None)
