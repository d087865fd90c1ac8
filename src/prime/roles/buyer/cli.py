"""`prime buyer …`: put a run on chain, then create tasks and read their state, logs and files.

Chain commands (create-run, add-master, remove-master, end-run, run show) talk to the registry
with the owner's key; the others talk to a master of the run (``--master-url`` /
``PRIME_MASTER_URL``) with requests signed by the same owner key. Read commands print rich
tables, or JSON with ``--json``. Every failure is one sentence.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from prime.config import DEFAULT_PASSWORD_ENV, DEFAULT_RPC_URL, DeploymentPath, KeyFile, PasswordEnv, RpcUrl
from prime.errors import ConfigError, PeerError, PrimeError
from prime.roles.buyer.common import JsonOutput, MasterUrl, TaskId
from prime.roles.buyer.common import account as _account
from prime.roles.buyer.common import console as _console
from prime.roles.buyer.common import echo_json as _echo_json
from prime.roles.buyer.common import with_master as _with_master
from prime.roles.buyer.task_cli import task_app

app = typer.Typer(no_args_is_help=True)
run_app = typer.Typer(no_args_is_help=True, help="Read a run's record on chain.")
app.add_typer(run_app, name="run")
app.add_typer(task_app, name="task")
RunId = Annotated[int, typer.Argument(min=1, help="The run's id (printed by create-run).")]


# --- chain commands ---------------------------------------------------------------------------


def _need_deployment(deployment: Path | None) -> Path:
    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")
    return deployment


def _with_registry(rpc_url: str, deployment: Path | None, account: Any, action: Callable[[Any], Awaitable[Any]]) -> Any:
    from prime.chain.client import RegistryClient

    path = _need_deployment(deployment)

    async def run() -> Any:
        async with await RegistryClient.connect(rpc_url, path, account) as client:
            return await action(client)

    return asyncio.run(run())


@app.command("create-run")
def create_run(
    discovery_uri: Annotated[str, typer.Option("--discovery-uri", envvar="PRIME_DISCOVERY_URI", help="URL of the discovery service nodes announce to; http://host:port#0xADDRESS names the key its answers are signed with.")],
    master: Annotated[Optional[list[str]], typer.Option("--master", help="Address of a master node of the run (repeatable).")] = None,
    min_gpus: Annotated[int, typer.Option("--min-gpus", min=0, help="GPUs each node needs at least.")] = 0,
    gpu_model: Annotated[str, typer.Option("--gpu-model", help="Required GPU model (case-insensitive substring, e.g. H100); empty = any.")] = "",
    min_gpu_memory_mib: Annotated[int, typer.Option("--min-gpu-memory-mib", min=0, help="Memory each GPU needs at least, in MiB.")] = 0,
    min_cpu_cores: Annotated[int, typer.Option("--min-cpu-cores", min=0, help="CPU cores each node needs at least.")] = 0,
    min_ram_mib: Annotated[int, typer.Option("--min-ram-mib", min=0, help="RAM each node needs at least, in MiB.")] = 0,
    min_disk_gib: Annotated[int, typer.Option("--min-disk-gib", min=0, help="Free disk each node needs at least, in GiB.")] = 0,
    max_nodes: Annotated[int, typer.Option("--max-nodes", min=0, help="Most nodes the run takes (0 = unlimited).")] = 0,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Create a run on chain (your key becomes its owner) and print its id."""
    from prime.chain.client import to_address
    from prime.chain.types import Requirements
    from prime.roles.buyer.render import run_to_json

    if not discovery_uri.startswith(("http://", "https://")):
        raise PrimeError(f"--discovery-uri {discovery_uri!r} is not an http(s) URL; write it like http://127.0.0.1:8090.")
    try:
        req = Requirements(min_gpus, gpu_model, min_gpu_memory_mib, min_cpu_cores, min_ram_mib, min_disk_gib, max_nodes)
    except ValueError as exc:
        raise PrimeError(f"The requirements are out of range: {exc}") from None
    masters = [to_address(m) for m in master or []]
    account = _account(key_file, password_env)
    discovery_uri = _signed_discovery_uri(discovery_uri, account)

    async def action(client: Any) -> tuple[Any, Any]:
        result = await client.create_run_tx(req, discovery_uri, masters)
        run_id = int(result.event("RunCreated").args["runId"])
        return result, await client.get_run(run_id)

    result, run = _with_registry(rpc_url, deployment, account, action)
    if json_output:
        _echo_json({"run_id": run.run_id, "tx_hash": result.tx_hash, "block": result.block, "run": run_to_json(run)})
        return
    typer.echo(run.run_id)
    err = Console(stderr=True, soft_wrap=True)
    err.print(f"Run {run.run_id} created by {account.address} (transaction {result.tx_hash}).", highlight=False)
    if not masters:
        err.print(f"It has no master yet: `prime buyer add-master {run.run_id} ADDRESS`.", highlight=False)


def _signed_discovery_uri(uri: str, account: Any) -> str:
    """``uri`` with the discovery service's signing address: as given, or asked of the service itself.

    Asking is the owner's one act of trust (the address is shown); from then on every node,
    master and validator checks each discovery answer against the address stored on chain.
    """
    from prime.auth.client import SignedClient
    from prime.clients.discovery import discovery_uri, split_discovery_uri
    base, signer = split_discovery_uri(uri)
    if signer is not None:
        return discovery_uri(base, signer)
    if "#" in uri:
        raise PrimeError(f"--discovery-uri {uri!r} ends in something that is not a 0x address after '#'; write it like http://127.0.0.1:8090#0xADDRESS.")

    async def ask() -> str:
        async with SignedClient(account, timeout_s=10, retries=1) as client:
            return (await client.identify(base)).address

    try:
        signer = asyncio.run(ask())
    except PeerError as exc:
        raise PrimeError(f"Could not ask discovery at {base} for its signing address ({exc}); start it first, or give it as {base}#0xADDRESS.") from None
    Console(stderr=True, soft_wrap=True).print(f"Discovery at {base} signs as {signer}; the run will only trust answers signed by that key.", highlight=False)
    return discovery_uri(base, signer)


def _master_change(run_id: int, address: str, *, add: bool, rpc_url: str, deployment: Path | None, key_file: Path | None, password_env: str, json_output: bool) -> None:
    from prime.chain.client import to_address

    target = to_address(address)
    account = _account(key_file, password_env)

    async def action(client: Any) -> tuple[Any, Any]:
        result = await (client.add_master(run_id, target) if add else client.remove_master(run_id, target))
        return result, await client.get_run(run_id)

    result, run = _with_registry(rpc_url, deployment, account, action)
    if json_output:
        _echo_json({"run_id": run_id, "master": target, "tx_hash": result.tx_hash, "block": result.block, "masters": run.masters})
        return
    verb = "is now a master of" if add else "is no longer a master of"
    typer.echo(f"{target} {verb} run {run_id} (transaction {result.tx_hash}); masters: {', '.join(run.masters) or 'none'}.")


@app.command("add-master")
def add_master(
    run_id: RunId,
    address: Annotated[str, typer.Argument(help="The master's address.")],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Make ADDRESS a master of the run (owner only)."""
    _master_change(run_id, address, add=True, rpc_url=rpc_url, deployment=deployment, key_file=key_file, password_env=password_env, json_output=json_output)


@app.command("remove-master")
def remove_master(
    run_id: RunId,
    address: Annotated[str, typer.Argument(help="The master's address.")],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Take the master role of the run away from ADDRESS (owner only)."""
    _master_change(run_id, address, add=False, rpc_url=rpc_url, deployment=deployment, key_file=key_file, password_env=password_env, json_output=json_output)


@app.command("end-run")
def end_run(
    run_id: RunId,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """End the run for good: no more registrations or joins (owner only)."""
    account = _account(key_file, password_env)

    async def action(client: Any) -> tuple[Any, Any]:
        result = await client.end_run(run_id)
        return result, await client.get_run(run_id)

    result, run = _with_registry(rpc_url, deployment, account, action)
    if json_output:
        _echo_json({"run_id": run_id, "ended": run.ended, "tx_hash": result.tx_hash, "block": result.block})
        return
    typer.echo(f"Run {run_id} has ended (transaction {result.tx_hash}).")


@run_app.command("show")
def run_show(
    run_id: RunId,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    json_output: JsonOutput = False,
) -> None:
    """Show a run's owner, requirements, masters and node count as the chain has them."""
    from prime.roles.buyer.render import run_table, run_to_json

    run = _with_registry(rpc_url, deployment, None, lambda client: client.get_run(run_id))
    if json_output:
        _echo_json(run_to_json(run))
    else:
        _console().print(run_table(run))


# --- master commands --------------------------------------------------------------------------


@app.command("tasks")
def tasks(
    master_url: MasterUrl = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """List the run's tasks and their states."""
    from prime.roles.buyer.render import tasks_table

    items = _with_master(master_url, key_file, password_env, lambda master: master.list_tasks())
    if json_output:
        _echo_json({"tasks": items})
    else:
        console = _console()
        console.print(tasks_table(items, width=console.width))


@app.command("nodes")
def nodes(
    master_url: MasterUrl = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """List the nodes the master knows: state, GPUs, last heartbeat."""
    from prime.roles.buyer.render import nodes_table

    async def action(master: Any) -> tuple[list, list]:
        return await asyncio.gather(master.nodes(), master.list_tasks())

    items, task_items = _with_master(master_url, key_file, password_env, action)
    if json_output:
        _echo_json({"nodes": items})
    else:
        console = _console()
        console.print(nodes_table(items, task_items, width=console.width))


@app.command("logs")
def logs(
    task_id: TaskId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the task ends (Ctrl-C to stop).")] = False,
    tail: Annotated[Optional[int], typer.Option("--tail", min=0, help="Only the last N lines first.")] = None,
    replica: Annotated[Optional[int], typer.Option("--replica", min=0, help="Only this replica's lines.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", min=0, help="A group task: only this member's lines (its rank is its replica).", show_default=False)] = None,
    attempt: Annotated[Optional[int], typer.Option("--attempt", min=0, help="Only this attempt's lines (0: the first placement; a rescheduled replica's next is 1, …).")] = None,
    master_url: MasterUrl = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Print a task's logs as the master keeps them (also after its node is gone), every replica and attempt
    merged, each line prefixed with its replica (r0, r1, …) and, past the first, its attempt (r0 a1);
    a group task's lines carry the member's rank instead, as the master writes it (--rank R: one member's)."""
    from prime.roles.buyer.render import log_line_text
    from prime.roles.buyer.spec import replica_of

    replica = replica_of(replica, rank)
    console = Console(highlight=False, soft_wrap=True)

    async def action(master: Any) -> int:
        count = 0
        async for entry in master.logs(task_id, follow=follow, tail=tail, replica=replica, attempt=attempt):
            count += 1
            if json_output:
                typer.echo(json.dumps(entry, separators=(",", ":")))
            elif "line" not in entry and "error" in entry:
                Console(stderr=True, soft_wrap=True).print(f"master: {entry.get('error')}: {entry.get('detail', '')}", highlight=False)
            else:
                console.print(log_line_text(entry))
        return count

    try:
        count = _with_master(master_url, key_file, password_env, action)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None  # Ctrl-C is how one stops following
    if count == 0 and not json_output:
        Console(stderr=True, soft_wrap=True).print(f"Task {task_id} has no log lines yet.", highlight=False)


@app.command("files")
def files(
    task_id: TaskId,
    download: Annotated[Optional[Path], typer.Option("--download", help="Download every synced file into this directory (sha256 checked).")] = None,
    master_url: MasterUrl = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """List the files the master synced from a persistent task's /data; --download DIR fetches them."""
    from prime.roles.buyer.master_client import download_target
    from prime.roles.buyer.progress import DownloadBars
    from prime.roles.buyer.render import files_table

    async def action(master: Any) -> tuple[list, list]:
        entries = await master.files(task_id)
        saved: list[dict[str, Any]] = []
        if download is not None:
            per_replica = len({e.get("replica", 0) for e in entries}) > 1
            # A bar on a terminal only (stderr, so stdout stays the table or JSON); nothing in logs and pipes.
            with DownloadBars(Console(stderr=True), entries, enabled=not json_output) as bars:
                for entry in entries:
                    target = download_target(download, entry, per_replica=per_replica)
                    fetched = await master.download(task_id, entry, target, bars.file(entry))
                    if not fetched:
                        bars.skipped(entry)
                    saved.append({**entry, "saved_to": str(target), "downloaded": fetched})
        return entries, saved

    entries, saved = _with_master(master_url, key_file, password_env, action, timeout_s=60.0)
    if json_output:
        _echo_json({"task_id": task_id, "files": saved if download is not None else entries})
        return
    _console().print(files_table(task_id, entries))
    if download is not None:
        fresh = sum(1 for s in saved if s["downloaded"])
        typer.echo(f"Downloaded {fresh} file(s) to {download} ({len(saved) - fresh} already there), sha256 verified.")


@app.command("watch")
def watch(
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    master_url: MasterUrl = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
) -> None:
    """Live view of the run's nodes (state, GPUs, last heartbeat) and tasks, refreshed in place."""
    from prime.roles.buyer.master_client import normalize_master_url
    from prime.roles.buyer.watch import watch as watch_view

    url = normalize_master_url(master_url)
    account = _account(key_file, password_env)
    try:
        asyncio.run(watch_view(account, url, interval_s=interval, once=once))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
