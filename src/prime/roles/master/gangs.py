"""Group tasks in the master's core: ``groups.py``'s state machine fed from ``MasterState`` (pure, no I/O).

A group task's members are its replicas: member rank r is replica r (its logs, files and synced
/data are replica r's, and a member's replica ``attempt`` is the group's attempt, so the miner's
checkpoint resume and the log keeper work as for any replica). ``state.handle`` calls in here:

- ``created``: a new group task gets a ``GroupState`` and is offered the nodes at once.
- ``schedule``: before ordinary replicas are placed, every waiting group (oldest first) is
  offered the nodes that can host a member now (``offers``): Healthy, announcing a
  ``--task-ports`` range, with the GPUs free (other tasks' replicas counted) and no member of
  another group there (its ports are taken). Gang placement takes all members at once or none,
  so a group that does not fit blocks nothing behind it.
- ``tick``: the clock (start timeout, restart backoff; a restart also waits for its members'
  final syncs in flight).
- ``node_gone``: a node left the hosting states (Dead, Left): its member's attempt ends.
- ``report``: a node's heartbeat reports about members: Running -> ``MemberStarted``; an exit ->
  ``MemberExited``; a member that could not start, was stopped by the engine or is no longer
  reported -> ``MemberLost``.

Decisions become replica changes and pushes: ``StartMembers`` assigns every member's replica in
one call (so no member is desired anywhere before all are placed) and pushes each start;
``StopMembers`` takes the attempt's replicas off their nodes (Pending again; a persistent one gets
its final sync first, which the next attempt's member resumes from) and pushes the stops.
A stopped task (``TaskStopRequested``, the run ended) ends its group as Stopped (``stopped``); its
members stop like any task's replicas (``scheduler.stop_task``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prime.protocol.groups import MAX_GROUP_HISTORY, GroupPhase, GroupTransition, GroupView, MemberView
from prime.protocol.heartbeat import DesiredReplica, ReplicaReport
from prime.protocol.nodes import NodeRecord, NodeState
from prime.protocol.tasks import FINAL_REPLICA_STATES, PLACED_REPLICA_STATES, Replica, ReplicaState, Task
from prime.roles.master import groups, scheduler, syncplan
from prime.roles.master.events import Instruction, RecordGroupTransition, StartReplica, StopReplica
from prime.roles.master.groupenv import Member, member_envs
from prime.roles.master.groups import GroupSpec, GroupState

if TYPE_CHECKING:
    from prime.roles.master.state import MasterState


def is_group(task: Task) -> bool:
    return task.spec.group is not None


def node_host(rec: NodeRecord) -> str | None:
    """The address peers reach ``rec`` at: the host of the URL it announced in discovery."""
    try:
        return urlsplit(rec.url).hostname if rec.url else None
    except ValueError:
        return None


# --- feeding the state machine ---------------------------------------------------------------------


def created(state: MasterState, task: Task, at: float) -> list[Instruction]:
    assert task.spec.group is not None
    gpus = task.spec.gpus if isinstance(task.spec.gpus, int) else 0
    state.groups[task.id] = groups.new_group(task.id, GroupSpec.of(task.spec.group, gpus), at)
    return _step(state, task, groups.Offers(offers(state, task, at), at), at)


def schedule(state: MasterState, at: float) -> list[Instruction]:
    out: list[Instruction] = []
    for task in _active(state):
        if state.groups[task.id].phase == GroupPhase.PENDING:
            out.extend(_step(state, task, groups.Offers(offers(state, task, at), at), at))
    return out


def tick(state: MasterState, now: float) -> list[Instruction]:
    """The clock: fresh offers (a restart after its backoff places on them), then the timeouts. A
    group restarting waits for the final syncs of its last attempt's members still in flight: each
    member of the next attempt resumes its rank's /data as synced last, never an older copy."""
    out: list[Instruction] = []
    for task in _active(state):
        out.extend(_step(state, task, groups.Offers(offers(state, task, now), now), now))
        if state.groups[task.id].phase == GroupPhase.RESTARTING and _syncing(state, task):
            continue
        out.extend(_step(state, task, groups.Tick(now), now))
    return out


def _syncing(state: MasterState, task: Task) -> bool:
    return any((task.id, r.index) in state.syncing for r in task.replicas)


def view_resumed(state: MasterState, at: float) -> list[Instruction]:
    """The master (re)started or its loop stalled: the start timeouts count from ``at``, not through
    the gap (no node could report meanwhile)."""
    out: list[Instruction] = []
    for task in _active(state):
        out.extend(_step(state, task, groups.ViewResumed(at), at))
    return out


def stopped(state: MasterState, task: Task, at: float) -> list[Instruction]:
    """The task's stop was asked for: its group ends as Stopped (the members stop as any replicas do)."""
    if task.id not in state.groups:
        return []
    return _step(state, task, groups.StopRequested("stopped on request", at), at)


def node_gone(state: MasterState, node: str, at: float) -> list[Instruction]:
    out: list[Instruction] = []
    for task in _active(state):
        out.extend(_step(state, task, groups.NodeGone(node, at), at))
    return out


def report(state: MasterState, node: str, reports: Iterable[ReplicaReport], at: float) -> list[Instruction]:
    """Fold one heartbeat's reports about members placed on ``node`` into their replicas and groups."""
    by_key = {(r.id, r.replica): r for r in reports}
    out: list[Instruction] = []
    for task in _active(state):
        for r in task.replicas:
            if r.node != node or r.state not in PLACED_REPLICA_STATES:
                continue  # (an earlier decision of this loop may have taken it off the node)
            seen = by_key.get((task.id, r.index))
            if seen is not None and seen.attempt is not None and seen.attempt != r.attempt:
                continue  # a leftover container of another attempt
            out.extend(_fold(state, task, r, seen, at))
    return out


def _fold(state: MasterState, task: Task, r: Replica, seen: ReplicaReport | None, at: float) -> list[Instruction]:
    out: list[Instruction] = []
    event: groups.GroupEvent | None = None
    if seen is None:
        if r.state in (ReplicaState.PULLING, ReplicaState.RUNNING):
            event = groups.MemberLost(r.attempt, r.index, "the node no longer reports it", at)
    elif seen.state == ReplicaState.PULLING:
        if r.state == ReplicaState.ASSIGNED:
            out.append(scheduler.transition(task.id, r, ReplicaState.PULLING, "reported by the node"))
        event = groups.MemberPulling(r.attempt, r.index, at)
    elif seen.state == ReplicaState.RUNNING:
        if r.state != ReplicaState.RUNNING:
            r.started_at = at
            out.append(scheduler.transition(task.id, r, ReplicaState.RUNNING, "reported by the node"))
        event = groups.MemberStarted(r.attempt, r.index, at)
    elif seen.state in (ReplicaState.COMPLETED, ReplicaState.FAILED) and seen.exit_code is not None:
        r.finished_at, r.exit_code, r.error = at, seen.exit_code, seen.error
        out.append(scheduler.transition(task.id, r, seen.state, "reported by the node"))
        if task.spec.persistent and r.node is not None:
            out.extend(syncplan.final_sync(state, r.node, task.id, r.index))  # its last files, at once
        event = groups.MemberExited(r.attempt, r.index, seen.exit_code, at)
    else:  # Failed before it ran, Lost (its engine stopped it), Stopped (not asked for)
        r.error = seen.error
        why = seen.error or ("its engine stopped it" if seen.state == ReplicaState.LOST
                             else f"the node reported it {seen.state.value}")
        event = groups.MemberLost(r.attempt, r.index, why.rstrip("."), at)
    if seen is not None:
        r.restarts = seen.restarts
    state.dirty_tasks.add(task.id)
    if event is not None:
        out.extend(_step(state, task, event, at))
    return out


def _active(state: MasterState) -> list[Task]:
    """The group tasks their state machines still drive (not stopped, not final), oldest first."""
    tasks = (state.tasks.get(task_id) for task_id, group in state.groups.items() if group.phase not in groups.FINAL_PHASES)
    return sorted((t for t in tasks if t is not None and not t.stop_requested), key=lambda t: (t.created_at, t.id))


# --- what can host a member ------------------------------------------------------------------------


def offers(state: MasterState, task: Task, at: float) -> dict[str, groups.NodeAvailable]:
    """Every node that can host a member of ``task`` now (its own members' nodes included)."""
    others = [t for t in state.tasks.values() if t.id != task.id]
    used = scheduler.used_gpus(others)
    taken = {r.node for t in others if is_group(t) for r in t.replicas
             if r.node is not None and r.state in PLACED_REPLICA_STATES}  # another group's member holds its ports
    out = {}
    for rec in state.nodes.values():
        host = node_host(rec)
        ports = rec.last_sample.task_ports if rec.last_sample is not None else None
        if rec.state != NodeState.HEALTHY or host is None or ports is None or rec.address in taken:
            continue
        if scheduler.pick_gpus(task.spec, rec.hardware, used[rec.address]) is None:
            continue  # too few free GPUs, or the member's CPU/RAM limits exceed the node
        free = rec.hardware.gpu_count - len(used[rec.address])
        out[rec.address] = groups.NodeAvailable(rec.address, free, rec.hardware.gpu_model, host, ports, at)
    return out


# --- carrying decisions out on the replicas --------------------------------------------------------


def _step(state: MasterState, task: Task, event: groups.GroupEvent, at: float) -> list[Instruction]:
    group = state.groups[task.id]
    before = (group.phase, group.attempt)
    out: list[Instruction] = []
    for decision in groups.handle(group, event):
        if isinstance(decision, groups.StartMembers):
            out.extend(_start(state, task, decision, at))
        elif isinstance(decision, groups.StopMembers):
            out.extend(_stop(state, task, decision, at))
        else:
            out.extend(_finish(task, group, at))
    if (group.phase, group.attempt) != before:
        why = _why(group)
        out.append(RecordGroupTransition(task.id, group.attempt, before[0], group.phase, why))
        _remember(group, at, why)
    task.group = view(group)
    state.dirty_tasks.add(task.id)
    return out


def _remember(group: GroupState, at: float, why: str) -> None:
    group.history.append((at, group.attempt, group.phase.value, why[:4096]))
    del group.history[:-MAX_GROUP_HISTORY]


def _why(group: GroupState) -> str:
    if group.phase in (GroupPhase.STARTING, GroupPhase.RUNNING):
        nodes = ", ".join(f"rank {m.rank} on {m.node}" for m in group.members)
        return f"attempt {group.attempt}: {nodes}"
    return group.reason or group.phase.value


def _start(state: MasterState, task: Task, decision: groups.StartMembers, at: float) -> list[Instruction]:
    used = scheduler.used_gpus(t for t in state.tasks.values() if t.id != task.id)
    k = len(decision.members)
    out: list[Instruction] = []
    for launch in decision.members:
        r = task.replicas[launch.rank]
        rec = state.nodes[launch.node]
        gpus = scheduler.pick_gpus(task.spec, rec.hardware, used[launch.node]) or ()
        used[launch.node].update(gpus)
        r.node, r.gpu_indices, r.attempt, r.assigned_at = launch.node, gpus, decision.attempt, at
        r.exit_code = r.started_at = r.finished_at = r.error = None
        r.restarts = 0
        reason = f"placed on {launch.node} (rank {launch.rank} of {k}, group attempt {decision.attempt})"
        out.append(scheduler.transition(task.id, r, ReplicaState.ASSIGNED, reason))
    for r in task.replicas[k:]:  # elastic: ranks past this attempt's size wait unused
        if r.state != ReplicaState.PENDING:
            out.append(scheduler.transition(task.id, r, ReplicaState.PENDING, "not used in this attempt"))
        r.error = f"Not used in group attempt {decision.attempt}: it runs on {k} nodes."
    out.extend(StartReplica(launch.node, task.id, launch.rank) for launch in decision.members)
    return out


def _stop(state: MasterState, task: Task, decision: groups.StopMembers, at: float) -> list[Instruction]:
    """The attempt is over: every member's replica leaves its node (Pending again, for the next attempt)."""
    out: list[Instruction] = []
    on_node: dict[str, int] = {}
    for r in task.replicas:
        if r.node is None:
            continue
        node = r.node
        on_node[node] = r.index
        if task.spec.persistent and _reachable(state, node):
            out.extend(syncplan.final_sync(state, node, task.id, r.index))  # the next attempt resumes from it
        error = r.error if r.state == ReplicaState.FAILED and r.error else None
        out.append(scheduler.transition(task.id, r, ReplicaState.PENDING, f"group attempt {decision.attempt} ended: {decision.reason}"))
        r.node, r.gpu_indices, r.assigned_at, r.started_at = None, (), None, None
        r.error = error or f"Group attempt {decision.attempt} ended: {decision.reason}."
    out.extend(StopReplica(node, task.id, on_node.get(node, 0)) for node in decision.nodes)
    return out


def _reachable(state: MasterState, node: str) -> bool:
    rec = state.nodes.get(node)
    return rec is not None and rec.state in syncplan.SYNC_NODE_STATES


def _finish(task: Task, group: GroupState, at: float) -> list[Instruction]:
    """Completed or Failed: replicas that are not final yet end with the group (they never ran)."""
    out: list[Instruction] = []
    completed = group.phase == GroupPhase.COMPLETED
    for r in task.replicas:
        if r.state in FINAL_REPLICA_STATES or r.node is not None:
            continue
        r.finished_at = at
        if completed:
            out.append(scheduler.transition(task.id, r, ReplicaState.STOPPED, "not used: the group completed without it"))
        else:
            r.error = group.reason
            out.append(scheduler.transition(task.id, r, ReplicaState.FAILED, "the group failed"))
    return out


# --- what the node and the buyer see ---------------------------------------------------------------


def member_of(state: MasterState, task: Task, rank: int, node: str) -> Member | None:
    group = state.groups.get(task.id)
    if group is None or group.phase not in groups.PLACED_PHASES or not 0 <= rank < len(group.members):
        return None
    member = group.members[rank]
    return member if member.node == node else None


def desired(state: MasterState, entry: DesiredReplica) -> DesiredReplica | None:
    """A group member's desired entry with its environment and ports; None when it should not run
    (the group moved on). Any other entry unchanged."""
    task = state.tasks.get(entry.id)
    if task is None or not is_group(task):
        return entry
    r = task.replica(entry.replica)
    member = member_of(state, task, entry.replica, r.node) if r is not None and r.node is not None else None
    if member is None:
        return None
    group = state.groups[task.id]
    env = member_envs(group.group_id, group.attempt, group.members, group.spec.gpus_per_node)[member.rank]
    return DesiredReplica(entry.id, entry.replica, entry.attempt, entry.gpu_indices, entry.spec, env,
                          (member.rendezvous_port, member.peer_port))


def view(group: GroupState) -> GroupView:
    """The group as the buyer sees it: the current attempt's members, or the last attempt's once it ended."""
    shown = group.members or group.last_members
    members = tuple(MemberView(m.rank, m.node, m.address, m.rendezvous_port, m.peer_port) for m in shown)
    history = tuple(GroupTransition(at, attempt, GroupPhase(phase), why) for at, attempt, phase, why in group.history)
    return GroupView(group.phase, group.attempt, group.restarts, group.reason, members, history)


# --- storing a group -------------------------------------------------------------------------------


def to_json(group: GroupState) -> dict[str, Any]:
    """What is stored of a group (its offers are rebuilt from the nodes at the next schedule)."""
    s = group.spec
    return {
        "spec": [s.min_nodes, s.max_nodes, s.gpus_per_node, s.same_gpu_model, s.start_timeout_s, s.max_restarts,
                 s.backoff_base_s, s.backoff_max_s],
        "waiting_since": group.waiting_since, "phase": group.phase.value, "attempt": group.attempt,
        "members": [_member_json(m) for m in group.members],
        "last_members": [_member_json(m) for m in group.last_members],
        "started": sorted(group.started), "finished": sorted(group.finished), "heard": sorted(group.heard),
        "restarts": group.restarts,
        "restart_at": group.restart_at, "survivors": group.survivors, "reason": group.reason,
        "history": [list(h) for h in group.history],
    }


def _member_json(m: Member) -> list[Any]:
    return [m.rank, m.node, m.address, m.gpu_model, list(m.ports)]


def _member(m: list[Any]) -> Member:
    return Member(int(m[0]), str(m[1]), str(m[2]), str(m[3]), (int(m[4][0]), int(m[4][1])))


def from_json(group_id: str, data: Mapping[str, Any]) -> GroupState:
    members = tuple(_member(m) for m in data["members"])
    return GroupState(
        group_id, GroupSpec(*data["spec"]), float(data["waiting_since"]), phase=GroupPhase(data["phase"]),
        attempt=int(data["attempt"]), members=members, started=set(data["started"]), finished=set(data["finished"]),
        heard=set(data.get("heard", ())), last_members=tuple(_member(m) for m in data.get("last_members", ())),
        restarts=int(data["restarts"]), restart_at=data["restart_at"],
        survivors={str(k): int(v) for k, v in data["survivors"].items()}, reason=data["reason"],
        history=[(float(h[0]), int(h[1]), str(h[2]), str(h[3])) for h in data.get("history", ())],
    )
