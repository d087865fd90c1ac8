"""Talk to a discovery service: announce this node, look up other nodes.

Every other role uses this module instead of building discovery URLs by hand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from prime.errors import PeerError
from prime.protocol.discovery import UNKNOWN_NODE, NodeAddress, RunNodes
from prime.protocol.errors import ValidationError

if TYPE_CHECKING:  # only for hints: importing the client pulls in aiohttp and signing
    from prime.auth.client import SignedClient


class DiscoveryClient:
    """Signed calls to one discovery service (``base_url``, e.g. a run's discovery_uri).

    Errors (unreachable service, 401/403, malformed answers) raise ``PeerError``.
    """

    def __init__(self, signed_client: SignedClient, base_url: str) -> None:
        self._client = signed_client
        self.base_url = base_url.rstrip("/")

    async def announce(self, ip: str, port: int, run_id: int) -> NodeAddress:
        """Announce the signing node's address for ``run_id``; returns the stored record."""
        answer = await self._client.request(
            "PUT", f"{self.base_url}/nodes", json={"ip": ip, "port": port, "run_id": run_id}
        )
        return self._parse(answer)

    async def get_node(self, address: str) -> NodeAddress | None:
        """The last announced address of ``address``, or None if it never announced."""
        try:
            answer = await self._client.request("GET", f"{self.base_url}/nodes/{quote(address, safe='')}")
        except PeerError as exc:
            # Only the service's own "unknown node" answer means None; any other 404
            # (a wrong base URL, a proxy) is an error the caller should see.
            if exc.status == 404 and isinstance(exc.body, dict) and exc.body.get("error") == UNKNOWN_NODE:
                return None
            raise
        return self._parse(answer)

    async def run_nodes(self, run_id: int) -> list[NodeAddress]:
        """Every node that announced itself for ``run_id`` (callable by a master of that run)."""
        answer = await self._client.request("GET", f"{self.base_url}/runs/{int(run_id)}/nodes")
        try:
            return list(RunNodes.from_json(answer).nodes) if isinstance(answer, dict) else self._no_list(answer)
        except ValidationError as exc:
            raise PeerError(
                f"Discovery at {self.base_url} answered with a malformed node list ({exc}); check that the URL points at a prime discovery service.",
                body=answer,
            ) from None

    def _no_list(self, answer: Any) -> list[NodeAddress]:
        raise PeerError(
            f"Discovery at {self.base_url} answered without a node list; check that the URL points at a prime discovery service.",
            body=answer,
        )

    def _parse(self, answer: Any) -> NodeAddress:
        try:
            return NodeAddress.from_json(answer)
        except ValidationError as exc:
            raise PeerError(
                f"Discovery at {self.base_url} answered with a malformed node record ({exc}); check that the URL points at a prime discovery service.",
                body=answer,
            ) from None
