"""Which master holds which node: one master per node at a time, decided from the chain alone.

The rule (docs/protocol.md, "One master per node"), applied to the run's events in chain order:

- ``NodeJoined(run, node, master)``: the node's holder is ``master``, the master whose invite it used.
- ``MasterRemoved(run, m)``: every node ``m`` held goes to the remaining master with the lowest
  ``keccak256(node ‖ master)`` (the two 20-byte addresses); none when no master remains.
- ``MasterAdded(run, m)``: every node without a holder gets one by the same lowest-hash rule.
- ``NodeLeft`` / ``NodeEjected``: the node has no holder any more.

Every master replays the same events, so all of them compute the same holder for every node
without talking to each other; only the holder invites (re-invites), schedules on, judges and
ejects a node, and the miner obeys only its holder (it refuses an invite from another master
while its master is still a master of the run). ``Membership`` is pure: chain events in,
``HolderChange``s out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from eth_utils import keccak, to_checksum_address

from prime.chain.types import ChainEvent

EVENT_NAMES = ("MasterAdded", "MasterRemoved", "NodeJoined", "NodeLeft", "NodeEjected")


def _key(address: str) -> str:
    return address.lower()


def successor(node: str, masters: Iterable[str]) -> str | None:
    """The master among ``masters`` with the lowest keccak256(node ‖ master); None when there is none."""
    node_bytes = bytes.fromhex(_key(node)[2:])
    best: tuple[bytes, str] | None = None
    for master in masters:
        score = keccak(node_bytes + bytes.fromhex(_key(master)[2:]))
        if best is None or score < best[0]:
            best = (score, master)
    return best[1] if best is not None else None


@dataclass(frozen=True)
class HolderChange:
    node: str
    old: str | None
    new: str | None
    reason: str
    block: int
    cause: str  # the event's name


@dataclass
class Membership:
    """The run's masters and every node's holder, as of the last event applied (``position``)."""

    run_id: int
    masters: list[str] = field(default_factory=list)      # checksummed, in the order they were added
    holders: dict[str, str] = field(default_factory=dict)  # node (lower case) -> master (checksummed)
    joined_by: dict[str, str] = field(default_factory=dict)  # node (lower case) -> master of its NodeJoined
    orphans: set[str] = field(default_factory=set)          # nodes (lower case) left without a holder
    position: tuple[int, int] | None = None

    def holder(self, node: str) -> str | None:
        return self.holders.get(_key(node))

    def holds(self, master: str, node: str) -> bool:
        held = self.holder(node)
        return held is not None and _key(held) == _key(master)

    def is_master(self, account: str) -> bool:
        return any(_key(m) == _key(account) for m in self.masters)

    def held_by(self, master: str) -> list[str]:
        return sorted(n for n, m in self.holders.items() if _key(m) == _key(master))

    def apply(self, event: ChainEvent) -> list[HolderChange]:
        """Fold one event of the run in; events at or before ``position`` change nothing (replays).
        Returns the nodes whose holder changed."""
        return [replace(c, cause=event.name) for c in self._apply(event) if c.old != c.new]

    def _apply(self, event: ChainEvent) -> list[HolderChange]:
        if int(event.args.get("runId", -1)) != self.run_id or event.name not in EVENT_NAMES:
            return []
        if self.position is not None and event.position <= self.position:
            return []
        self.position = event.position
        args, block = event.args, event.block
        if event.name == "MasterAdded":
            master = to_checksum_address(args["master"])
            if not self.is_master(master):
                self.masters.append(master)
            return [self._set(node, successor(node, self.masters), "a master was added to a run whose node had none",
                              block) for node in sorted(self.orphans)]
        if event.name == "MasterRemoved":
            gone = to_checksum_address(args["master"])
            self.masters = [m for m in self.masters if _key(m) != _key(gone)]
            return [self._set(node, successor(node, self.masters), f"its master {gone} was removed from the run", block)
                    for node in self.held_by(gone)]
        node = _key(args["node"])
        if event.name == "NodeJoined":
            master = to_checksum_address(args["master"])
            self.joined_by[node] = master
            return [self._set(node, master, "joined the run with its invite", block)]
        self.joined_by.pop(node, None)  # NodeLeft, NodeEjected
        return [self._set(node, None, f"{'left' if event.name == 'NodeLeft' else 'ejected from'} the run", block,
                          orphan=False)]

    def _set(self, node: str, master: str | None, reason: str, block: int, *, orphan: bool = True) -> HolderChange:
        node = _key(node)
        old = self.holders.get(node)
        if master is None:
            self.holders.pop(node, None)
            if orphan:
                self.orphans.add(node)
            else:
                self.orphans.discard(node)
        else:
            self.holders[node] = master
            self.orphans.discard(node)
        return HolderChange(node, old, master, reason, block, "")
