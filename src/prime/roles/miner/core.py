"""The miner's decisions, and nothing else: no I/O, no asyncio, no Docker.

From the master's desired replicas, what Docker shows (a snapshot of ``ReplicaStatus``
the executor reports), the miner's bookkeeping (``Book``) and the clock, ``plan`` returns
the actions to carry out (start, stop, keep, resume, restart with backoff), the book to
keep, and what to report to the master::

    plan = core.plan(desired, snapshot, book, now, policy, node_gpus)
    book = plan.book
    # carry out plan.actions; a start that raised is fed back:
    book = core.start_failed(book, key, reason)

``desired=None`` is a supervise tick (no new list from the master): nothing is started or
stopped, only created-but-not-started containers are started and failed ones restarted per
their restart policy. This module is the only place that knows the restart policy.

Times are the caller's clock (monotonic in production). A remembered time that lies in the
future (the clock went backwards) is taken as now: a wait is never longer than its length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from prime.protocol.heartbeat import MAX_REPORTED_TASKS, DesiredReplica, ReplicaReport
from prime.protocol.tasks import MAX_ERROR_LENGTH, MAX_REPLICAS, ReplicaState, RestartPolicy, TaskSpec, is_task_id
from prime.roles.miner import exits

Key = tuple[str, int]
PortRange = tuple[int, int]  # a node's --task-ports, first and last inclusive

ATTEMPT_ENV = "PRIME_ATTEMPT"
MIN_MEMORY_MIB = 6  # Docker refuses less
FINISHED = frozenset({ReplicaState.COMPLETED, ReplicaState.FAILED})
MAX_REPORTED_RESTARTS = 2**31
# A failure before any container existed that no retry can cure (the image does not exist, the
# registry refuses it, the policy forbids it): reported Failed even when the policy restarts.
_PERMANENT = ("does not pull", "not valid", "manifest unknown", "not found", "does not exist",
              "access denied", "unauthorized", "Docker refused to create")


class Unplaceable(ValueError):
    """A desired replica this node cannot run as given (one sentence, for the master)."""


# --- what the node runs ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Placement:
    """One desired replica as this node runs it: the master's entry plus the node's GPU indices."""

    desired: DesiredReplica
    gpus: tuple[int, ...]  # NVML indices of the cards (the master's positions, mapped)

    @property
    def key(self) -> Key:
        return (self.desired.id, self.desired.replica)

    @property
    def task_id(self) -> str:
        return self.desired.id

    @property
    def replica(self) -> int:
        return self.desired.replica

    @property
    def spec(self) -> TaskSpec:
        return self.desired.spec

    @property
    def member(self) -> bool:
        """A member of a group task (``spec.group``): the master's env and ports apply, host networking."""
        return self.desired.spec.group is not None

    @property
    def restart(self) -> RestartPolicy:
        if self.member:  # a group restarts as a whole, by the master (the protocol refuses on-failure too)
            return RestartPolicy.NEVER
        return RestartPolicy(self.desired.spec.restart)

    def environment(self) -> dict[str, str]:
        """The task's env (a group member's: the master's variables over it) plus its attempt: a
        replica placed here again is a new container. An ordinary replica's ``desired.env`` is ignored."""
        env = dict(self.desired.spec.env)
        if self.member:
            env.update(self.desired.env)
        env[ATTEMPT_ENV] = str(self.desired.attempt)
        return env

    def record(self) -> dict[str, Any]:
        """Everything that shapes the container, as stored in its ``prime.spec`` label.

        The shape is the label format of every miner so far (``max_restarts`` is always
        null): containers started before an upgrade keep their hash and are adopted. A group
        member's record has two keys more (its ports and host networking; its ``env`` has the
        master's variables): only members carry them, so ordinary records never changed.
        """
        spec = self.desired.spec
        record: dict[str, Any] = {
            "task_id": self.task_id,
            "image": spec.image,
            "command": list(spec.command),
            "env": self.environment(),
            "gpus": list(self.gpus),
            "replica": self.replica,
            "persistent": bool(spec.persistent),
            "cpu_limit": None if spec.cpu_limit is None else float(spec.cpu_limit),
            "memory_limit_mib": None if spec.memory_limit_mib is None else int(spec.memory_limit_mib),
            "restart": self.restart.value,
            "max_restarts": None,
        }
        if self.member:
            record["ports"] = list(self.desired.ports)
            record["network"] = "host"
        return record

    def spec_hash(self) -> str:
        """A stable hash of ``record()``: a change means the container is replaced."""
        canonical = json.dumps(self.record(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def physical_gpus(positions: Sequence[int], node_gpus: Sequence[int]) -> tuple[int, ...]:
    """The NVML indices for the master's GPU positions; ``Unplaceable`` if one is not offered."""
    out = []
    for position in positions:
        if not 0 <= position < len(node_gpus):
            raise Unplaceable(f"The master assigned GPU {position} but this node offers only {len(node_gpus)} GPU(s).")
        out.append(node_gpus[position])
    if len(set(out)) != len(out):
        raise Unplaceable("The master assigned the same GPU twice to one replica.")
    return tuple(out)


def check_member_ports(ports: Sequence[int], task_ports: PortRange | None) -> None:
    """A group member runs only on a node that offers task ports, and listens only inside them:
    no master makes the node listen elsewhere. ``Unplaceable`` otherwise."""
    if task_ports is None:
        raise Unplaceable("This node offers no task ports (--task-ports), so it cannot host a member of a group task.")
    first, last = task_ports
    for port in ports:
        if not first <= port <= last:
            raise Unplaceable(f"The master gave this group member port {port}, outside this node's --task-ports {first}-{last}.")


def place(desired: DesiredReplica, node_gpus: Sequence[int], task_ports: PortRange | None = None) -> Placement:
    """This node's placement of one desired replica; ``Unplaceable`` when it cannot run here.
    ``task_ports``: the node's ``--task-ports`` (None: it hosts no group members)."""
    memory = desired.spec.memory_limit_mib
    if memory is not None and memory < MIN_MEMORY_MIB:
        raise Unplaceable(f"The task's memory_limit_mib must be an integer of at least {MIN_MEMORY_MIB} (MiB).")
    if desired.spec.group is not None:
        check_member_ports(desired.ports, task_ports)
    return Placement(desired, physical_gpus(desired.gpu_indices, node_gpus))


# --- what Docker shows -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica as the executor sees it: a container, or its record of one being started
    (``container_id`` None: pulling, or failed before a container existed)."""

    task_id: str
    replica: int
    state: ReplicaState  # Pulling, Running, Completed, Failed or Stopped
    exit_code: int | None = None
    reason: str | None = None  # why it failed, in words
    container_id: str | None = None
    spec_hash: str | None = None
    gpus: str | None = None  # the GPU indices it was given ("0,2", "")
    restart: RestartPolicy | None = None  # from its spec label; None: not readable
    finished_at: float | None = None  # when its container last exited (unix seconds, Docker's State.FinishedAt)
    attempt: int | None = None  # the master's attempt its container runs (from its spec label); None: not known

    @property
    def key(self) -> Key:
        return (self.task_id, self.replica)

    def to_dict(self, restarts: int = 0) -> dict[str, Any]:
        """The shape of ``GET /tasks`` entries."""
        return {
            "task_id": self.task_id, "replica": self.replica, "state": ReplicaState(self.state).value,
            "exit_code": self.exit_code, "reason": self.reason, "container_id": self.container_id,
            "spec_hash": self.spec_hash, "restarts": restarts, "gpus": self.gpus,
        }


# --- bookkeeping -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    retention_s: float = 3600.0  # an undesired finished replica's container (and logs) is kept this long
    push_grace_s: float = 30.0  # a pushed replica is not stopped by a list computed before the push
    backoff_s: float = 1.0  # first restart delay; doubles per restart
    backoff_max_s: float = 300.0


@dataclass(frozen=True)
class Restarts:
    count: int = 0  # restarts so far of this replica's container
    failed_at: float | None = None  # when its current failure was first seen


@dataclass(frozen=True)
class Book:
    """What the miner remembers between decisions (in memory; Docker is the record of the rest)."""

    restarts: Mapping[Key, Restarts] = field(default_factory=dict)
    finished_since: Mapping[Key, float] = field(default_factory=dict)  # undesired and finished, since
    pushed_at: Mapping[Key, float] = field(default_factory=dict)  # POST /tasks, when
    invalid: Mapping[Key, str] = field(default_factory=dict)  # desired replicas that cannot run here, why
    marks: exits.Marks = field(default_factory=exits.Marks)  # stop intents, outside signals, engine outages
    attempts: Mapping[Key, int] = field(default_factory=dict)  # the master's attempt of each replica in its last list

    def restart_count(self, key: Key) -> int:
        track = self.restarts.get(key)
        return track.count if track else 0


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Create and start the replica's container (pulling its image if missing); ``replace``:
    remove the replica's other container (or abandon its start) first."""

    placement: Placement
    replace: bool = False

    @property
    def key(self) -> Key:
        return self.placement.key


@dataclass(frozen=True)
class Resume:
    """Start a container that was created but never started (the miner stopped in between)."""

    key: Key
    container_id: str


@dataclass(frozen=True)
class Restart:
    """Start a failed container again: restart number ``count``."""

    key: Key
    container_id: str
    count: int


@dataclass(frozen=True)
class Stop:
    """Stop and remove the replica's container (or abandon its start)."""

    key: Key
    why: str


@dataclass(frozen=True)
class Keep:
    """Nothing to do now (``until``: when something may be due, e.g. the next restart)."""

    key: Key
    why: str
    until: float | None = None


Action = Start | Resume | Restart | Stop | Keep


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    book: Book
    reports: tuple[ReplicaReport, ...]  # the snapshot as the master should hear it

    def of(self, kind: type) -> list[Any]:
        return [a for a in self.actions if isinstance(a, kind)]


# --- the rules ---------------------------------------------------------------------------------


def backoff_delay(restarts: int, base_s: float, max_s: float) -> float:
    """Seconds to wait before restart number ``restarts + 1``: base, 2·base, 4·base … capped."""
    return min(max_s, base_s * float(1 << min(max(restarts, 0), 32)))


def will_restart(status: ReplicaStatus) -> bool:
    """A failed replica that its policy restarts: not final yet (the master hears Pulling). A
    failure before any container existed restarts only when a retry may cure it."""
    if status.state is not ReplicaState.FAILED or status.restart is not RestartPolicy.ON_FAILURE:
        return False
    return status.container_id is not None or not permanent_failure(status.reason)


def permanent_failure(reason: str | None) -> bool:
    """Whether a failure before any container existed (a pull, a create) can never be cured."""
    return bool(reason) and any(p.lower() in str(reason).lower() for p in _PERMANENT)


def truthful(status: ReplicaStatus, marks: exits.Marks) -> ReplicaStatus:
    """The status with an exit the engine caused (``exits.lost_reason``) as Lost."""
    if status.state not in FINISHED or status.container_id is None:
        return status
    why = exits.lost_reason(marks, status.container_id, status.finished_at)
    return status if why is None else replace(status, state=ReplicaState.LOST, reason=why)


def _since(at: float | None, now: float) -> float:
    return now if at is None or at > now else at


def plan(
    desired: Sequence[DesiredReplica] | None,
    snapshot: Iterable[ReplicaStatus],
    book: Book,
    now: float,
    policy: Policy = Policy(),
    node_gpus: Sequence[int] = (),
    task_ports: PortRange | None = None,
) -> Plan:
    """The actions that bring the node to ``desired`` (None: a supervise tick), and the new book."""
    seen: dict[Key, ReplicaStatus] = {s.key: truthful(s, book.marks) for s in snapshot}
    marks = exits.prune(book.marks, [s.container_id for s in seen.values() if s.container_id], now)
    restarts = dict(book.restarts)
    finished = dict(book.finished_since)
    pushed = dict(book.pushed_at)
    invalid = dict(book.invalid)
    actions: list[Action] = []

    if desired is None:
        for key, status in seen.items():
            if status.container_id is None or status.restart is None:
                actions.append(Keep(key, "no container to supervise" if status.container_id is None else "its spec is not readable"))
            else:
                actions.append(_supervise(status, status.restart, restarts, now, policy))
        new = Book(restarts, finished, pushed, invalid, marks, book.attempts)
        return Plan(tuple(actions), new, tuple(reports(seen.values(), new)))

    placements: dict[Key, Placement] = {}
    invalid = {}
    for entry in desired:  # a key listed twice: the last entry wins
        key = (entry.id, entry.replica)
        try:
            placements[key] = place(entry, node_gpus, task_ports)
            invalid.pop(key, None)
        except Unplaceable as exc:
            placements.pop(key, None)
            invalid[key] = str(exc)

    for key, placement in placements.items():
        finished.pop(key, None)
        found = seen.get(key)
        if found is None:
            restarts.pop(key, None)
            actions.append(Start(placement))
        elif found.spec_hash != placement.spec_hash():
            restarts.pop(key, None)
            actions.append(Start(placement, replace=True))
        elif found.container_id is None:
            if found.state is ReplicaState.PULLING:
                actions.append(Keep(key, "being started"))
            else:  # failed before it had a container: try again (image pulls back off in the executor)
                actions.append(Start(placement))
        else:
            actions.append(_supervise(found, placement.restart, restarts, now, policy))

    for key, status in seen.items():
        if key in placements:
            continue
        at = pushed.get(key)
        if at is not None:
            at = pushed[key] = _since(at, now)
            if now - at < policy.push_grace_s:
                actions.append(Keep(key, "pushed moments ago", until=at + policy.push_grace_s))
                continue
            del pushed[key]
        if status.state in FINISHED and status.restart is not RestartPolicy.ON_FAILURE:
            since = finished[key] = _since(finished.get(key), now)
            if now - since < policy.retention_s:
                actions.append(Keep(key, "finished; kept while its logs may be read", until=since + policy.retention_s))
                continue
        actions.append(Stop(key, "the master no longer lists it"))
        restarts.pop(key, None)
        finished.pop(key, None)
        pushed.pop(key, None)

    # Forget what belongs to replicas that are neither seen nor desired any more.
    live = set(seen) | set(placements)
    restarts = {k: v for k, v in restarts.items() if k in live}
    finished = {k: v for k, v in finished.items() if k in seen}
    pushed = {k: v for k, v in pushed.items() if now - _since(v, now) < policy.push_grace_s}
    for action in actions:  # every stop the miner asks for is recorded before it happens (exits.py)
        if isinstance(action, Stop) or (isinstance(action, Start) and action.replace):
            marks = exits.stop_asked(marks, action.key, now)
    attempts = {(e.id, e.replica): e.attempt for e in desired}
    new = Book(restarts, finished, pushed, invalid, marks, attempts)
    return Plan(tuple(actions), new, tuple(reports(seen.values(), new)))


def _supervise(status: ReplicaStatus, restart: RestartPolicy, restarts: dict[Key, Restarts], now: float, policy: Policy) -> Action:
    """A container of a desired (or adopted) replica: resume it, restart it, or keep it. Updates ``restarts``."""
    key = status.key
    assert status.container_id is not None
    if status.state is ReplicaState.PULLING:
        return Resume(key, status.container_id)
    if status.state is not ReplicaState.FAILED or restart is not RestartPolicy.ON_FAILURE:
        return Keep(key, status.state.value if isinstance(status.state, ReplicaState) else str(status.state))
    track = restarts.get(key, Restarts())
    failed_at = _since(track.failed_at, now)
    due = failed_at + backoff_delay(track.count, policy.backoff_s, policy.backoff_max_s)
    if now < due:
        restarts[key] = replace(track, failed_at=failed_at)
        return Keep(key, "failed; restarting after a backoff", until=due)
    restarts[key] = Restarts(count=track.count + 1, failed_at=None)
    return Restart(key, status.container_id, track.count + 1)


def pushed(book: Book, placement: Placement, now: float) -> Book:
    """The master pushed this replica (POST /tasks): not stopped for the push grace."""
    invalid = {k: v for k, v in book.invalid.items() if k != placement.key}
    attempts = {**book.attempts, placement.key: placement.desired.attempt}
    return replace(book, pushed_at={**book.pushed_at, placement.key: now}, invalid=invalid, attempts=attempts)


def forget_task(book: Book, task_id: str) -> Book:
    """The master stopped the whole task (DELETE /tasks/{id}): nothing of it is remembered."""
    def keep(mapping: Mapping[Key, Any]) -> dict[Key, Any]:
        return {k: v for k, v in mapping.items() if k[0] != task_id}

    return Book(keep(book.restarts), keep(book.finished_since), keep(book.pushed_at), keep(book.invalid), book.marks,
                keep(book.attempts))


def start_failed(book: Book, key: Key, reason: str) -> Book:
    """A start that raised (not a task's own failure, which the executor reports as Failed)."""
    return replace(book, invalid={**book.invalid, key: reason})


def reports(snapshot: Iterable[ReplicaStatus], book: Book) -> list[ReplicaReport]:
    """Heartbeat entries for the node's replicas (only those the master's wire can name).

    Each report names the attempt of its container (from its spec label; a desired replica that
    cannot run here, the attempt the master asked for), so the master ignores a leftover of an
    earlier attempt. A container of another attempt than the master's last list asks for (a
    leftover about to be replaced) is not reported at all.
    """
    out: dict[Key, ReplicaReport] = {}
    for status in snapshot:
        if not is_task_id(status.task_id) or not 0 <= status.replica < MAX_REPLICAS:
            continue  # not a task of the master's (its id could not be named on the wire)
        wanted = book.attempts.get(status.key)
        if status.attempt is not None and wanted is not None and status.attempt != wanted:
            continue
        status = truthful(status, book.marks)
        state = ReplicaState.PULLING if will_restart(status) else ReplicaState(status.state)
        error = status.reason[:MAX_ERROR_LENGTH] if status.reason else None
        restarts = min(book.restart_count(status.key), MAX_REPORTED_RESTARTS)
        out[status.key] = ReplicaReport(
            id=status.task_id, replica=status.replica, state=cast(Any, state), exit_code=status.exit_code, error=error,
            restarts=restarts, attempt=status.attempt,
        )
    for (task_id, replica), reason in book.invalid.items():
        if (task_id, replica) not in out and is_task_id(task_id) and 0 <= replica < MAX_REPLICAS:
            out[(task_id, replica)] = ReplicaReport(
                id=task_id, replica=replica, state=cast(Any, ReplicaState.FAILED), exit_code=None, error=reason[:MAX_ERROR_LENGTH],
                attempt=book.attempts.get((task_id, replica)),
            )
    return sorted(out.values(), key=lambda r: (r.id, r.replica))[:MAX_REPORTED_TASKS]
