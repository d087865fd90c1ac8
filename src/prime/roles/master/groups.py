"""Group tasks (issue 15): gang placement, start barrier, restart and elastic shrink. Pure, no I/O.

``gangs.py`` feeds it from the master's state (``state.handle``). A group task asks for
``--nodes N[:M] --gpus-per-node G [--same-gpu-model] [--start-timeout 5m]``. ``handle(group,
event)`` mutates a ``GroupState`` in place and returns decisions; the same state and events give
the same result.

The shell feeds ``Offers`` (every node that could host a member now: its free GPUs, GPU model,
address and offered port range; ``NodeAvailable`` adds one), ``NodeGone`` when a node dies or
leaves, ``MemberPulling`` / ``MemberStarted`` / ``MemberExited`` / ``MemberLost`` from the
members' reports (each names its attempt: reports of another attempt are ignored), ``Tick``
on the clock, ``ViewResumed`` after a gap in the shell's own view and ``StopRequested``. Phases::

              (>= N nodes fit: take up to M, all at once)          every member started
    Pending ------------------------------------------> Starting --------------------> Running
      |  ^                                                  |                            |
      |  | backoff over                                     +------- a member exits != 0 +
      |  |                                                  |        or its node is gone |
      |  +------------------------ Restarting <-------------+----------------------------+
      |                                |  (StopMembers; restart limit reached -> Failed)
      +-- start timeout --> Failed     |
                                       every member exited 0 (Starting or Running) -> Completed

Rules:
- Gang: ``StartMembers`` carries every member of an attempt, with its rank, node and environment
  (``groupenv``), and is the only start decision; it is returned only once all of them are placed.
  No member of an attempt is started while another member of it is unplaced.
- A node fits with at least G GPUs and a port range of ``groupenv.PORTS_NEEDED`` ports. With
  ``same_gpu_model`` every member shares one model: the one with the most fitting nodes
  (survivors of the last attempt first, ties by model name).
- Ranks are deterministic: on a restart the survivors of the last attempt (their nodes still
  available) are taken first, then the other fitting nodes by node id; the first M are taken.
  A survivor keeps its old rank where that rank is still used (it resumes its own /data where it
  is; so rank 0, MASTER_ADDR, stays if it survived); replacements fill the free ranks, and on a
  shrink the survivors whose rank is past the new size move in first. Ranks are 0 .. k-1, N <= k <= M.
- The start timeout bounds each wait in Pending (the first start and each restart's): no
  placement by then fails the group with a reason saying what it needs and what fits. It also
  bounds Starting for a member its node never reported (a pull counts as reported).
- A member exiting non-zero or lost (``MemberLost``: it could not start, its engine stopped it,
  its node no longer reports it), or the node of a member going away, stops the attempt
  (``StopMembers`` for the other members' nodes still there) and counts a restart; past
  ``max_restarts`` the group fails, else it waits ``backoff_s(restarts)`` in Restarting, then
  places attempt + 1 on survivors plus replacements, down to N nodes (elastic shrink).
- Failed and Completed are final: nothing changes after them, no decision is returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

from prime.protocol.groups import GroupPhase, GroupRequest
from prime.roles.master.groupenv import Member, member_envs, ports_fit

# --- the spec ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSpec:
    """What a group task asks for. ``max_nodes`` None means exactly ``min_nodes``."""

    min_nodes: int
    max_nodes: int | None = None
    gpus_per_node: int = 1
    same_gpu_model: bool = False
    start_timeout_s: float = 300.0
    max_restarts: int = 3
    backoff_base_s: float = 5.0
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ValueError("A group needs at least 1 node.")
        if self.max_nodes is not None and self.max_nodes < self.min_nodes:
            raise ValueError(f"--nodes {self.min_nodes}:{self.max_nodes}: the most nodes cannot be fewer than the least.")
        if self.gpus_per_node < 0:
            raise ValueError("--gpus-per-node cannot be negative.")
        if self.start_timeout_s <= 0:
            raise ValueError("--start-timeout must be more than 0.")
        if self.max_restarts < 0 or self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("max_restarts and the backoff cannot be negative.")

    @classmethod
    def of(cls, request: GroupRequest, gpus_per_node: int) -> GroupSpec:
        """The spec of a task's ``group`` (its ``gpus`` is the GPUs of each member)."""
        return cls(request.nodes, request.max_nodes, gpus_per_node, request.same_gpu_model,
                   request.start_timeout_s, request.max_restarts, request.restart_backoff_s)

    @property
    def most_nodes(self) -> int:
        return self.min_nodes if self.max_nodes is None else self.max_nodes

    def backoff_s(self, restarts: int) -> float:
        """The wait before restart number ``restarts`` (1 = the first): none for the first (a node
        lost is no crash loop: the group should run again within dead detection + a moment), then
        base * 2^(restarts-2), capped."""
        if restarts <= 1:
            return 0.0
        return float(min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(restarts - 2, 60)))


def parse_nodes(text: str) -> tuple[int, int | None]:
    """``--nodes N[:M]`` -> (N, M or None)."""
    least, sep, most = text.strip().partition(":")
    try:
        n = int(least)
        m = int(most) if sep else None
    except ValueError:
        raise ValueError(f"--nodes {text!r}: expected N or N:M (whole numbers).") from None
    return n, m


# --- events (what happened) ----------------------------------------------------------------------


@dataclass(frozen=True)
class NodeAvailable:
    """``node`` can host a member now: free GPUs, their model, its address, an offered port range."""

    node: str
    gpus: int
    gpu_model: str
    address: str
    ports: tuple[int, int]
    at: float


@dataclass(frozen=True)
class Offers:
    """Every node that can host a member now (the shell's fresh view): replaces the last one. A
    member's node missing from it is not gone (``NodeGone`` says that), it only takes no new member."""

    offers: Mapping[str, NodeAvailable]
    at: float


@dataclass(frozen=True)
class NodeGone:
    """``node`` died, left or no longer has room: it cannot host (or keep) a member."""

    node: str
    at: float


@dataclass(frozen=True)
class MemberPulling:
    """A member's node is pulling its image: it is on its way (the start timeout does not end it)."""

    attempt: int
    rank: int
    at: float


@dataclass(frozen=True)
class MemberStarted:
    attempt: int
    rank: int
    at: float


@dataclass(frozen=True)
class MemberExited:
    attempt: int
    rank: int
    code: int
    at: float


@dataclass(frozen=True)
class MemberLost:
    """A member of ``attempt`` ended without an exit code of its own (it could not start, its node's
    engine stopped it, the node no longer reports it): the attempt fails as when it exits non-zero."""

    attempt: int
    rank: int
    why: str
    at: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class ViewResumed:
    """The shell's own view restarted at ``at`` (a master restart, a stalled loop): a wait under the
    start timeout counts from then, as node health does; nodes need a moment to report again."""

    at: float


@dataclass(frozen=True)
class StopRequested:
    """The task was stopped (by its buyer, or its run ended): the group ends Stopped; the shell stops
    the members as it stops any task's replicas."""

    reason: str
    at: float


GroupEvent = Union[
    NodeAvailable, Offers, NodeGone, MemberPulling, MemberStarted, MemberExited, MemberLost, Tick, ViewResumed, StopRequested,
]

# --- decisions (what to do) ----------------------------------------------------------------------


@dataclass(frozen=True)
class MemberLaunch:
    rank: int
    node: str
    env: Mapping[str, str]


@dataclass(frozen=True)
class StartMembers:
    """Start every member of ``attempt`` (all placed): the gang start, the only start decision."""

    group_id: str
    attempt: int
    members: tuple[MemberLaunch, ...]


@dataclass(frozen=True)
class StopMembers:
    """Stop the members of ``attempt`` on ``nodes`` (the attempt is over)."""

    group_id: str
    attempt: int
    nodes: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class FailGroup:
    group_id: str
    reason: str


@dataclass(frozen=True)
class CompleteGroup:
    group_id: str


GroupDecision = Union[StartMembers, StopMembers, FailGroup, CompleteGroup]

# --- state ---------------------------------------------------------------------------------------


FINAL_PHASES = frozenset({GroupPhase.FAILED, GroupPhase.COMPLETED, GroupPhase.STOPPED})
PLACED_PHASES = frozenset({GroupPhase.STARTING, GroupPhase.RUNNING})


@dataclass
class GroupState:
    """One group task. ``members`` is the current attempt's placement (empty unless Starting/Running)."""

    group_id: str
    spec: GroupSpec
    waiting_since: float  # when the current wait in Pending (or Starting) began: the start timeout counts from it
    phase: GroupPhase = GroupPhase.PENDING
    offers: dict[str, NodeAvailable] = field(default_factory=dict)
    attempt: int = -1  # the attempt last started; -1 before the first
    members: tuple[Member, ...] = ()
    last_members: tuple[Member, ...] = ()  # the members of the attempt that ended last (shown after it)
    started: set[int] = field(default_factory=set)  # ranks of this attempt reported started
    heard: set[int] = field(default_factory=set)  # ranks of this attempt reported at all (pulling or started)
    finished: set[int] = field(default_factory=set)  # ranks of this attempt that exited 0
    restarts: int = 0
    restart_at: float | None = None
    survivors: dict[str, int] = field(default_factory=dict)  # nodes of the last attempt still there -> their rank
    reason: str | None = None  # why it failed, or why the last attempt ended
    history: list[tuple[float, int, str, str]] = field(default_factory=list)  # (at, attempt, phase, why): the shell's record


def new_group(group_id: str, spec: GroupSpec, at: float) -> GroupState:
    return GroupState(group_id, spec, waiting_since=at)


def fits(spec: GroupSpec, offer: NodeAvailable) -> bool:
    """Whether ``offer`` can host one member of ``spec`` (GPU model aside)."""
    return offer.gpus >= spec.gpus_per_node and ports_fit(offer.ports)


# --- the transitions -----------------------------------------------------------------------------


def handle(group: GroupState, event: GroupEvent) -> list[GroupDecision]:
    """Apply one event; return what to do. Final groups ignore every event."""
    if group.phase in FINAL_PHASES:
        return []
    if isinstance(event, NodeAvailable):
        group.offers[event.node] = event
        return _try_place(group, event.at) if group.phase == GroupPhase.PENDING else []
    if isinstance(event, Offers):
        group.offers = dict(event.offers)
        return _try_place(group, event.at) if group.phase == GroupPhase.PENDING else []
    if isinstance(event, NodeGone):
        return _node_gone(group, event)
    if isinstance(event, StopRequested):
        _stop(group, event.reason)
        return []
    if isinstance(event, ViewResumed):
        if group.phase in (GroupPhase.PENDING, GroupPhase.STARTING):
            group.waiting_since = max(group.waiting_since, event.at)
        return []
    if isinstance(event, MemberPulling):
        if _current_rank(group, event.attempt, event.rank):
            group.heard.add(event.rank)
        return []
    if isinstance(event, MemberStarted):
        return _member_started(group, event)
    if isinstance(event, MemberExited):
        return _member_exited(group, event)
    if isinstance(event, MemberLost):
        if not _current_rank(group, event.attempt, event.rank) or event.rank in group.finished:
            return []
        node = group.members[event.rank].node
        return _attempt_failed(group, f"rank {event.rank} on {node}: {event.why}", event.at, exited=event.rank)
    return _tick(group, event.now)


def _current_rank(group: GroupState, attempt: int, rank: int) -> bool:
    return group.phase in PLACED_PHASES and attempt == group.attempt and 0 <= rank < len(group.members)


def _node_gone(group: GroupState, event: NodeGone) -> list[GroupDecision]:
    group.offers.pop(event.node, None)
    if group.phase in PLACED_PHASES:
        for m in group.members:
            if m.node == event.node:
                return _attempt_failed(group, f"the node {event.node} of rank {m.rank} is gone", event.at)
    return []


def _member_started(group: GroupState, event: MemberStarted) -> list[GroupDecision]:
    if not _current_rank(group, event.attempt, event.rank):
        return []
    group.started.add(event.rank)
    group.heard.add(event.rank)
    if group.phase == GroupPhase.STARTING and len(group.started) == len(group.members):
        group.phase = GroupPhase.RUNNING
    return []


def _member_exited(group: GroupState, event: MemberExited) -> list[GroupDecision]:
    if not _current_rank(group, event.attempt, event.rank) or event.rank in group.finished:
        return []
    node = group.members[event.rank].node
    if event.code != 0:
        return _attempt_failed(group, f"rank {event.rank} on {node} exited with code {event.code}", event.at, exited=event.rank)
    group.started.add(event.rank)
    group.finished.add(event.rank)
    if len(group.finished) < len(group.members):
        if group.phase == GroupPhase.STARTING and len(group.started) == len(group.members):
            group.phase = GroupPhase.RUNNING
        return []
    group.phase = GroupPhase.COMPLETED
    group.last_members = group.members
    group.members, group.started, group.finished, group.heard = (), set(), set(), set()
    return [CompleteGroup(group.group_id)]


def _attempt_failed(group: GroupState, why: str, at: float, exited: int | None = None) -> list[GroupDecision]:
    """End the current attempt: stop the members still there, then restart after a backoff or fail."""
    to_stop = tuple(
        m.node for m in group.members if m.node in group.offers and m.rank != exited and m.rank not in group.finished
    )
    stop = StopMembers(group.group_id, group.attempt, to_stop, why)
    group.survivors = {m.node: m.rank for m in group.members if m.node in group.offers}
    group.last_members = group.members
    group.members, group.started, group.finished, group.heard = (), set(), set(), set()
    group.restarts += 1
    if group.restarts > group.spec.max_restarts:
        return [stop, _fail(group, f"Group {group.group_id} failed: {why}; the restart limit ({group.spec.max_restarts}) is reached.")]
    group.phase = GroupPhase.RESTARTING
    group.reason = f"attempt {group.attempt} ended: {why}"
    group.restart_at = at + group.spec.backoff_s(group.restarts)
    return [stop]


def _stop(group: GroupState, reason: str) -> None:
    group.last_members = group.members or group.last_members
    group.phase, group.reason = GroupPhase.STOPPED, reason
    group.members, group.started, group.finished, group.heard = (), set(), set(), set()
    group.survivors, group.restart_at = {}, None


def _fail(group: GroupState, reason: str) -> FailGroup:
    group.phase = GroupPhase.FAILED
    group.reason = reason
    group.members, group.survivors, group.restart_at = (), {}, None
    return FailGroup(group.group_id, reason)


def _tick(group: GroupState, now: float) -> list[GroupDecision]:
    silent = sorted(set(range(len(group.members))) - group.heard)
    if group.phase == GroupPhase.STARTING and silent and now - group.waiting_since >= group.spec.start_timeout_s:
        # Placed, but a member's node never even reported it (a pull in progress counts as heard:
        # a large image may take longer than the timeout).
        why = f"rank {silent[0]} was not reported by its node within {_duration(group.spec.start_timeout_s)}"
        return _attempt_failed(group, why, now)
    if group.phase == GroupPhase.RESTARTING:
        if group.restart_at is None or now < group.restart_at:
            return []
        group.phase, group.restart_at, group.waiting_since = GroupPhase.PENDING, None, now
    if group.phase != GroupPhase.PENDING:
        return []
    placed = _try_place(group, now)
    if placed or now - group.waiting_since < group.spec.start_timeout_s:
        return placed
    return [_fail(group, _timeout_reason(group))]


def _candidates(group: GroupState) -> list[NodeAvailable]:
    """The fitting nodes, in rank order: survivors first (old rank order), then by node id; one model if asked."""
    spec = group.spec
    fitting = [o for o in group.offers.values() if fits(spec, o)]
    survivors = group.survivors
    if spec.same_gpu_model and fitting:
        models = sorted({o.gpu_model for o in fitting})

        def weight(model: str) -> tuple[int, int]:
            of_model = [o for o in fitting if o.gpu_model == model]
            return (-sum(o.node in survivors for o in of_model), -min(len(of_model), spec.most_nodes))

        model = min(models, key=lambda m: (weight(m), m))
        fitting = [o for o in fitting if o.gpu_model == model]
    return sorted(fitting, key=lambda o: (0, survivors[o.node], "") if o.node in survivors else (1, 0, o.node))


def _ranked(group: GroupState, chosen: list[NodeAvailable]) -> list[NodeAvailable]:
    """``chosen`` in rank order: a survivor keeps its old rank where that rank is still used (it
    resumes its own /data on its own node); the other ranks are filled by the survivors whose rank
    is gone (elastic shrink), then by the new nodes, in ``chosen``'s order."""
    k = len(chosen)
    old_rank = group.survivors
    ranks: list[NodeAvailable | None] = [None] * k
    movers = []
    for o in chosen:
        rank = old_rank.get(o.node)
        if rank is not None and rank < k:
            ranks[rank] = o
        else:
            movers.append(o)
    holes = iter(movers)
    return [o if o is not None else next(holes) for o in ranks]


def _try_place(group: GroupState, at: float) -> list[GroupDecision]:
    """Gang placement: all members of the next attempt at once, or none."""
    spec = group.spec
    chosen = _ranked(group, _candidates(group)[: spec.most_nodes])
    if len(chosen) < spec.min_nodes:
        return []
    group.attempt += 1
    group.members = tuple(Member(rank, o.node, o.address, o.gpu_model, o.ports) for rank, o in enumerate(chosen))
    group.phase, group.started, group.finished, group.survivors = GroupPhase.STARTING, set(), set(), {}
    group.heard = set()
    group.waiting_since = at  # the start timeout now bounds the wait for every member to come up
    envs = member_envs(group.group_id, group.attempt, group.members, spec.gpus_per_node)
    launches = tuple(MemberLaunch(m.rank, m.node, envs[m.rank]) for m in group.members)
    return [StartMembers(group.group_id, group.attempt, launches)]


def _timeout_reason(group: GroupState) -> str:
    spec = group.spec
    fitting = [o for o in group.offers.values() if fits(spec, o)]
    if spec.same_gpu_model:
        counts = {o.gpu_model: 0 for o in fitting}
        for o in fitting:
            counts[o.gpu_model] += 1
        best = max(counts.values(), default=0)
        have = f"at most {best} of one GPU model fit now"
        kind = " of one GPU model"
    else:
        have = f"{len(fitting)} fit now"
        kind = ""
    what = "start" if group.attempt < 0 else f"restart (attempt {group.attempt + 1})"
    return (
        f"Group {group.group_id} could not {what} within {_duration(spec.start_timeout_s)}: it needs at least "
        f"{spec.min_nodes} nodes{kind} with {spec.gpus_per_node} free GPUs each; {have}."
    )


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s != seconds or s < 60:
        return f"{seconds:g}s"
    m, rest = divmod(s, 60)
    return f"{m}m" if rest == 0 else f"{m}m{rest}s"
