"""Node records as the master keeps them, and the ``NodeView`` it serves (``GET /nodes``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, Literal

from msgspec import Meta

from prime.chain.types import NodeStatus, Specs
from prime.protocol.codec import Answer, ValidationError, decode
from prime.protocol.groups import PortRange
from prime.protocol.heartbeat import Finite, GpuSample
from prime.protocol.tasks import ErrorText, Time

ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$(?!\n)")  # $(?!\n): no trailing newline
Address = Annotated[str, Meta(pattern=ADDRESS_RE.pattern)]
Uint32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Uint64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # msgspec bounds are int64


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


class Hardware(Answer, frozen=True):
    """A node's registered hardware (the chain's ``Specs``) as the master serves it."""

    gpu_count: Uint32
    gpu_model: Annotated[str, Meta(max_length=256)]
    gpu_memory_mib: Uint64
    cpu_cores: Uint32
    ram_mib: Uint64
    disk_gib: Uint64 = 0

    def to_specs(self) -> Specs:
        return Specs(self.gpu_count, self.gpu_model, self.gpu_memory_mib, self.cpu_cores, self.ram_mib, self.disk_gib)


def specs_from_json(data: Any) -> Specs:
    return decode(data, Hardware, "hardware").to_specs()


NO_HARDWARE = Specs(0, "", 0, 0, 0, 0)


@dataclass(frozen=True)
class NodeSample:
    """The latest GPU/load sample a node sent with its heartbeat."""

    at: float
    gpus: tuple[GpuSample, ...] = ()
    load: Mapping[str, float] = field(default_factory=dict)
    task_ports: tuple[int, int] | None = None  # the range its group members may listen on (--task-ports)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at, "gpus": [g.to_json() for g in self.gpus], "load": dict(self.load)}
        if self.task_ports is not None:
            out["task_ports"] = list(self.task_ports)
        return out

    @classmethod
    def from_json(cls, data: Any) -> NodeSample:
        return decode(data, SampleView, "sample").to_sample()


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
        view = decode(data, NodeView, "node")
        return cls(
            address=view.address,
            state=view.state,
            hardware=view.hardware.to_specs() if view.hardware else NO_HARDWARE,
            chain_status=NodeStatus[view.chain_status.upper()] if view.chain_status else None,
            chain_block=view.chain_block,
            url=view.url,
            approved_at=view.approved_at,
            invited_at=view.invited_at,
            invite_expiry=view.invite_expiry,
            invite_failures=view.invite_failures,
            next_invite_at=view.next_invite_at,
            invites_sent=view.invites_sent,
            member_since=view.member_since,
            last_heartbeat=view.last_heartbeat,
            state_since=view.state_since,
            last_error=view.last_error,
            last_sample=view.last_sample.to_sample() if view.last_sample else None,
        )


class SampleView(Answer, frozen=True):
    at: Time
    gpus: tuple[GpuSample, ...] = ()
    load: dict[str, Finite] | None = None
    task_ports: PortRange | None = None

    def to_sample(self) -> NodeSample:
        return NodeSample(self.at, self.gpus, self.load or {}, self.task_ports)


ChainStatusLabel = Literal["none", "registered", "approved", "rejected", "active", "left", "ejected", "released"]


class NodeView(Answer, frozen=True):
    """A node as a master serves it (``GET /nodes``)."""

    address: Address
    state: NodeState
    joined_on_chain: bool = False
    chain_status: ChainStatusLabel | None = None
    chain_block: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    hardware: Hardware | None = None
    url: Annotated[str, Meta(max_length=2048)] | None = None
    approved_at: Time | None = None
    invited_at: Time | None = None
    invite_expiry: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    invite_failures: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    next_invite_at: Time | None = None
    invites_sent: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0
    member_since: Time | None = None
    last_heartbeat: Time | None = None
    state_since: Time | None = None
    last_error: ErrorText | None = None
    last_sample: SampleView | None = None


class NodeList(Answer, frozen=True):
    """``GET /nodes``."""

    nodes: tuple[NodeView, ...]


def normalize_address(address: str) -> str:
    """The checksum form of an Ethereum address (so chain events, signers and URLs agree)."""
    from eth_utils.address import to_checksum_address  # pure hashing

    if not isinstance(address, str) or not ADDRESS_RE.match(address):
        raise ValidationError("address", f"{address!r} is not a 0x-prefixed 40-hex-digit address.")
    return to_checksum_address(address)
