"""The environment of every member of a group task, computed from its placement (pure, no I/O).

Issue 15. A group attempt is a list of ``Member``s in rank order (rank 0 first). Each member's
node offered a port range ``(first, last)``; rank 0's ``first`` is the rendezvous port
(``MASTER_PORT``) and every member's ``first + 1`` is its peer-to-peer port (so a range must hold
at least ``PORTS_NEEDED`` ports). Every member of the attempt gets::

    NODE_RANK            its rank, 0 .. NNODES-1
    NNODES               members in this attempt
    GPUS_PER_NODE        the spec's GPUs per node
    WORLD_SIZE           NNODES * GPUS_PER_NODE (one process a node on a group without GPUs)
    MASTER_ADDR          rank 0's address
    MASTER_PORT          rank 0's rendezvous port
    NODE_IPS             every member's address, rank order, comma-separated
    PRIME_GROUP_ID       the group's id
    PRIME_GROUP_ATTEMPT  the attempt, 0 for the first start, +1 for each restart
    PRIME_PEERS          JSON list, rank order: {"rank", "node", "address", "port", "gpus", "gpu_model"}
    PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE, PET_MASTER_ADDR, PET_MASTER_PORT
                         the same for torchrun, which reads PET_<OPTION> as its options' defaults:
                         a plain ``torchrun train.py`` joins the group with no flags and no wrapper
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from prime.protocol.groups import MEMBER_PORTS as PORTS_NEEDED  # rendezvous (used on rank 0) + peer-to-peer


@dataclass(frozen=True)
class Member:
    """One placed member of a group attempt."""

    rank: int
    node: str
    address: str
    gpu_model: str
    ports: tuple[int, int]  # the node's offered port range, inclusive

    @property
    def rendezvous_port(self) -> int:
        return self.ports[0]

    @property
    def peer_port(self) -> int:
        return self.ports[0] + 1


def ports_fit(ports: tuple[int, int]) -> bool:
    """Whether an offered range (first, last) is valid and holds the ports a member needs."""
    first, last = ports
    return 1 <= first <= last <= 65535 and last - first + 1 >= PORTS_NEEDED


def peers_json(members: Sequence[Member], gpus_per_node: int) -> str:
    """PRIME_PEERS: every member in rank order (compact, key order fixed)."""
    peers = [
        {"rank": m.rank, "node": m.node, "address": m.address, "port": m.peer_port, "gpus": gpus_per_node, "gpu_model": m.gpu_model}
        for m in sorted(members, key=lambda m: m.rank)
    ]
    return json.dumps(peers, separators=(",", ":"))


def member_envs(group_id: str, attempt: int, members: Sequence[Member], gpus_per_node: int) -> dict[int, dict[str, str]]:
    """The environment of each member (by rank). ``members`` must hold ranks 0 .. len-1 exactly once."""
    ordered = sorted(members, key=lambda m: m.rank)
    if [m.rank for m in ordered] != list(range(len(ordered))) or not ordered:
        raise ValueError("A group attempt needs members with ranks 0 .. n-1, each once.")
    master = ordered[0]
    shared = {
        "NNODES": str(len(ordered)),
        "GPUS_PER_NODE": str(gpus_per_node),
        "WORLD_SIZE": str(len(ordered) * max(1, gpus_per_node)),
        "MASTER_ADDR": master.address,
        "MASTER_PORT": str(master.rendezvous_port),
        "NODE_IPS": ",".join(m.address for m in ordered),
        "PRIME_GROUP_ID": group_id,
        "PRIME_GROUP_ATTEMPT": str(attempt),
        "PRIME_PEERS": peers_json(ordered, gpus_per_node),
    }
    shared.update({
        "PET_NNODES": shared["NNODES"], "PET_NPROC_PER_NODE": str(max(1, gpus_per_node)),
        "PET_MASTER_ADDR": master.address, "PET_MASTER_PORT": shared["MASTER_PORT"],
    })
    return {m.rank: {"NODE_RANK": str(m.rank), "PET_NODE_RANK": str(m.rank), **shared} for m in ordered}
