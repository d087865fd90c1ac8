"""Group tasks on the wire (issue 15): what a buyer asks for, and the group as a master serves it.

A group task is a task whose spec carries a ``group`` (``GroupRequest``): it runs one member on
each of N..M nodes, started together (gang), each with the environment torchrun needs
(``NODE_RANK``, ``MASTER_ADDR`` ...). Member ``rank`` r is the task's replica r: its logs, its
files, its synced /data are replica r's. The master's state machine is
``roles/master/groups.py``; ``GroupView`` is what it shows of it (``TaskView.group``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from msgspec import Meta

from prime.protocol.codec import Answer, Message

MAX_GROUP_NODES = 256  # = tasks.MAX_REPLICAS: every member is one replica
MAX_START_TIMEOUT_S = 7 * 86_400.0
MAX_GROUP_RESTARTS = 1000
DEFAULT_START_TIMEOUT_S = 300.0  # Kubernetes' gang scheduling waits 5 minutes too
DEFAULT_MAX_RESTARTS = 3
DEFAULT_RESTART_BACKOFF_S = 5.0
MAX_RESTART_BACKOFF_S = 3600.0
# Ports each member is given from its node's ``--task-ports`` range: the range's first is the
# rendezvous port (MASTER_PORT, used on rank 0), the next one the member's peer-to-peer port.
MEMBER_PORTS = 2

Port = Annotated[int, Meta(ge=1, le=65535)]
PortRange = Annotated[tuple[Port, Port], Meta(description="first and last port, inclusive")]
GroupNodes = Annotated[int, Meta(ge=1, le=MAX_GROUP_NODES)]


class GroupRequest(Message, frozen=True, omit_defaults=True):
    """``TaskSpec.group``: run one member on each of ``nodes`` .. ``max_nodes`` nodes, all at once.

    The task's ``gpus`` is the GPUs of each member (``--gpus-per-node``). ``max_nodes`` None:
    exactly ``nodes``. ``start_timeout_s`` bounds each wait for enough nodes (the first start
    and every restart's); ``max_restarts`` how often the whole group is started again after a
    member failed or its node died: the first time at once (a lost node is no crash loop), then
    after ``restart_backoff_s``, doubling for each further restart.
    """

    nodes: GroupNodes
    max_nodes: GroupNodes | None = None
    same_gpu_model: bool = False
    start_timeout_s: Annotated[float, Meta(gt=0, le=MAX_START_TIMEOUT_S)] = DEFAULT_START_TIMEOUT_S
    max_restarts: Annotated[int, Meta(ge=0, le=MAX_GROUP_RESTARTS)] = DEFAULT_MAX_RESTARTS
    restart_backoff_s: Annotated[float, Meta(ge=0, le=MAX_RESTART_BACKOFF_S)] = DEFAULT_RESTART_BACKOFF_S

    def __post_init__(self) -> None:
        if self.max_nodes is not None and self.max_nodes < self.nodes:
            raise ValueError(f"max_nodes ({self.max_nodes}) must not be fewer than nodes ({self.nodes}) (at max_nodes)")

    @property
    def most_nodes(self) -> int:
        return self.nodes if self.max_nodes is None else self.max_nodes


class GroupPhase(StrEnum):
    PENDING = "Pending"        # waiting until enough nodes fit (the start timeout runs)
    STARTING = "Starting"      # every member placed; not all of them reported running yet
    RUNNING = "Running"        # every member of the attempt started
    RESTARTING = "Restarting"  # an attempt ended (a member failed, a node died): backoff, then Pending
    FAILED = "Failed"          # final: start timeout or restart limit (``reason`` says which)
    COMPLETED = "Completed"    # final: every member of an attempt exited 0
    STOPPED = "Stopped"        # final: the buyer stopped the task (or its run ended)


class MemberView(Answer, frozen=True):
    """One member of the current attempt: its rank (= replica), node, address and ports."""

    rank: Annotated[int, Meta(ge=0, le=MAX_GROUP_NODES - 1)]
    node: str
    address: str
    rendezvous_port: Port
    peer_port: Port


MAX_GROUP_HISTORY = 50  # transitions a group view keeps (the oldest go first)


class GroupTransition(Answer, frozen=True):
    """One step of a group: when, the attempt, the phase it entered and why."""

    at: Annotated[float, Meta(ge=0, le=2.0**40)]
    attempt: Annotated[int, Meta(ge=-1, le=2**31)]
    phase: GroupPhase
    reason: Annotated[str, Meta(max_length=4096)] = ""


class GroupView(Answer, frozen=True):
    """``TaskView.group``: the group's phase, its attempt (-1 before the first), its members, and
    its last transitions (``history``, oldest first)."""

    phase: GroupPhase
    attempt: Annotated[int, Meta(ge=-1, le=2**31)] = -1
    restarts: Annotated[int, Meta(ge=0, le=2**31)] = 0
    reason: Annotated[str, Meta(max_length=4096)] | None = None
    members: Annotated[tuple[MemberView, ...], Meta(max_length=MAX_GROUP_NODES)] = ()
    history: Annotated[tuple[GroupTransition, ...], Meta(max_length=MAX_GROUP_HISTORY)] = ()
