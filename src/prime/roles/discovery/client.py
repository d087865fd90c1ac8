"""Talk to a discovery service: announce this node, look up other nodes.

Every other role uses this module instead of building discovery URLs by hand.
``NodeAddress`` is also the record the service itself stores and serves, so the
server's JSON and the client's parsing cannot drift apart.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from prime.errors import PeerError

if TYPE_CHECKING:  # only for hints: importing the client pulls in aiohttp and signing
    from prime.auth.client import SignedClient

# The "error" value of the service's 404 for a node that never announced (shared with app.py).
UNKNOWN_NODE = "unknown_node"


@dataclass(frozen=True)
class NodeAddress:
    """Where one node can be reached, as its last signed announcement said."""

    address: str  # the node's checksum address (its identity on chain)
    ip: str  # an IPv4 or IPv6 literal, never a host name
    port: int
    run_id: int
    updated_at: float  # unix seconds of the last announcement

    @property
    def url(self) -> str:
        """Base URL of the node's HTTP API (IPv6 literals in brackets)."""
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> NodeAddress:
        """Parse a record from a peer; ``ValueError`` names the first bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        missing = [name for name in ("address", "ip", "port", "run_id", "updated_at") if name not in data]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        address, ip, port, run_id, updated_at = (data[k] for k in ("address", "ip", "port", "run_id", "updated_at"))
        if not isinstance(address, str) or not address:
            raise ValueError("address must be a non-empty string")
        if not isinstance(ip, str):
            raise ValueError("ip must be a string")
        ipaddress.ip_address(ip)  # raises ValueError for anything but an IP literal
        if not _is_int(port) or not 1 <= port <= 65535:
            raise ValueError("port must be an integer in 1..65535")
        if not _is_int(run_id) or run_id < 0:
            raise ValueError("run_id must be a non-negative integer")
        if isinstance(updated_at, bool) or not isinstance(updated_at, (int, float)):
            raise ValueError("updated_at must be a number")
        return cls(address=address, ip=ip, port=port, run_id=run_id, updated_at=float(updated_at))


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; JSON true must not pass as port 1
    return isinstance(value, int) and not isinstance(value, bool)


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
        nodes = answer.get("nodes") if isinstance(answer, dict) else None
        if not isinstance(nodes, list):
            raise PeerError(
                f"Discovery at {self.base_url} answered without a node list; check that the URL points at a prime discovery service.",
                body=answer,
            )
        return [self._parse(item) for item in nodes]

    def _parse(self, answer: Any) -> NodeAddress:
        try:
            return NodeAddress.from_json(answer)
        except ValueError as exc:
            raise PeerError(
                f"Discovery at {self.base_url} answered with a malformed node record ({exc}); check that the URL points at a prime discovery service.",
                body=answer,
            ) from None
