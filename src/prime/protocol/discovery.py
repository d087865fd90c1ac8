"""Discovery link: where a node can be reached (the record discovery stores and serves)."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import msgspec
from msgspec import Meta

from prime.protocol.codec import Answer, Message
from prime.protocol.nodes import Address
from prime.protocol.tasks import Time

# The "error" value of the service's 404 for a node that never announced.
UNKNOWN_NODE = "unknown_node"

Port = Annotated[int, Meta(ge=1, le=65535)]
RunId = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # inside SQLite's 64-bit INTEGER
IpLiteral = Annotated[str, Meta(max_length=64, description="an IPv4 or IPv6 literal, never a host name")]


class NodeAddress(Message, frozen=True):
    """Where one node can be reached, as its last signed announcement said."""

    address: Address  # the node's checksum address (its identity on chain)
    ip: IpLiteral
    port: Port
    run_id: RunId
    updated_at: Time  # unix seconds of the last announcement

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.ip)
        except ValueError:
            raise ValueError(f"{self.ip[:64]!r} is not an IPv4 or IPv6 address (at ip)") from None

    @property
    def url(self) -> str:
        """Base URL of the node's HTTP API (IPv6 literals in brackets)."""
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"http://{host}:{self.port}"


class Announcement(Message, frozen=True):
    """Body of ``PUT /nodes``: where the signing node listens, for which run.

    The IP is kept in canonical form; unspecified, multicast and zoned IPv6 addresses are
    refused (they mean nothing to another host)."""

    ip: IpLiteral
    port: Port
    run_id: RunId

    def __post_init__(self) -> None:
        try:
            ip = ipaddress.ip_address(self.ip)
        except ValueError:
            raise ValueError(f"{self.ip[:64]!r} is not an IPv4 or IPv6 address; host names are not accepted (at ip)") from None
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(f"{ip} cannot be a node's address (unspecified or multicast) (at ip)")
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise ValueError("must not carry an IPv6 zone index; it only means something on the node itself (at ip)")
        msgspec.structs.force_setattr(self, "ip", str(ip))


class RunNodes(Answer, frozen=True):
    """``GET /runs/{run_id}/nodes``: every announced node of one run."""

    run_id: RunId
    nodes: tuple[NodeAddress, ...]
