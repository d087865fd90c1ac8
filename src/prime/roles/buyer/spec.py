"""Turn `prime buyer task create` options into the master's TaskSpec JSON (pure, no I/O).

The spec is validated here with the master's own parser (``TaskSpec.from_json``), so a typo
is one sentence before anything goes on the wire, and what we send is exactly what the
master accepts. A group task (``--nodes N[:M]``, issue 15) is checked in the CLI's words first
(``group_options``): the options that only a group takes, and those a group cannot take.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import Any

from prime.errors import PrimeError
from prime.protocol.errors import ValidationError
from prime.protocol.groups import MAX_GROUP_NODES, MAX_RESTART_BACKOFF_S, MAX_START_TIMEOUT_S
from prime.protocol.tasks import ENV_NAME_RE, TaskSpec


class OptionError(PrimeError):
    """Options the CLI refuses before sending anything: a usage error (exit code 2, as click's own)."""

    exit_code = 2


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``["K=V", ...]`` → ``{"K": "V"}``; the value may contain ``=``, the last K wins."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise OptionError(f"--env {item!r} is not NAME=VALUE; write it like --env LEARNING_RATE=0.1.")
        if not ENV_NAME_RE.match(name):
            raise OptionError(f"--env {name!r} is not a valid variable name; use letters, digits and '_' (not starting with a digit).")
        env[name] = value
    return env


def parse_gpus(text: str) -> int | str:
    """``--gpus N`` or ``--gpus all`` (every GPU of one node)."""
    value = text.strip().lower()
    if value == "all":
        return "all"
    if value.isdigit():
        return int(value)
    raise OptionError(f"--gpus {text!r} is not a number of GPUs; pass a whole number such as --gpus 1, or --gpus all.")


def parse_command(cmd: str | None, args: Sequence[str] | None) -> list[str]:
    """The command from ``--cmd "…"`` (split like a shell would) or from the words after ``--``."""
    args = list(args or [])
    if cmd is not None and args:
        raise OptionError("Give the command either with --cmd \"…\" or after --, not both.")
    if cmd is None:
        return args
    try:
        return shlex.split(cmd)
    except ValueError as exc:
        raise OptionError(f"--cmd {cmd!r} cannot be split into words ({exc}); check its quotes.") from None


def build_task_spec(
    *,
    image: str,
    command: Sequence[str] = (),
    env: dict[str, str] | None = None,
    gpus: int | str = 0,
    replicas: int = 1,
    persistent: bool = False,
    cpu_limit: float | None = None,
    memory_limit_mib: int | None = None,
    restart: str = "never",
    group: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The POST /tasks body; a spec the master would refuse raises one sentence naming the option.

    ``group``: a ``GroupRequest`` as JSON (``group_options`` builds it), for a group task."""
    body: dict[str, Any] = {
        "image": image,
        "command": list(command),
        "env": dict(env or {}),
        "gpus": gpus,
        "replicas": replicas,
        "persistent": persistent,
        "restart": restart,
    }
    if cpu_limit is not None:
        body["cpu_limit"] = cpu_limit
    if memory_limit_mib is not None:
        body["memory_limit_mib"] = memory_limit_mib
    if group is not None:
        body["group"] = group
    try:
        return TaskSpec.from_json(body).to_json()
    except ValidationError as exc:
        option = _GROUP_OPTIONS.get(exc.field) if group is not None else None
        if option is None:
            option = "--" + exc.field.split(".")[0].split("[")[0].replace("_", "-")
            option = {"--command": "the command"}.get(option, option)
        raise OptionError(f"The task is not valid: {option} {exc.message[0].lower()}{exc.message[1:]}") from None


# The options a group task's spec fields come from (a refusal names the option, not the field).
_GROUP_OPTIONS = {
    "gpus": "--gpus-per-node",
    "group": "--nodes",
    "group.nodes": "--nodes",
    "group.max_nodes": "--nodes",
    "group.same_gpu_model": "--same-gpu-model",
    "group.start_timeout_s": "--start-timeout",
    "group.max_restarts": "--max-restarts",
    "group.restart_backoff_s": "--restart-backoff",
}


# --- group tasks ----------------------------------------------------------------------------------

_NODES_RE = re.compile(r"^(\d{1,6})(?::(\d{1,6}))?$")
_NUMBER = r"\d{1,9}(?:\.\d{1,9})?"
_DURATION_RE = re.compile(rf"^(?:({_NUMBER})h)?(?:({_NUMBER})m)?(?:({_NUMBER})s)?$")


def parse_nodes(text: str) -> tuple[int, int | None]:
    """``--nodes N`` (exactly N nodes) or ``--nodes N:M`` (N to M): (N, M or None)."""
    match = _NODES_RE.match(text.strip())
    if match is None:
        raise OptionError(f"--nodes {text!r} is not N or N:M; write it like --nodes 2 (exactly 2 nodes) or --nodes 2:4 (2 to 4 nodes).")
    least, most = int(match[1]), None if match[2] is None else int(match[2])
    if least < 1:
        raise OptionError(f"--nodes {text}: a group needs at least 1 node.")
    if most is not None and most < least:
        raise OptionError(f"--nodes {text}: the most nodes ({most}) cannot be fewer than the least ({least}); write it like --nodes {most}:{least}.")
    if max(least, most or 0) > MAX_GROUP_NODES:
        raise OptionError(f"--nodes {text}: a group has at most {MAX_GROUP_NODES} nodes.")
    return least, most


def parse_duration(text: str, option: str = "--start-timeout", *, zero_ok: bool = False,
                   most_s: float = MAX_START_TIMEOUT_S) -> float:
    """Seconds from ``90s``, ``5m``, ``1h``, ``1h30m`` or a plain number of seconds (``300``, ``2.5``);
    more than 0 (``zero_ok``: 0 too), at most ``most_s``."""
    value = text.strip().lower()
    if re.fullmatch(_NUMBER, value):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(value)
        if not value or match is None:
            raise OptionError(f"{option} {text!r} is not a duration; write it like 90s, 5m, 1h30m or a number of seconds.")
        hours, minutes, secs = (float(part) if part else 0.0 for part in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds < 0 or (seconds == 0 and not zero_ok):
        raise OptionError(f"{option} {text!r} must be longer than 0 seconds.")
    if seconds > most_s:
        raise OptionError(f"{option} {text!r} is longer than the most it can be, {_hours(most_s)}.")
    return seconds


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g}h ({seconds / 86400:g} days)" if seconds >= 86400 else f"{seconds / 3600:g}h"


def _options_text(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def group_options(
    *,
    nodes: str | None,
    gpus: str | None = None,
    gpus_per_node: int | None = None,
    same_gpu_model: bool = False,
    start_timeout: str | None = None,
    max_restarts: int | None = None,
    restart_backoff: str | None = None,
    replicas: int = 1,
    restart: str = "never",
) -> tuple[int | str, dict[str, Any] | None]:
    """(the spec's gpus, its ``group`` JSON or None) from the options as given (None: not given).

    Without ``--nodes`` the group's own options are refused; with it, ``--replicas`` other than 1
    and ``--restart`` other than never are (a group's size is its nodes, it restarts as a whole).
    The spec's ``gpus`` of a group task is its GPUs per node (``--gpus-per-node``, or ``--gpus``).
    """
    if nodes is None:
        given = [name for name, present in (
            ("--gpus-per-node", gpus_per_node is not None), ("--same-gpu-model", same_gpu_model),
            ("--start-timeout", start_timeout is not None), ("--max-restarts", max_restarts is not None),
            ("--restart-backoff", restart_backoff is not None),
        ) if present]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise OptionError(f"{_options_text(given)} only {verb} to a group task; add --nodes N (or N:M) to run one member on each of N nodes.")
        return parse_gpus(gpus if gpus is not None else "0"), None
    least, most = parse_nodes(nodes)
    if replicas != 1:
        raise OptionError(f"A group task runs one member on each of its --nodes, so it takes no --replicas {replicas}; leave --replicas out.")
    if restart != "never":
        raise OptionError(f"A group task is restarted as a whole (--max-restarts K), so it takes no --restart {restart}; leave --restart out.")
    per_node: int | str
    if gpus_per_node is not None:
        if gpus is not None and parse_gpus(gpus) != gpus_per_node:
            raise OptionError(f"--gpus {gpus} and --gpus-per-node {gpus_per_node} disagree; for a group task give only --gpus-per-node {gpus_per_node}.")
        per_node = gpus_per_node
    else:
        per_node = parse_gpus(gpus if gpus is not None else "0")
        if per_node == "all":
            raise OptionError("A group member needs a number of GPUs, not --gpus all; give the GPUs of each node with --gpus-per-node G.")
    group: dict[str, Any] = {"nodes": least, "same_gpu_model": same_gpu_model}
    if most is not None:
        group["max_nodes"] = most
    if start_timeout is not None:
        group["start_timeout_s"] = parse_duration(start_timeout)
    if max_restarts is not None:
        group["max_restarts"] = max_restarts
    if restart_backoff is not None:
        group["restart_backoff_s"] = parse_duration(restart_backoff, option="--restart-backoff", zero_ok=True,
                                                    most_s=MAX_RESTART_BACKOFF_S)
    return per_node, group



def replica_of(replica: int | None, rank: int | None) -> int | None:
    """The replica ``--replica R`` or ``--rank R`` names (a group member's rank is its replica)."""
    if replica is not None and rank is not None and replica != rank:
        raise OptionError(f"--replica {replica} and --rank {rank} name different members; a member's rank is its replica, so give one of them.")
    return replica if replica is not None else rank
