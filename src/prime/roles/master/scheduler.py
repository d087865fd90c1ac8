"""Pure placement of task replicas onto nodes, and folding node reports into replica states.

Rules:
- Only Healthy nodes get new replicas. A replica gets specific GPU indices (lowest free first);
  ``gpus="all"`` needs a node with at least one GPU and every GPU free; ``gpus=0`` fits anywhere.
  A replica's cpu_limit / memory_limit_mib must not exceed the node's cores / RAM (limits are caps,
  not reservations, so they are not summed across replicas).
- Replicas of one task spread across nodes before doubling up; among equally spread nodes the
  tightest fit wins (fewest GPUs left free), which keeps whole nodes free for ``gpus="all"``.
- Tasks are served oldest first; a replica that fits nowhere stays Pending and does not block
  smaller ones behind it.
- A Dead or Left node's unfinished replicas go back to Pending (``attempt`` + 1); final ones stay.

Functions that change replicas mutate them in place and return ``RecordReplicaTransition``s
(the instruction the state machine passes on for logs/metrics). No I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prime.chain.types import Specs
from prime.protocol.errors import ValidationError
from prime.protocol.heartbeat import DesiredReplica, ReplicaReport
from prime.protocol.nodes import NO_HARDWARE, NodeRecord, NodeState
from prime.protocol.tasks import FINAL_REPLICA_STATES, PLACED_REPLICA_STATES, Replica, ReplicaState, Task, TaskSpec


@dataclass(frozen=True)
class Placement:
    task_id: str
    replica: int
    node: str
    gpu_indices: tuple[int, ...]


@dataclass(frozen=True)
class RecordReplicaTransition:
    """Instruction: a replica changed state (log it, count it)."""

    task_id: str
    replica: int
    node: str | None
    old: ReplicaState
    new: ReplicaState
    reason: str


def transition(task_id: str, replica: Replica, new: ReplicaState, reason: str) -> RecordReplicaTransition:
    """Move ``replica`` to ``new``; the instruction that records it."""
    old = replica.state
    replica.state = new
    return RecordReplicaTransition(task_id, replica.index, replica.node, old, new, reason)


def used_gpus(tasks: Iterable[Task]) -> dict[str, set[int]]:
    """GPU indices held on each node by replicas placed there."""
    used: dict[str, set[int]] = defaultdict(set)
    for task in tasks:
        for r in task.replicas:
            if r.node is not None and r.state in PLACED_REPLICA_STATES:
                used[r.node].update(r.gpu_indices)
    return used


def _fits_limits(spec: TaskSpec, hw: Specs) -> bool:
    if spec.cpu_limit is not None and spec.cpu_limit > hw.cpu_cores:
        return False
    if spec.memory_limit_mib is not None and spec.memory_limit_mib > hw.ram_mib:
        return False
    return True


def pick_gpus(spec: TaskSpec, hw: Specs, used: set[int]) -> tuple[int, ...] | None:
    """The GPU indices a replica of ``spec`` would get on a node, or None when it does not fit."""
    if not _fits_limits(spec, hw):
        return None
    free = [i for i in range(hw.gpu_count) if i not in used]
    if spec.gpus == "all":
        return tuple(free) if hw.gpu_count > 0 and len(free) == hw.gpu_count else None
    if len(free) < spec.gpus:
        return None
    return tuple(free[: spec.gpus])


def place(tasks: Iterable[Task], nodes: Iterable[NodeRecord]) -> list[Placement]:
    """Where to put every Pending replica that fits somewhere now. Does not change anything."""
    healthy = sorted((n for n in nodes if n.state == NodeState.HEALTHY), key=lambda n: n.address)
    task_list = sorted(tasks, key=lambda t: (t.created_at, t.id))
    if not healthy:
        return []
    used = used_gpus(task_list)
    per_task: dict[tuple[str, str], int] = defaultdict(int)  # (task, node) -> replicas there
    for task in task_list:
        for r in task.replicas:
            if r.node is not None and r.state in PLACED_REPLICA_STATES:
                per_task[(task.id, r.node)] += 1

    placements: list[Placement] = []
    for task in task_list:
        if task.stop_requested or task.spec.group is not None:
            continue  # a group's members are placed together (gangs.py), never one by one
        for r in task.replicas:
            if r.state != ReplicaState.PENDING:
                continue
            best: tuple[tuple[int, int, str], NodeRecord, tuple[int, ...]] | None = None
            for node in healthy:
                gpus = pick_gpus(task.spec, node.hardware, used[node.address])
                if gpus is None:
                    continue
                free_after = node.hardware.gpu_count - len(used[node.address]) - len(gpus)
                key = (per_task[(task.id, node.address)], free_after, node.address)
                if best is None or key < best[0]:
                    best = (key, node, gpus)
            if best is None:
                continue
            _, node, gpus = best
            used[node.address].update(gpus)
            per_task[(task.id, node.address)] += 1
            placements.append(Placement(task.id, r.index, node.address, gpus))
    return placements


def apply_placements(
    tasks: Mapping[str, Task], placements: Iterable[Placement], at: float
) -> list[RecordReplicaTransition]:
    """Assign replicas as ``place`` decided."""
    changes = []
    for p in placements:
        r = tasks[p.task_id].replicas[p.replica]
        r.node, r.gpu_indices, r.assigned_at = p.node, p.gpu_indices, at
        r.exit_code = r.started_at = r.finished_at = None
        changes.append(transition(p.task_id, r, ReplicaState.ASSIGNED, f"placed on {p.node}"))
    return changes


def release_node(tasks: Iterable[Task], node: str, at: float, reason: str) -> list[RecordReplicaTransition]:
    """Take every unfinished replica off ``node`` (Dead or gone): Pending again, or Stopped if its task is stopping."""
    changes = []
    for task in _not_grouped(tasks):
        for r in task.replicas:
            if r.node != node or r.state in FINAL_REPLICA_STATES:
                continue
            if task.stop_requested:
                r.finished_at = at
                changes.append(transition(task.id, r, ReplicaState.STOPPED, f"stopped; {reason}"))
                continue
            changes.append(_reschedule(task.id, r, node, reason))
    return changes


def _reschedule(task_id: str, r: Replica, node: str, reason: str) -> RecordReplicaTransition:
    """A replica lost on ``node`` (the node died, or its engine stopped it): Pending again, a new attempt."""
    change = transition(task_id, r, ReplicaState.PENDING, f"rescheduled; {reason}")
    r.error = f"Lost on node {node}: {reason.rstrip('.')}."
    r.node, r.gpu_indices, r.assigned_at, r.started_at = None, (), None, None
    r.attempt += 1
    r.restarts = 0
    return change


def stop_task(task: Task, at: float) -> tuple[list[RecordReplicaTransition], list[tuple[str, int]]]:
    """Mark a task stopping. Unplaced replicas stop at once; returns (changes, [(node, replica)] to tell to stop)."""
    task.stop_requested = True
    changes, to_stop = [], []
    for r in task.replicas:
        if r.state in FINAL_REPLICA_STATES:
            continue
        if r.node is None:
            r.finished_at = at
            changes.append(transition(task.id, r, ReplicaState.STOPPED, "stop requested"))
        else:
            to_stop.append((r.node, r.index))
    return changes, to_stop


def desired_for(tasks: Iterable[Task], node: str) -> list[DesiredReplica]:
    """Every replica ``node`` should be running now (oldest task first)."""
    out = []
    for task in sorted(tasks, key=lambda t: (t.created_at, t.id)):
        if task.stop_requested:
            continue
        for r in task.replicas:
            if r.node == node and r.state in PLACED_REPLICA_STATES:
                out.append(DesiredReplica(task.id, r.index, r.attempt, r.gpu_indices, task.spec))
    return out


def apply_node_report(
    tasks: Iterable[Task], node: str, reports: Iterable[ReplicaReport], at: float
) -> list[RecordReplicaTransition]:
    """Fold one heartbeat's replica reports into the replicas placed on ``node``.

    Only the node a replica is placed on can change it; final states are final. A replica the
    node reported before (Pulling/Running) but no longer reports becomes Lost and stays desired
    there (the node should start it again); one never reported yet (Assigned) just stays. A
    report of another attempt than the replica's is ignored. A
    replica the node reports Lost (its engine stopped it: not the task's own exit) is rescheduled,
    a new attempt, as if its node had died. A Running replica reported Pulling (its container
    waits for a restart) stays Running: states never go back for one attempt. Completed clears
    the note of an earlier attempt's loss. For a stopping task, a replica the node no longer
    reports, or reports Failed or Lost, is Stopped.
    """
    by_key = {(r.id, r.replica): r for r in reports}
    changes = []
    for task in _not_grouped(tasks):
        for r in task.replicas:
            if r.node != node or r.state in FINAL_REPLICA_STATES:
                continue
            report = by_key.get((task.id, r.index))
            if report is None:
                if task.stop_requested:
                    r.finished_at = at
                    changes.append(transition(task.id, r, ReplicaState.STOPPED, "the node stopped it"))
                elif r.state in (ReplicaState.PULLING, ReplicaState.RUNNING):
                    changes.append(transition(task.id, r, ReplicaState.LOST, "the node no longer reports it"))
                continue
            if report.attempt is not None and report.attempt != r.attempt:
                continue  # a container of another attempt (a leftover the node has not replaced yet)
            new = report.state
            r.restarts = report.restarts
            if task.stop_requested and new in (ReplicaState.FAILED, ReplicaState.STOPPED, ReplicaState.LOST):
                new = ReplicaState.STOPPED
            if new == ReplicaState.LOST:
                changes.append(_reschedule(task.id, r, node, f"lost on the node: {report.error or 'its engine stopped it'}"))
                continue
            if new == r.state or (r.state == ReplicaState.RUNNING and new == ReplicaState.PULLING):
                continue
            if new == ReplicaState.RUNNING and r.started_at is None:
                r.started_at = at
            if new in FINAL_REPLICA_STATES:
                r.finished_at = at
                r.exit_code = report.exit_code
            if report.error is not None or new == ReplicaState.COMPLETED:
                r.error = report.error
            changes.append(transition(task.id, r, new, "reported by the node"))
    return changes


def _not_grouped(tasks: Iterable[Task]) -> Iterable[Task]:
    """Tasks whose replicas change one by one: all but running groups (``gangs`` folds those; a
    stopping group stops like any task)."""
    return (t for t in tasks if t.spec.group is None or t.stop_requested)


def check_placeable(spec: TaskSpec, nodes: Iterable[NodeRecord]) -> None:
    """Reject a task no node of the run could ever hold (ValidationError on the field).

    Judged on known nodes that are or may become members (not Left) and whose hardware is
    known. With no such node the task is accepted and waits Pending: nodes may still join.
    """
    known = [n.hardware for n in nodes if n.state != NodeState.LEFT and n.hardware != NO_HARDWARE]
    if not known:
        return
    most_gpus = max(hw.gpu_count for hw in known)
    if spec.gpus == "all":
        if most_gpus == 0:
            raise ValidationError("gpus", "No node in this run has a GPU, so 'all' cannot be placed.")
    elif spec.gpus > most_gpus:
        raise ValidationError("gpus", f"No node in this run has {spec.gpus} GPUs; the largest has {most_gpus}.")
    if spec.cpu_limit is not None and all(spec.cpu_limit > hw.cpu_cores for hw in known):
        most = max(hw.cpu_cores for hw in known)
        raise ValidationError("cpu_limit", f"No node in this run has {spec.cpu_limit:g} CPU cores; the largest has {most}.")
    if spec.memory_limit_mib is not None and all(spec.memory_limit_mib > hw.ram_mib for hw in known):
        most = max(hw.ram_mib for hw in known)
        raise ValidationError(
            "memory_limit_mib", f"No node in this run has {spec.memory_limit_mib} MiB of RAM; the largest has {most}."
        )
    if not any(pick_gpus(spec, hw, set()) is not None for hw in known):
        raise ValidationError("gpus", "No single node in this run has both the GPUs and the CPU/RAM this task asks for.")
