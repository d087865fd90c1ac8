"""`prime devnet up|down|status|logs|miner|demo`: a whole local network in one command.

Everything lives in a state directory (default ./.devnet, or --state-dir / PRIME_DEVNET_DIR):
keys, pid files, logs, each role's data, devnet.json and an env file for `prime buyer`.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from prime.config import DISCOVERY_PORT, MASTER_PORT, MINER_PORT, VALIDATOR_PORT
from prime.devnet.state import DEFAULT_STATE_DIR, PROCESSES, DevnetPaths, devnet_lock, require_info

app = typer.Typer(no_args_is_help=True)

StateDir = Annotated[
    Path,
    typer.Option("--state-dir", envvar="PRIME_DEVNET_DIR", help="Where the devnet keeps keys, logs, pid files and data."),
]
Gpu = Annotated[str, typer.Option("--gpu", help="GPUs the miner offers: none, all, or indices like 0,1.")]
TaskNetwork = Annotated[
    str,
    typer.Option("--task-network", help="Docker network mode of task containers: auto (bridge if the engine has one, else none), bridge, host or none."),
]


def _port_option(name: str, default: int) -> Any:
    return typer.Option(f"--{name}-port", min=1, max=65535, help=f"Port of the {name} (default {default}, or a free one if that is taken).", show_default=False)


def _shown(paths: DevnetPaths) -> str:
    """The state dir as the user would type it (relative when under the working directory)."""
    try:
        return str(paths.root.relative_to(Path.cwd()))
    except ValueError:
        return str(paths.root)


# --- up ------------------------------------------------------------------------------------------


@app.command()
def up(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Do not start this service (discovery, validator or master); run it yourself with the command `status` shows.")] = None,
    anvil_port: Annotated[Optional[int], _port_option("anvil", 8545)] = None,
    discovery_port: Annotated[Optional[int], _port_option("discovery", DISCOVERY_PORT)] = None,
    validator_port: Annotated[Optional[int], _port_option("validator", VALIDATOR_PORT)] = None,
    master_port: Annotated[Optional[int], _port_option("master", MASTER_PORT)] = None,
    miner_port: Annotated[Optional[int], _port_option("miner", MINER_PORT)] = None,
    heartbeat_interval: Annotated[float, typer.Option("--heartbeat-interval", min=0.5, help="Seconds between the miner's heartbeats to the master.")] = 5.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print devnet.json instead of the summary.")] = False,
) -> None:
    """Start anvil, deploy the registry, create a run, start discovery, validator and master."""
    from prime.devnet.up import UpOptions
    from prime.devnet.up import up as bring_up

    paths = DevnetPaths.at(state_dir)
    options = UpOptions(
        ports={"anvil": anvil_port, "discovery": discovery_port, "validator": validator_port, "master": master_port, "miner": miner_port},
        skip=set(skip or []),
        heartbeat_interval_s=heartbeat_interval,
    )
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with devnet_lock(paths, "run `prime devnet up`"):
        result = bring_up(paths, options, log=lambda text: err.print(text, style="dim"))
    if json_output:
        typer.echo(json.dumps({"already_up": result.already_up, **result.info.to_json()}, indent=2))
        return
    console = Console(highlight=False)
    if result.already_up:
        console.print(f"The devnet in {_shown(paths)} is already up (run {result.info.run_id}); nothing was changed.")
        console.print(_status_view(paths, result.info))
        return
    for name, (default, chosen) in result.moved_ports.items():
        err.print(f"Port {default} was taken, so the {name} uses {chosen}.", style="yellow")
    _print_summary(console, paths, result.info)


def _print_summary(console: Console, paths: DevnetPaths, info: Any) -> None:
    shown = _shown(paths)
    console.print(f"[bold green]The devnet is up[/] in {shown}: run [bold]{info.run_id}[/] on chain {info.chain_id}, registry {info.registry}.", soft_wrap=True)
    lines = [("anvil", info.rpc_url, f"admin {info.address('admin')}")]
    for name in ("discovery", "validator", "master"):
        service = info.services[name]
        key = f"key {info.address(name)}" if name in info.keys else ""
        lines.append((name, service.url, "skipped: `prime devnet status` shows how to start it" if service.skipped else key))
    lines.append(("miner", info.url("miner"), f"not started; node {info.address('node')}"))
    lines.append(("you", "", f"run owner {info.address('owner')}"))
    for name, where, note in lines:
        console.print(f"  {name:<10} {where:<23} [dim]{note}[/]", highlight=False, soft_wrap=True)
    console.print("\n[bold]Next:[/]")
    for command, what in (
        ("make watch-miner", "start a miner in this terminal (prime devnet miner): it registers, is validated and invited"),
        ("make status", "live view of nodes and tasks, in another terminal (prime devnet status --watch)"),
        (f"source {shown}/env", "act as the run's owner in this shell, then for example:"),
        ("prime buyer task create --image prime-devnet-busybox:latest --persistent -- sh -c 'echo hi; echo 42 > /data/out.txt'", ""),
        ("prime buyer logs TASK_ID -f", ""),
        ("prime buyer files TASK_ID --download ./out", ""),
        ("make demo", "or let the demo do all of it and narrate each step (prime devnet demo)"),
        ("make down", "stop everything (prime devnet down)"),
    ):
        console.print(f"  {command}" + (f"\n      [dim]{what}[/]" if what else ""), highlight=False, soft_wrap=True)


# --- down ----------------------------------------------------------------------------------------


@app.command()
def down(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Stop everything the devnet started and remove its miner's task containers."""
    from prime.devnet.up import down as bring_down

    paths = DevnetPaths.at(state_dir)
    if not paths.root.exists():
        typer.echo(f"There is no devnet in {_shown(paths)}; nothing to stop.")
        return
    with devnet_lock(paths, "run `prime devnet down`"):
        result = bring_down(paths)
    console = Console(highlight=False)
    for name, outcome in result.stopped.items():
        if outcome != "not running":
            console.print(f"{name:<10} {outcome}")
    if result.containers_removed:
        console.print(f"removed {result.containers_removed} task container(s) of the devnet's node")
    elif result.container_note:
        console.print(f"[dim]task containers not checked: {result.container_note}[/]")
    if any("still running" in o for o in result.stopped.values()):
        raise typer.Exit(1)
    console.print(f"The devnet in {_shown(paths)} is down.")


# --- status --------------------------------------------------------------------------------------


def _process_rows(paths: DevnetPaths, info: Any) -> list[dict[str, Any]]:
    from prime.devnet.up import process_states

    rows = []
    states = process_states(paths)
    for name in PROCESSES:
        record, alive = states[name]
        service = info.services.get(name)
        if alive:
            state = "alive"
        elif service is not None and service.skipped:
            state = "skipped"
        elif record is not None:
            state = "dead"  # its pid file is there but the process is gone
        else:
            log = paths.log(name)
            state = "stopped" if log.exists() else "not started"
        log = paths.log(name)
        rows.append({
            "name": name,
            "state": state,
            "pid": record.pid if record is not None and alive else None,
            "port": service.port if service else None,
            "url": service.url if service else None,
            "log": str(log) if log.exists() else None,
        })
    return rows


def _status_view(paths: DevnetPaths, info: Any) -> Group:
    from prime.roles.buyer.render import state_text

    table = Table(title=f"devnet {_shown(paths)} · run {info.run_id} · registry {info.registry}")
    table.add_column("Process")
    table.add_column("State", no_wrap=True)
    table.add_column("PID", no_wrap=True)
    table.add_column("URL", no_wrap=True)
    table.add_column("Log", overflow="fold")
    for row in _process_rows(paths, info):
        log = os.path.relpath(row["log"]) if row["log"] else None
        table.add_row(row["name"], state_text(row["state"]), str(row["pid"] or "-"), row["url"] or "-", log or "-")
    parts: list[Any] = [table]
    skipped = [name for name, s in info.services.items() if s.skipped]
    for name in skipped:
        command = " ".join(shlex.quote(a) for a in info.commands.get(name, [])[3:])  # without "python -m prime.cli"
        parts.append(Text(f"{name} is skipped; start it with: PRIME_KEY_PASSWORD=devnet prime {command}", style="dim"))
    return Group(*parts)


@app.command()
def status(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    watch: Annotated[bool, typer.Option("--watch", help="Keep refreshing, with the master's nodes and tasks (Ctrl-C to quit).")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between refreshes with --watch.")] = 2.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the devnet's processes (alive or dead, URL, log); --watch adds the live view of nodes and tasks."""
    paths = DevnetPaths.at(state_dir)
    info = require_info(paths)
    if json_output:
        typer.echo(json.dumps({
            "state_dir": info.state_dir, "run_id": info.run_id, "rpc_url": info.rpc_url, "chain_id": info.chain_id,
            "registry": info.registry, "deployment": info.deployment, "node_address": info.node_address,
            "processes": _process_rows(paths, info), "keys": info.keys,
        }, indent=2))
        return
    if not watch:
        Console().print(_status_view(paths, info))
        return
    import asyncio

    from prime.devnet.demo import owner_account
    from prime.roles.buyer.watch import watch as watch_view

    try:
        asyncio.run(watch_view(owner_account(info), info.url("master"), interval_s=interval, header=lambda: _status_view(paths, info)))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


# --- logs ----------------------------------------------------------------------------------------


@app.command()
def logs(
    role: Annotated[Optional[str], typer.Argument(help=f"One of {', '.join(PROCESSES)}; all when left out.", show_default=False)] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C to stop).")] = False,
    tail: Annotated[int, typer.Option("--tail", min=0, help="Lines of each log to show first.")] = 50,
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Show the devnet's log files (the miner's only when it runs in the background)."""
    from prime.devnet.logs import log_names, show_logs

    paths = DevnetPaths.at(state_dir)
    names = log_names(paths, role)
    try:
        show_logs(paths, names, tail=tail, follow=follow, emit=lambda line: typer.echo(line))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


# --- miner ---------------------------------------------------------------------------------------


@app.command()
def miner(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    gpu: Gpu = "none",
    task_network: TaskNetwork = "auto",
    background: Annotated[bool, typer.Option("--background", help="Run it in the background (log: `prime devnet logs miner`).")] = False,
    task_ports: Annotated[Optional[str], typer.Option(
        "--task-ports", metavar="FIRST-LAST", help="Ports this node's group-task members may listen on (none: it hosts none).")] = None,
) -> None:
    """Start a miner with the devnet's node and provider keys (in the foreground: Ctrl-C stops it)."""
    from prime.devnet.miner import exec_foreground, start_background

    paths = DevnetPaths.at(state_dir)
    info = require_info(paths)
    if background:
        record, started = start_background(paths, info, gpu=gpu, task_network=task_network, task_ports=task_ports)
        typer.echo(f"The miner {'started' if started else 'was already running'} (pid {record.pid}, node {info.node_address}); "
                   f"its log: prime devnet logs miner -f")
        return
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"Starting the devnet's miner (node {info.node_address}, provider {info.address('provider')}, run {info.run_id}) "
        "in the foreground; Ctrl-C stops it (its containers keep running until `prime devnet down`).", style="dim"
    )
    exec_foreground(paths, info, gpu=gpu, task_network=task_network, task_ports=task_ports)


# --- demo ----------------------------------------------------------------------------------------


@app.command()
def demo(
    state_dir: StateDir = DEFAULT_STATE_DIR,
    gpu: Gpu = "none",
    task_network: TaskNetwork = "auto",
    down_after: Annotated[bool, typer.Option("--down-after", help="Stop the whole devnet when the demo is done (for CI).")] = False,
) -> None:
    """Bring the devnet up (if needed), onboard a miner, run a task, follow its logs, fetch its files."""
    from prime.devnet.demo import demo as run_demo
    from prime.devnet.up import UpOptions
    from prime.devnet.up import up as bring_up

    paths = DevnetPaths.at(state_dir)
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with devnet_lock(paths, "run `prime devnet demo`"):
        result = bring_up(paths, UpOptions(), log=lambda text: err.print(text, style="dim"))
        try:
            run_demo(paths, result, gpu=gpu, task_network=task_network, console=console)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    if down_after:
        from prime.devnet.up import down as bring_down

        with devnet_lock(paths, "run `prime devnet down`"):
            bring_down(paths)
        console.print(f"The devnet in {_shown(paths)} is down again (--down-after).")
