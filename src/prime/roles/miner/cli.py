"""`prime miner` commands."""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prime.config import (
    DEFAULT_HOST,
    DEFAULT_RPC_URL,
    MINER_PORT,
    DataDir,
    DeploymentPath,
    Host,
    KeyFile,
    Port,
    RpcUrl,
    prime_home,
)
from prime.errors import ConfigError

app = typer.Typer(no_args_is_help=True)

DEFAULT_DATA_DIR = prime_home() / "miner"
DEFAULT_PORT = MINER_PORT
PROVIDER_PASSWORD_ENV = "PRIME_PROVIDER_KEY_PASSWORD"
NODE_PASSWORD_ENV = "PRIME_KEY_PASSWORD"

# A prover injected by a Python caller (tests/support/cheating_miner.py), never by a flag.
_PROVER: contextvars.ContextVar[Any] = contextvars.ContextVar("prime_miner_prover", default=None)

RunId = Annotated[int, typer.Option("--run-id", envvar="PRIME_RUN_ID", min=0, help="The run (on chain) this node serves.")]
GpuSelection = Annotated[str, typer.Option("--gpu", envvar="PRIME_GPU", help="GPUs to offer: all, none, or NVML indices such as 0,1.")]
PublicIp = Annotated[
    str | None,
    typer.Option("--public-ip", envvar="PRIME_PUBLIC_IP", help="Address to announce (default: --host when specific, else the outbound interface's)."),
]
ProviderKeyFile = Annotated[
    Path | None,
    typer.Option(
        "--provider-key-file", envvar="PRIME_PROVIDER_KEY_FILE",
        help="Key file of the provider that pays the stake and sends registerNode/joinRun (default: the node key).",
    ),
]
Stake = Annotated[
    str | None,
    typer.Option("--stake", envvar="PRIME_STAKE", help="Stake in wei, or with a unit (0.01eth); default: the registry's minimum."),
]
TaskNetwork = Annotated[
    str, typer.Option("--task-network", envvar="PRIME_TASK_NETWORK", help="Docker network mode of task containers (bridge, host, none).")
]
TaskPorts = Annotated[
    str | None,
    typer.Option(
        "--task-ports", envvar="PRIME_TASK_PORTS", metavar="FIRST-LAST",
        help="TCP ports the members of group tasks (distributed training) may listen on, with host networking; "
             "default: none, the node hosts no group members.",
    ),
]
ReleaseGrace = Annotated[
    float,
    typer.Option(
        "--release-grace", envvar="PRIME_RELEASE_GRACE", min=0.0,
        help="Seconds after the run ends on chain before the miner stops the tasks its master has not stopped "
             "(a master down at the end); their files stay in the data dir.",
    ),
]
AnnounceInterval = Annotated[
    float, typer.Option("--announce-interval", envvar="PRIME_ANNOUNCE_INTERVAL", min=1.0, help="Seconds between re-announcements to discovery.")
]
ChainPollInterval = Annotated[
    float, typer.Option("--chain-poll-interval", envvar="PRIME_CHAIN_POLL_INTERVAL", min=0.1, help="Seconds between checks of the node's status on chain.")
]
FinishedRetention = Annotated[
    float,
    typer.Option(
        "--finished-retention", envvar="PRIME_FINISHED_RETENTION", min=0.0,
        help="Seconds a finished task's container (and its logs) is kept after the master stops listing it.",
    ),
]
AllowRegistry = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-registry", envvar="PRIME_ALLOW_REGISTRY", metavar="HOST[:PORT]",
        help=(
            "A registry (host or host:port, *.example.org for every name under it) tasks' images may be pulled from; "
            "repeatable, or comma separated. Given: only these (write docker.io for Docker Hub). "
            "Default: public registries only, no IP literals, local names or private addresses."
        ),
    ),
]


@app.command()
def probe(
    json_output: bool = typer.Option(False, "--json", help="Print JSON (for scripts) instead of tables."),
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Show this machine's GPUs, CPU, RAM and free disk, as the miner will offer them."""
    from prime.hardware import probe as probe_hardware

    info = probe_hardware(data_dir)
    if json_output:
        typer.echo(json.dumps(info.to_dict(), indent=2))
        return
    console = Console()
    if info.gpus:
        gpus = Table(title=f"GPUs (driver {info.driver_version or '?'}, CUDA {info.cuda_version or '?'})")
        for column in ("Index", "Model", "Memory (MiB)", "Used (MiB)", "Util %", "Temp °C", "UUID"):
            gpus.add_column(column, justify="right" if column not in ("Model", "UUID") else "left")
        for gpu in info.gpus:
            gpus.add_row(
                str(gpu.index),
                gpu.model,
                str(gpu.memory_total_mib),
                str(gpu.memory_used_mib),
                "-" if gpu.utilization_pct is None else str(gpu.utilization_pct),
                "-" if gpu.temperature_c is None else str(gpu.temperature_c),
                gpu.uuid,
            )
        console.print(gpus)
    else:
        console.print(f"No NVIDIA GPUs found ({info.gpu_error or 'NVML lists none'}); the node can still offer CPU.", highlight=False)
    if info.gpus and info.gpu_error:
        console.print(f"[yellow]Warning:[/] {info.gpu_error}", highlight=False)
    system = Table(title="System", show_header=False)
    system.add_column("What")
    system.add_column("Value")
    system.add_row("CPU", info.cpu_model)
    system.add_row("CPU cores", str(info.cpu_cores))
    system.add_row("RAM (MiB)", str(info.ram_mib))
    system.add_row("Free disk (GiB)", f"{info.disk_free_gib} at {info.data_dir}")
    console.print(system)


@app.command()
def start(
    run_id: RunId,
    gpu: GpuSelection = "all",
    host: Host = DEFAULT_HOST,
    port: Port = DEFAULT_PORT,
    public_ip: PublicIp = None,
    key_file: KeyFile = None,
    provider_key_file: ProviderKeyFile = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    stake: Stake = None,
    task_network: TaskNetwork = "bridge",
    announce_interval: AnnounceInterval = 60.0,
    chain_poll_interval: ChainPollInterval = 5.0,
    finished_retention: FinishedRetention = 3600.0,
    allow_registry: AllowRegistry = None,
    task_ports: TaskPorts = None,
    release_grace: ReleaseGrace = 300.0,
) -> None:
    """Start the miner: register the node for a run, get validated, join, and run the master's tasks."""
    from prime.keys import load_account
    from prime.roles.miner.node import MinerOptions, run_miner
    from prime.roles.miner.preflight import parse_task_ports
    from prime.roles.miner.registration import parse_stake
    from prime.roles.miner.registries import parse_entries
    from prime.roles.process import configure_logging

    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")
    if task_network not in ("bridge", "host", "none") and not task_network.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--task-network {task_network!r} is not a Docker network name; use bridge, host, none or a network you created.")
    port_range = parse_task_ports(task_ports)
    stake_wei = parse_stake(stake)
    allow_registries = tuple(allow_registry or ())
    parse_entries(allow_registries)  # a malformed entry fails here, before any transaction
    node_account = load_account(key_file, password_env=NODE_PASSWORD_ENV)
    provider_account = node_account
    if provider_key_file is not None:
        password_env = PROVIDER_PASSWORD_ENV if os.environ.get(PROVIDER_PASSWORD_ENV) else NODE_PASSWORD_ENV
        provider_account = load_account(provider_key_file, password_env=password_env)
    configure_logging()
    options = MinerOptions(
        run_id=run_id, rpc_url=rpc_url, deployment=Path(deployment), data_dir=Path(data_dir), host=host, port=port,
        gpu=gpu, public_ip=public_ip, stake_wei=stake_wei, task_network=task_network,
        announce_interval_s=announce_interval, chain_poll_interval_s=chain_poll_interval,
        finished_retention_s=finished_retention, allow_registries=allow_registries, task_ports=port_range,
        release_grace_s=release_grace,
    )
    asyncio.run(run_miner(options, node_account, provider_account, prover=_PROVER.get()))


@app.command()
def status(
    json_output: bool = typer.Option(False, "--json", help="Print JSON (for scripts) instead of tables."),
    key_file: KeyFile = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Show the node's status on chain, what it announced to discovery, its master, heartbeats and tasks."""
    from prime.roles.miner.status import gather_status, render

    result = asyncio.run(gather_status(data_dir=Path(data_dir), key_file=key_file, rpc_url=rpc_url, deployment=deployment))
    if json_output:
        typer.echo(json.dumps(result, indent=2))
        return
    render(result, Console(highlight=False, soft_wrap=True))


NodeOption = Annotated[
    str | None,
    typer.Option("--node", envvar="PRIME_NODE", help="The node's address (default: the address of --key-file)."),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of sentences.")]
SenderKeyFile = Annotated[
    Path | None,
    typer.Option("--provider-key-file", envvar="PRIME_PROVIDER_KEY_FILE",
                 help="Key file of the node's provider, to send the transaction with (default: the node key)."),
]


def _operator(node: str | None, key_file: Path | None, provider_key_file: Path | None) -> tuple[str, Any]:
    """(the node's address, the account that sends): the provider's key when given, else --key-file's."""
    from prime.chain.client import to_address
    from prime.keys import load_account

    target: str | None = to_address(node) if node else None  # a malformed address fails before any password prompt
    sender = None
    if provider_key_file is not None:
        password_env = PROVIDER_PASSWORD_ENV if os.environ.get(PROVIDER_PASSWORD_ENV) else NODE_PASSWORD_ENV
        sender = load_account(provider_key_file, password_env=password_env)
    if target is None and sender is not None and key_file is not None:
        from prime.keys import keystore_address, read_keystore

        target = keystore_address(read_keystore(key_file))  # the node key's clear-text address: no password
    if target is None or sender is None:
        node_account = load_account(key_file, password_env=NODE_PASSWORD_ENV)
        target = target or node_account.address
        sender = sender or node_account
    return target, sender


def _node_action(action: str, node: str | None, key_file: Path | None, provider_key_file: Path | None,
                 rpc_url: str, deployment: Path | None, json_output: bool) -> None:
    from prime.chain import operator

    target, sender = _operator(node, key_file, provider_key_file)

    async def act(client: Any) -> list[Any]:
        if action == "deregister":
            return await operator.deregister(client, target)
        return [await (operator.leave if action == "leave" else operator.withdraw)(client, target)]

    operator.report(operator.run_action(rpc_url, deployment, sender, act), json_output=json_output)


def _operator_command(action: str, summary: str) -> None:
    """Register ``prime miner {action}``: the three share their options and differ only in what they send."""
    def command(
        node: NodeOption = None,
        key_file: KeyFile = None,
        provider_key_file: SenderKeyFile = None,
        rpc_url: RpcUrl = DEFAULT_RPC_URL,
        deployment: DeploymentPath = None,
        json_output: JsonOutput = False,
    ) -> None:
        _node_action(action, node, key_file, provider_key_file, rpc_url, deployment, json_output)

    command.__doc__ = summary
    app.command(action)(command)


_operator_command("leave", "Take the node out of its run on chain (sent by its provider or the node key); "
                           "the stake becomes withdrawable.")
_operator_command("withdraw", "Pay the stake of a node that has left (or was rejected or ejected) back to its provider.")
_operator_command("deregister", "Leave the run (when still in it) and withdraw the stake to the provider: "
                                "how a GPU owner gets out.")


def main_with_prover(argv: list[str], prover: Any) -> None:
    """``prime miner start <argv>`` with ``prover`` answering the validators' challenges.

    The Python entry point for tests that need a real miner with a cheating prover; errors
    are printed and turned into the exit code exactly as by ``prime``.
    """
    from prime.cli import main

    token = _PROVER.set(prover)
    try:
        sys.argv = ["prime", "miner", "start", *argv]
        main()
    finally:
        _PROVER.reset(token)
