"""Node records as the master keeps and serves them."""
from __future__ import annotations

import math
import re
import secrets
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from prime.chain.types import NodeStatus, Specs
from prime.errors import PrimeError

from prime.protocol.errors import *  # noqa
from prime.protocol.errors import _object, _no_unknown, _required, _join, _int, _optional_int, _number, _optional_number, _bool, _text, _optional_text, _list
from prime.protocol.heartbeat import GpuSample, _parse_load
ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
# --- nodes ---------------------------------------------------------------------------------------


class NodeState(StrEnum):
    APPROVED = "Approved"    # approved on chain for our run; an invite is due (or backing off after a failure)
    INVITED = "Invited"      # a signed invite is live (until its expiry)
    JOINED = "Joined"        # a member on chain; no heartbeat yet
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"  # missed heartbeats; keeps its replicas
    DEAD = "Dead"            # missed many heartbeats; its replicas were rescheduled
    LEFT = "Left"            # left, ejected or otherwise out of the run on chain; never invited again


MEMBER_STATES = frozenset({NodeState.JOINED, NodeState.HEALTHY, NodeState.UNHEALTHY, NodeState.DEAD})
# Nodes whose replicas stay where they are (a Dead or Left node's replicas are rescheduled).
HOSTING_STATES = frozenset({NodeState.JOINED, NodeState.HEALTHY, NodeState.UNHEALTHY})


def specs_to_json(specs: Specs) -> dict[str, Any]:
    return {"gpu_count": specs.gpu_count, "gpu_model": specs.gpu_model, "gpu_memory_mib": specs.gpu_memory_mib,
            "cpu_cores": specs.cpu_cores, "ram_mib": specs.ram_mib, "disk_gib": specs.disk_gib}


def specs_from_json(data: Any) -> Specs:
    data = _object(data, "hardware")
    try:
        return Specs(int(data["gpu_count"]), str(data["gpu_model"]), int(data["gpu_memory_mib"]),
                     int(data["cpu_cores"]), int(data["ram_mib"]), int(data.get("disk_gib", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValidationError("hardware", f"Is not a valid hardware record ({exc}).") from None


NO_HARDWARE = Specs(0, "", 0, 0, 0, 0)


@dataclass(frozen=True)
class NodeSample:
    """The latest GPU/load sample a node sent with its heartbeat."""

    at: float
    gpus: tuple[GpuSample, ...] = ()
    load: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "gpus": [g.to_json() for g in self.gpus], "load": dict(self.load)}

    @classmethod
    def from_json(cls, data: Any) -> NodeSample:
        data = _object(data, "sample")
        return cls(
            float(data["at"]),
            tuple(GpuSample.from_json(g, f"gpus[{i}]") for i, g in enumerate(data.get("gpus", []))),
            _parse_load(data.get("load"), "load"),
        )


@dataclass
class NodeRecord:
    """What the master knows about one node: chain view, invite bookkeeping, heartbeat recency."""

    address: str
    state: NodeState
    hardware: Specs = NO_HARDWARE
    chain_status: NodeStatus | None = None   # None: never observed on chain
    chain_block: int | None = None           # block of the chain observation applied last (older ones are ignored)
    url: str | None = None                   # from discovery
    approved_at: float | None = None
    invited_at: float | None = None
    invite_expiry: int | None = None         # unix seconds; set while an invite is live
    invite_failures: int = 0
    next_invite_at: float | None = None      # earliest time of the next invite (backoff)
    invites_sent: int = 0
    member_since: float | None = None        # when the master learned the node is Active on chain
    last_heartbeat: float | None = None
    state_since: float | None = None
    last_error: str | None = None
    last_sample: NodeSample | None = None

    @property
    def joined_on_chain(self) -> bool:
        return self.chain_status == NodeStatus.ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "state": self.state.value,
            "joined_on_chain": self.joined_on_chain,
            "chain_status": self.chain_status.label if self.chain_status is not None else None,
            "chain_block": self.chain_block,
            "hardware": specs_to_json(self.hardware),
            "url": self.url,
            "approved_at": self.approved_at,
            "invited_at": self.invited_at,
            "invite_expiry": self.invite_expiry,
            "invite_failures": self.invite_failures,
            "next_invite_at": self.next_invite_at,
            "invites_sent": self.invites_sent,
            "member_since": self.member_since,
            "last_heartbeat": self.last_heartbeat,
            "state_since": self.state_since,
            "last_error": self.last_error,
            "last_sample": self.last_sample.to_json() if self.last_sample else None,
        }

    @classmethod
    def from_json(cls, data: Any) -> NodeRecord:
        data = _object(data, "node")
        try:
            status = data.get("chain_status")
            sample = data.get("last_sample")
            return cls(
                address=data["address"],
                state=NodeState(data["state"]),
                hardware=specs_from_json(data["hardware"]) if data.get("hardware") else NO_HARDWARE,
                chain_status=NodeStatus[status.upper()] if status else None,
                chain_block=data.get("chain_block"),
                url=data.get("url"),
                approved_at=data.get("approved_at"),
                invited_at=data.get("invited_at"),
                invite_expiry=data.get("invite_expiry"),
                invite_failures=int(data.get("invite_failures", 0)),
                next_invite_at=data.get("next_invite_at"),
                invites_sent=int(data.get("invites_sent", 0)),
                member_since=data.get("member_since"),
                last_heartbeat=data.get("last_heartbeat"),
                state_since=data.get("state_since"),
                last_error=data.get("last_error"),
                last_sample=NodeSample.from_json(sample) if sample else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValidationError("node", f"Is not a valid node record ({exc}).") from None


def normalize_address(address: str) -> str:
    """The checksum form of an Ethereum address (so chain events, signers and URLs agree)."""
    from eth_utils import to_checksum_address  # pure hashing, no network

    if not isinstance(address, str) or not ADDRESS_RE.match(address):
        raise ValidationError("address", f"{address!r} is not a 0x-prefixed 40-hex-digit address.")
    return to_checksum_address(address)
