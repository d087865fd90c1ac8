"""The buyer CLI's sentence for a master that cannot reach the chain: the chain, not the master."""

from __future__ import annotations

from unittest.mock import MagicMock

from prime.errors import PeerError
from prime.roles.buyer.master_client import MasterClient


def test_a_chain_unavailable_503_blames_the_chain_not_the_master() -> None:
    client = MasterClient(MagicMock(), "http://127.0.0.1:8000")
    body = {"error": "chain_unavailable", "detail": "could not check permissions on chain: Cannot reach the chain RPC"}
    message = str(client.explain(PeerError("HTTP 503", status=503, body=body), "list tasks"))
    assert "cannot reach the chain" in message and "is running" in message
    assert message.count(". ") == 0 and message.endswith(".")
    other = str(client.explain(PeerError("HTTP 503", status=503, body={"error": "busy", "detail": "full"}), "list tasks"))
    assert "chain" not in other
