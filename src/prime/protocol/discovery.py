"""Discovery link: where a node can be reached (the record discovery stores and serves)."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any

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

