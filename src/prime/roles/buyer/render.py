"""Rich tables and plain lines for what the buyer reads: runs, tasks, nodes, files, logs.

Pure functions from JSON-shaped data (what the master and the chain return) to rich
renderables, so the same view serves `prime buyer watch` and `prime devnet status --watch`
and can be tested without a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from prime.chain.types import RunInfo
from prime.protocol.groups import DEFAULT_MAX_RESTARTS, DEFAULT_RESTART_BACKOFF_S, DEFAULT_START_TIMEOUT_S

STATE_STYLES = {
    "Healthy": "green", "Running": "green", "Completed": "cyan",
    "Joined": "yellow", "Invited": "yellow", "Approved": "yellow", "Pending": "yellow", "Assigned": "yellow",
    "Pulling": "yellow", "Starting": "yellow", "Unhealthy": "magenta", "Lost": "magenta", "Restarting": "magenta",
    "Dead": "red", "Failed": "red", "Left": "dim", "Stopped": "dim",
    "alive": "green", "dead": "red", "skipped": "dim", "not started": "dim",
}
REPLICA_COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red")


def state_text(state: Any) -> Text:
    label = str(state) if state is not None else "-"
    return Text(label, style=STATE_STYLES.get(label, ""))


def short_address(address: Any) -> str:
    text = str(address or "-")
    return f"{text[:6]}…{text[-4:]}" if text.startswith("0x") and len(text) == 42 else text


def age(timestamp: Any, now: float | None = None) -> str:
    """'12s ago', '5m ago', '3h ago', or '-' for none."""
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - float(timestamp))
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


# --- runs ---------------------------------------------------------------------------------------


def run_to_json(run: RunInfo) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "owner": run.owner,
        "requirements": asdict(run.requirements),
        "discovery_uri": run.discovery_uri,
        "masters": list(run.masters),
        "ended": run.ended,
        "node_count": run.node_count,
    }


def run_table(run: RunInfo) -> Table:
    req = run.requirements
    table = Table(title=f"Run {run.run_id}", show_header=False)
    table.add_column("What", style="bold")
    table.add_column("Value")
    table.add_row("Owner", run.owner)
    table.add_row("State", Text("ended", style="red") if run.ended else Text("open", style="green"))
    table.add_row("Discovery", run.discovery_uri or "-")
    table.add_row("Masters", "\n".join(run.masters) or "none (add one with `prime buyer add-master`)")
    table.add_row("Active nodes", str(run.node_count))
    table.add_row("GPUs per node", f"≥ {req.min_gpus}" + (f" × {req.gpu_model!r}" if req.gpu_model else " (any model)"))
    table.add_row("GPU memory", f"≥ {req.min_gpu_memory_mib} MiB")
    table.add_row("CPU cores", f"≥ {req.min_cpu_cores}")
    table.add_row("RAM", f"≥ {req.min_ram_mib} MiB")
    table.add_row("Disk", f"≥ {req.min_disk_gib} GiB")
    table.add_row("Max nodes", str(req.max_nodes) if req.max_nodes else "unlimited")
    return table


# --- tasks --------------------------------------------------------------------------------------


def _command_text(spec: dict[str, Any]) -> str:
    command = spec.get("command") or spec.get("cmd") or []
    return " ".join(str(c) for c in command) if command else "(image default)"


def replica_summary(task: dict[str, Any]) -> str:
    """'2 Running, 1 Pending' from a task's replicas."""
    counts: dict[str, int] = {}
    for replica in task.get("replicas") or []:
        state = str(replica.get("state", "?"))
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "-"


def task_summary(task: dict[str, Any]) -> str:
    """A group task's size and phase ('group 2:3 · Running (attempt 1)'), else its replicas' states."""
    return group_summary(task) if is_group_task(task) else replica_summary(task)


WIDE = 120  # terminal columns from which the nodes table shows every column
WIDE_TASKS = 140


def tasks_table(tasks: Sequence[dict[str, Any]], now: float | None = None, *, width: int | None = None) -> Table:
    wide = width is None or width >= WIDE_TASKS
    table = Table(title=f"Tasks ({len(tasks)})")
    table.add_column("ID", no_wrap=True, min_width=12)  # ids are copied into other commands
    table.add_column("State", no_wrap=True, min_width=9)
    table.add_column("Image", overflow="ellipsis", no_wrap=True, max_width=32)
    if wide:
        table.add_column("Command", overflow="ellipsis", no_wrap=True, max_width=40)
        table.add_column("GPUs", no_wrap=True)
    table.add_column("Replicas", overflow="fold", min_width=9)
    table.add_column("Created", no_wrap=True, min_width=7)
    for task in tasks:
        spec = task.get("spec") or {}
        cells: list[Any] = [str(task.get("id", "?")), state_text(task.get("state")), str(spec.get("image", "-"))]
        if wide:
            cells += [_command_text(spec), str(spec.get("gpus", 0))]
        cells += [task_summary(task), age(task.get("created_at"), now)]
        table.add_row(*cells)
    if not tasks:
        table.add_row("-", "", "no tasks yet", *([""] * (len(table.columns) - 3)))
    return table


def task_detail(task: dict[str, Any], now: float | None = None) -> Group:
    """The task's spec and replicas; a group task's spec, its group (phase, attempt, restarts,
    reason) and its members instead of the replicas."""
    spec = task.get("spec") or {}
    group = spec.get("group") if isinstance(spec.get("group"), dict) else None
    info = Table(title=f"Task {task.get('id')}", show_header=False)
    info.add_column("What", style="bold")
    info.add_column("Value", overflow="fold")
    info.add_row("State", state_text(task.get("state")))
    info.add_row("Image", str(spec.get("image", "-")))
    info.add_row("Command", _command_text(spec))
    env = spec.get("env") or {}
    info.add_row("Env", "\n".join(f"{k}={v}" for k, v in env.items()) or "-")
    if group is not None:
        info.add_row("Nodes", group_size(spec) + (" (same GPU model)" if group.get("same_gpu_model") else ""))
        info.add_row("GPUs per node", str(spec.get("gpus", 0)))
    else:
        info.add_row("GPUs per replica", str(spec.get("gpus", 0)))
        info.add_row("Replicas", str(spec.get("replicas", 1)))
    info.add_row("Persistent /data", "yes" if spec.get("persistent") else "no")
    limits = []
    if spec.get("cpu_limit") is not None:
        limits.append(f"{spec['cpu_limit']} CPUs")
    if spec.get("memory_limit_mib") is not None:
        limits.append(f"{spec['memory_limit_mib']} MiB")
    info.add_row("Limits", ", ".join(limits) or "none")
    if group is not None:
        info.add_row("Start timeout", duration_text(group.get("start_timeout_s", DEFAULT_START_TIMEOUT_S)))
        info.add_row("Max restarts", str(group.get("max_restarts", DEFAULT_MAX_RESTARTS)))
        info.add_row("Backoff", f"first restart at once, then {duration_text(group.get('restart_backoff_s', DEFAULT_RESTART_BACKOFF_S))}, doubling")
    else:
        info.add_row("Restart", str(spec.get("restart", "never")))
    info.add_row("Created", age(task.get("created_at"), now))
    if task.get("stop_requested"):
        info.add_row("Stop requested", "yes")
    view = task.get("group")
    if group is not None and isinstance(view, dict):
        return Group(info, group_table(view), members_table(task, view), history_table(view, now))
    return Group(info, _replicas_table(task, now))


def _replicas_table(task: dict[str, Any], now: float | None) -> Table:
    replicas = Table(title="Replicas")
    for column in ("#", "State", "Node", "GPUs", "Attempt", "Restarts", "Exit", "Started", "Error"):
        replicas.add_column(column, overflow="fold")
    for replica in task.get("replicas") or []:
        exit_code = replica.get("exit_code")
        replicas.add_row(
            str(replica.get("index", "?")),
            state_text(replica.get("state")),
            str(replica.get("node") or "-"),
            ",".join(str(g) for g in replica.get("gpu_indices") or []) or "-",
            str(replica.get("attempt", 0)),
            str(replica.get("restarts") or 0),  # the node's restarts of this attempt (absent from older masters)
            "-" if exit_code is None else str(exit_code),
            age(replica.get("started_at"), now),
            str(replica.get("error") or ""),
        )
    return replicas


# --- group tasks (issue 15) -----------------------------------------------------------------------


def is_group_task(task: dict[str, Any]) -> bool:
    spec = task.get("spec") or {}
    return isinstance(spec, dict) and isinstance(spec.get("group"), dict)


def group_size(spec: dict[str, Any]) -> str:
    """'2' (exactly 2 nodes) or '2:3' (2 to 3), as --nodes spells it."""
    group = spec.get("group") or {}
    least, most = group.get("nodes", "?"), group.get("max_nodes")
    return f"{least}" if most is None or most == least else f"{least}:{most}"


def _attempt_text(attempt: Any) -> str:
    return str(attempt) if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt >= 0 else "-"


def group_summary(task: dict[str, Any]) -> str:
    """'group 2:3 · Running (attempt 1)'; 'group 2 · Pending' before the first attempt."""
    view = task.get("group")
    view = view if isinstance(view, dict) else {}
    text = f"group {group_size(task.get('spec') or {})} · {view.get('phase', '-')}"
    attempt = _attempt_text(view.get("attempt"))
    return text if attempt == "-" else f"{text} (attempt {attempt})"


def duration_text(seconds: Any) -> str:
    """300 → '5m', 5400 → '1h30m', 90 → '1m30s', 2.5 → '2.5s' (as --start-timeout reads them)."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


def group_table(view: dict[str, Any]) -> Table:
    """The group's phase, attempt, restarts and reason (GroupView)."""
    table = Table(title="Group", show_header=False)
    table.add_column("What", style="bold")
    table.add_column("Value", overflow="fold")
    table.add_row("Phase", state_text(view.get("phase")))
    attempt = _attempt_text(view.get("attempt"))
    table.add_row("Attempt", "- (not started yet)" if attempt == "-" else attempt)
    table.add_row("Restarts", str(view.get("restarts") or 0))
    table.add_row("Reason", str(view.get("reason") or "-"))
    return table


def members_table(task: dict[str, Any], view: dict[str, Any]) -> Table:
    """The current attempt's members: rank, node, address, ports, and the state of replica ``rank``."""
    replicas = {r.get("index"): r for r in task.get("replicas") or [] if isinstance(r, dict)}
    members = [m for m in view.get("members") or [] if isinstance(m, dict)]
    table = Table(title=f"Members ({len(members)})")
    for column in ("Rank", "Node", "Address", "Rendezvous port", "Peer port", "State", "Exit", "Error"):
        table.add_column(column, overflow="fold")
    for member in sorted(members, key=lambda m: int(m["rank"]) if isinstance(m.get("rank"), int) else 0):
        replica = replicas.get(member.get("rank")) or {}
        exit_code = replica.get("exit_code")
        table.add_row(
            str(member.get("rank", "?")),
            str(member.get("node") or "-"),
            str(member.get("address") or "-"),
            str(member.get("rendezvous_port", "-")),
            str(member.get("peer_port", "-")),
            state_text(replica.get("state")),
            "-" if exit_code is None else str(exit_code),
            str(replica.get("error") or ""),
        )
    if not members:
        waiting = f"waiting for {group_size(task.get('spec') or {})} nodes that fit" if view.get("phase") == "Pending" else ""
        table.add_row("-", "no members in this attempt", waiting, *([""] * (len(table.columns) - 3)))
    return table


def history_table(view: dict[str, Any], now: float | None = None) -> Table:
    """The group's last transitions, oldest first: when, the attempt, the phase it entered, why."""
    table = Table(title="History")
    for column in ("When", "Attempt", "Phase", "Why"):
        table.add_column(column, overflow="fold")
    for step in [h for h in view.get("history") or [] if isinstance(h, dict)]:
        table.add_row(age(step.get("at"), now), _attempt_text(step.get("attempt")), state_text(step.get("phase")),
                      str(step.get("reason") or ""))
    return table


# --- nodes --------------------------------------------------------------------------------------


def gpu_text(hardware: Any) -> str:
    if not isinstance(hardware, dict):
        return "-"
    count = hardware.get("gpu_count") or 0
    if not count:
        return "0"
    model = hardware.get("gpu_model") or "GPU"
    memory = hardware.get("gpu_memory_mib")
    return f"{count}× {model}" + (f" ({memory // 1024} GiB)" if isinstance(memory, int) and memory else "")


def _gpu_load(node: dict[str, Any]) -> str:
    sample = node.get("last_sample") or {}
    gpus = sample.get("gpus") or []
    parts = [f"{g['util']:.0f}%" for g in gpus if isinstance(g, dict) and isinstance(g.get("util"), (int, float))]
    return " ".join(parts) or "-"


def replicas_by_node(tasks: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Live (not finished) replicas per node address (lowercase)."""
    counts: dict[str, int] = {}
    for task in tasks:
        for replica in task.get("replicas") or []:
            node = replica.get("node")
            if node and replica.get("state") not in ("Completed", "Failed", "Stopped"):
                counts[str(node).lower()] = counts.get(str(node).lower(), 0) + 1
    return counts


def nodes_table(nodes: Sequence[dict[str, Any]], tasks: Sequence[dict[str, Any]] = (), now: float | None = None, *, width: int | None = None) -> Table:
    wide = width is None or width >= WIDE
    table = Table(title=f"Nodes ({len(nodes)})")
    # Addresses are copied into other commands: never wrapped.
    table.add_column("Node", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("GPUs", overflow="fold", min_width=4)
    if wide:
        table.add_column("GPU util", overflow="fold")
        table.add_column("CPU/RAM", overflow="fold")
    table.add_column("Heartbeat", no_wrap=True)
    if wide:  # a narrow terminal keeps what fits next to a whole address
        table.add_column("Replicas", no_wrap=True)
        table.add_column("URL", overflow="fold")
        table.add_column("Note", overflow="fold")
    on_node = replicas_by_node(tasks)
    for node in nodes:
        hardware = node.get("hardware") or {}
        cells: list[Any] = [str(node.get("address", "?")), state_text(node.get("state")), gpu_text(hardware)]
        if wide:
            cpu_ram = f"{hardware.get('cpu_cores', '?')} cores / {hardware.get('ram_mib', '?')} MiB" if hardware else "-"
            cells += [_gpu_load(node), cpu_ram]
        cells.append(age(node.get("last_heartbeat"), now))
        if wide:
            cells += [str(on_node.get(str(node.get("address", "")).lower(), 0)), str(node.get("url") or "-"), str(node.get("last_error") or "")]
        table.add_row(*cells)
    if not nodes:
        table.add_row("-", "", "no nodes yet: a miner shows up once a validator approved it", *([""] * (len(table.columns) - 3)))
    return table


# --- files and logs -----------------------------------------------------------------------------


def human_size(size: Any) -> str:
    if not isinstance(size, int):
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def files_table(task_id: str, files: Sequence[dict[str, Any]], now: float | None = None) -> Table:
    table = Table(title=f"Files of task {task_id} ({len(files)})")
    for column in ("Replica", "Path", "Size", "sha256", "Synced"):
        table.add_column(column, overflow="fold")
    for entry in files:
        table.add_row(
            str(entry.get("replica", 0)),
            str(entry.get("path", "?")),
            human_size(entry.get("size")),
            str(entry.get("sha256", ""))[:16] + "…",
            age(entry.get("synced_at"), now),
        )
    if not files:
        table.add_row("-", "no synced files (only persistent tasks keep /data)", "", "", "")
    return table


def _label(entry: dict[str, Any]) -> str:
    """``rank R`` on a group task's line (the master names the member's rank), else ``rR``."""
    rank = entry.get("rank")
    if isinstance(rank, int) and not isinstance(rank, bool):
        return f"rank {rank}"
    return f"r{entry.get('replica')}"


def _marker(entry: dict[str, Any]) -> str:
    marker = " err" if entry.get("stream") == "stderr" else ""
    attempt = entry.get("attempt")
    if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt > 0:  # a rescheduled replica's later attempt
        marker = f" a{attempt}{marker}"
    return marker


def format_log_line(entry: dict[str, Any]) -> str:
    """``[r0] text`` (the replica prefix, stderr marked ``[r0 err]``), ``[rank 0] text`` on a group
    task's merged lines; plain text when no replica."""
    line = str(entry.get("line", ""))
    if entry.get("replica") is None:
        return line
    marker = " err" if entry.get("stream") == "stderr" else ""
    return f"[{_label(entry)}{marker}] {line}"


def log_line_text(entry: dict[str, Any]) -> Text:
    """The same line, coloured per replica (content is never parsed as markup)."""
    replica = entry.get("replica")
    line = str(entry.get("line", ""))
    if replica is None:
        return Text(line)
    color = REPLICA_COLORS[int(replica) % len(REPLICA_COLORS)] if isinstance(replica, int) else ""
    marker = _marker(entry)
    text = Text(f"[{_label(entry)}{marker}] ", style=color)
    text.append(line, style="red" if marker else "")
    return text


# --- the live dashboard -------------------------------------------------------------------------


def dashboard(
    nodes: Sequence[dict[str, Any]],
    tasks: Sequence[dict[str, Any]],
    *,
    master_url: str,
    error: str | None = None,
    header: RenderableType | None = None,
    now: float | None = None,
    width: int | None = None,
) -> Group:
    """Nodes and tasks of one master (plus an optional header, e.g. the devnet's processes)."""
    now = time.time() if now is None else now
    title = Text(f"master {master_url}  ·  {time.strftime('%H:%M:%S', time.localtime(now))}  ·  Ctrl-C to quit", style="bold")
    parts: list[RenderableType] = []
    if header is not None:
        parts.append(header)
    parts.append(title)
    if error:
        parts.append(Text(f"! {error}", style="bold red"))
    parts.append(nodes_table(nodes, tasks, now, width=width))
    parts.append(tasks_table(tasks, now, width=width))
    return Group(*parts)
