"""`prime master` commands: start the service, list the run's nodes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from prime.config import (
    DEFAULT_HOST,
    DEFAULT_PASSWORD_ENV,
    DEFAULT_RPC_URL,
    MASTER_PORT,
    DataDir,
    DeploymentPath,
    Host,
    KeyFile,
    PasswordEnv,
    Port,
    RpcUrl,
    prime_home,
)
from prime.errors import ConfigError, PeerError, PrimeError

app = typer.Typer(no_args_is_help=True)

DEFAULT_PORT = MASTER_PORT
DEFAULT_DATA_DIR = prime_home() / "master"
DEFAULT_MASTER_URL = f"http://127.0.0.1:{DEFAULT_PORT}"

RunId = Annotated[int, typer.Option("--run-id", envvar="PRIME_RUN_ID", min=0, help="The run this master coordinates.")]
PublicUrl = Annotated[
    str | None,
    typer.Option("--public-url", envvar="PRIME_PUBLIC_URL", show_default=False,
                 help="URL nodes use to reach this master (sent in invites); default http://HOST:PORT."),
]
MasterUrl = Annotated[str, typer.Option("--master-url", envvar="PRIME_MASTER_URL", help="URL of the run's master.")]


def _positive(value: float, name: str) -> float:
    if not value > 0:
        raise ConfigError(f"{name} must be more than 0 seconds, got {value}; pass a positive number.")
    return value


@app.command()
def start(
    run_id: RunId,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    host: Host = DEFAULT_HOST,
    port: Port = DEFAULT_PORT,
    public_url: PublicUrl = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    heartbeat_interval: Annotated[float, typer.Option("--heartbeat-interval", envvar="PRIME_HEARTBEAT_INTERVAL",
                                                      help="Seconds between a node's heartbeats.")] = 30.0,
    unhealthy_after: Annotated[int, typer.Option("--unhealthy-after", envvar="PRIME_UNHEALTHY_AFTER", min=1,
                                                 help="Missed heartbeats before a node is Unhealthy.")] = 2,
    dead_after: Annotated[int, typer.Option("--dead-after", envvar="PRIME_DEAD_AFTER", min=2,
                                            help="Missed heartbeats before a node is Dead and its tasks move.")] = 3,
    heartbeat_grace: Annotated[float, typer.Option("--heartbeat-grace", envvar="PRIME_HEARTBEAT_GRACE", min=0,
                                                   help="Extra seconds allowed for network jitter.")] = 0.5,
    invite_ttl: Annotated[int, typer.Option("--invite-ttl", envvar="PRIME_INVITE_TTL", min=10,
                                            help="Seconds an invite stays valid.")] = 600,
    sync_interval: Annotated[float, typer.Option("--sync-interval", envvar="PRIME_SYNC_INTERVAL",
                                                 help="Seconds between storage syncs of running persistent tasks.")] = 10.0,
    poll_interval: Annotated[float, typer.Option("--poll-interval", envvar="PRIME_POLL_INTERVAL",
                                                 help="Seconds between reads of new chain events.")] = 2.0,
    peer_timeout: Annotated[float, typer.Option("--peer-timeout", envvar="PRIME_PEER_TIMEOUT",
                                                help="Timeout of each call to a miner or discovery.")] = 10.0,
    eject_after: Annotated[float, typer.Option("--eject-after", envvar="PRIME_EJECT_AFTER", min=0,
                                               help="Seconds a node stays Dead before the master ejects it on chain "
                                                    "(frees its seat; 0: never eject).")] = 300.0,
) -> None:
    """Start the master of one run: invite approved nodes, track heartbeats, schedule tasks, sync storage."""
    from prime.keys import load_account
    from prime.roles.master.server import serve
    from prime.roles.master.service import MasterSettings
    from prime.roles.master.state import StateConfig
    from prime.roles.process import configure_logging

    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")
    if dead_after <= unhealthy_after:
        raise ConfigError(f"--dead-after ({dead_after}) must be more than --unhealthy-after ({unhealthy_after}).")
    for value, name in ((heartbeat_interval, "--heartbeat-interval"), (sync_interval, "--sync-interval"),
                        (poll_interval, "--poll-interval"), (peer_timeout, "--peer-timeout")):
        _positive(value, name)
    account = load_account(key_file, password_env=password_env)
    url_host = f"[{host}]" if ":" in host else host
    settings = MasterSettings(
        run_id=run_id,
        public_url=(public_url or f"http://{url_host}:{port}").rstrip("/"),
        data_dir=Path(data_dir).expanduser(),
        state=StateConfig(heartbeat_interval_s=heartbeat_interval, unhealthy_after_missed=unhealthy_after,
                          dead_after_missed=dead_after, grace_s=heartbeat_grace, invite_ttl_s=invite_ttl),
        sync_interval_s=sync_interval,
        poll_interval_s=poll_interval,
        peer_timeout_s=peer_timeout,
        eject_after_s=eject_after,
    )
    # web3's chatter and one access line per heartbeat (which would dwarf the transitions worth
    # reading, and cost CPU at scale) are quiet unless PRIME_DEBUG is set.
    configure_logging()
    if public_url is None and host in ("0.0.0.0", "::"):
        logging.getLogger("prime.master").warning(
            "listening on %s without --public-url: invites tell nodes to reach %s, which only works on this "
            "machine; pass --public-url with an address nodes can reach", host, settings.public_url)
    asyncio.run(serve(settings=settings, account=account, rpc_url=rpc_url, deployment_path=Path(deployment),
                      host=host, port=port))


@app.command()
def nodes(
    master_url: MasterUrl = DEFAULT_MASTER_URL,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: bool = typer.Option(False, "--json", help="Print JSON (for scripts) instead of a table."),
) -> None:
    """List the run's nodes as the master sees them (signed by the run owner's or a master's key)."""
    from prime.keys import load_account

    account = load_account(key_file, password_env=password_env)
    answer = asyncio.run(_get_nodes(account, master_url.rstrip("/")))
    if json_output:
        typer.echo(json.dumps(answer, indent=2))
        return
    print_nodes(answer.get("nodes", []), now=time.time())


@app.command()
def eject(
    node: Annotated[str, typer.Argument(help="The node's address.", show_default=False)],
    run_id: Annotated[int | None, typer.Option("--run-id", envvar="PRIME_RUN_ID", min=1,
                                               help="The run to eject it from (default: the node's run on chain).")] = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    json_output: bool = typer.Option(False, "--json", help="Print JSON (for scripts) instead of a sentence."),
) -> None:
    """Eject an active node from the run on chain (a master's key); its provider can then withdraw the stake."""
    from prime.chain import operator
    from prime.chain.client import to_address
    from prime.keys import load_account

    target = to_address(node)
    account = load_account(key_file, password_env=password_env)
    change = operator.run_action(rpc_url, deployment, account, lambda client: operator.eject(client, target, run_id))
    operator.report([change], json_output=json_output)


async def _get_nodes(account: Any, master_url: str) -> dict[str, Any]:
    from prime.auth.client import SignedClient

    async with SignedClient(account, timeout_s=10, retries=1) as client:
        try:
            master = await client.identify(master_url)  # whom to address; its answer must be signed by it
            answer = await client.request("GET", f"{master_url}/nodes", audience=master.address)
        except PeerError as exc:
            if exc.status == 403:
                raise PrimeError(f"The master refused {account.address}: only the run's owner or a master may list its nodes; use that key.") from None
            if exc.status is None:
                raise PrimeError(f"Cannot reach the master at {master_url}; check --master-url and that it is running.") from None
            raise
    if not isinstance(answer, dict) or not isinstance(answer.get("nodes"), list):
        raise PrimeError(f"{master_url} did not answer like a prime master; check --master-url.")
    return answer


def _age(seconds: float | None, now: float) -> str:
    if seconds is None:
        return "never"
    age = max(0.0, now - seconds)
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.1f}h ago"


def print_nodes(nodes: list[dict[str, Any]], *, now: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=180)  # piped into a file or grep: no 80-column wrapping
    if not nodes:
        console.print("The master knows no nodes yet.")
        return
    table = Table(title=f"{len(nodes)} node(s)")
    # Addresses are copied into other commands: never wrap them (narrow terminals fold the URL instead).
    table.add_column("Address", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("GPUs")
    table.add_column("Last heartbeat")
    table.add_column("Chain")
    table.add_column("URL", overflow="fold")
    for node in nodes:
        hw = node.get("hardware") or {}
        gpus = f"{hw.get('gpu_count', 0)} x {hw.get('gpu_model') or '-'}" if hw.get("gpu_count") else "0"
        table.add_row(
            str(node.get("address")), str(node.get("state")), gpus, _age(node.get("last_heartbeat"), now),
            str(node.get("chain_status") or "-"), str(node.get("url") or "-"),
        )
    console.print(table)
