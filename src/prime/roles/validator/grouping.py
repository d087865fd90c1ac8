"""Joint challenges: nodes that share an address or a GPU UUID are challenged at the same moment.

Every answer to a signed challenge is signed by the node's own key, so a prover relaying for
several identities must forward each challenge to the one real prover and back; challenged
together, it has to compute all of them within one time bound, and all but one fail it.

How: each validation, once it knows where its node is (the IP its discovery announcement
names, after the reachability probe) and which GPU UUIDs this validator recorded for the
node, waits at ``JointStart.wait_turn``. Arrivals that share an IP or a UUID (transitively)
form one group (``joint_groups``); a group starts — every member's challenge sent in the same
event-loop step — once ``settle_s`` passed since its latest arrival (the dispatcher waits that
long to gather nodes announced behind one address), and never later than ``max_wait_s`` after
its first (``due_groups``). A node alone waits ``settle_s``; nothing waits longer than
``max_wait_s``.

Limits, stated: a waiting validation keeps its dispatch slot, so one group holds at most the
validator's ``--concurrency`` members at a time (more identities behind one address are
challenged in rounds of that many, each round within one bound). Only validations pending at
about the same time are grouped: identities registered apart are held apart by the GPU UUID
rule (prime.roles.validator.uniqueness), not by this.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("prime.validator.grouping")

TOLERANCE_S = 0.005  # timers may fire a little early


@dataclass(frozen=True)
class Arrival:
    """One validation ready to be challenged: ``key`` unique, where its node is, its known GPUs."""

    key: str
    ip: str | None
    uuids: frozenset[str] = field(default_factory=frozenset)
    at: float = 0.0
    label: str = ""  # the node, for logs


def joint_groups(arrivals: Sequence[Arrival]) -> list[list[Arrival]]:
    """Arrivals joined by a shared IP or GPU UUID (transitively), each group in arrival order,
    groups ordered by their first arrival."""
    parent = list(range(len(arrivals)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, str], int] = {}
    for i, arrival in enumerate(arrivals):
        marks = [("ip", arrival.ip)] if arrival.ip else []
        marks += [("uuid", u) for u in sorted(arrival.uuids)]
        for mark in marks:
            if mark in owner:
                parent[root(i)] = root(owner[mark])
            else:
                owner[mark] = i
    groups: dict[int, list[Arrival]] = {}
    for i, arrival in enumerate(arrivals):
        groups.setdefault(root(i), []).append(arrival)
    ordered = [sorted(members, key=lambda a: a.at) for members in groups.values()]
    return sorted(ordered, key=lambda members: members[0].at)


def due_groups(arrivals: Sequence[Arrival], now: float, *, settle_s: float, max_wait_s: float) -> list[list[Arrival]]:
    """The groups to start now: settled (no new member for ``settle_s``) or waited ``max_wait_s``."""
    due = []
    for group in joint_groups(arrivals):
        latest, first = max(a.at for a in group), min(a.at for a in group)
        if now - latest >= settle_s - TOLERANCE_S or now - first >= max_wait_s - TOLERANCE_S:
            due.append(group)
    return due


class JointStart:
    """Where validations wait for the others of their group; ``wait_turn`` returns when it starts."""

    def __init__(self, *, settle_s: float, max_wait_s: float) -> None:
        self.settle_s = max(0.0, settle_s)
        self.max_wait_s = max(self.settle_s, max_wait_s)
        self._waiting: dict[str, tuple[Arrival, asyncio.Future[list[str]]]] = {}
        self._ids = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def wait_turn(self, ip: str | None, uuids: Iterable[str] = (), *, label: str = "") -> list[str]:
        """Wait until this validation's group starts; the labels of the group it started with."""
        if self.settle_s <= 0:
            return [label]
        loop = asyncio.get_running_loop()
        arrival = Arrival(f"{next(self._ids)}", ip, frozenset(uuids), loop.time(), label)
        future: asyncio.Future[list[str]] = loop.create_future()
        self._waiting[arrival.key] = (arrival, future)
        loop.call_later(self.settle_s, self._release)
        loop.call_later(self.max_wait_s, self._release)
        try:
            return await future
        finally:
            self._waiting.pop(arrival.key, None)  # cancelled while waiting: out of its group

    def _release(self) -> None:
        if not self._waiting:
            return
        now = asyncio.get_running_loop().time()
        arrivals = [arrival for arrival, _ in self._waiting.values()]
        for group in due_groups(arrivals, now, settle_s=self.settle_s, max_wait_s=self.max_wait_s):
            labels = [a.label for a in group]
            if len(group) > 1:
                log.info("challenging %d nodes at the same moment (a shared address or GPU): %s",
                         len(group), ", ".join(labels))
            for member in group:
                _, future = self._waiting.pop(member.key)
                if not future.done():
                    future.set_result(labels)
