"""``prime miner status``: the node as the chain, discovery and this machine know it.

Needs no password: the node's address comes from the local state file (or the key file's
clear-text address). Discovery lets only validators and masters read node records, so the
discovery part is what this node last announced (from the local state).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from prime.errors import PrimeError
from prime.roles.miner.state import MinerState, StateFile

DISCOVERY_SOURCE = "local state (discovery lets only validators and masters read node records)"


def node_address(state: MinerState, key_file: Path | None) -> str:
    """The node's address: the key file's clear-text address, else the one in the state file."""
    if key_file is not None:
        from prime.keys import keystore_address, read_keystore

        address = keystore_address(read_keystore(key_file))
        if address is None:
            raise PrimeError(f"Key file {key_file} does not show its address; pass the node's key file made by `prime keys new`.")
        return address
    if state.node:
        return state.node
    raise PrimeError("This data directory has no miner state yet; pass --data-dir of a miner that ran, or --key-file of the node.")


async def chain_view(address: str, rpc_url: str, deployment: Path | None) -> dict[str, Any]:
    """The node's on-chain record (or an "error" entry: status still shows the local part)."""
    if deployment is None:
        return {"error": "not checked: pass --deployment (or PRIME_DEPLOYMENT) to read the node's status on chain"}
    from prime.chain.client import RegistryClient

    try:
        async with await RegistryClient.connect(rpc_url, deployment) as registry:
            info = await registry.get_node(address)
            view: dict[str, Any] = {
                "status": info.status.label,
                "run_id": info.run_id if info.registered else None,
                "stake_wei": info.stake,
                "provider": info.provider if info.registered else None,
                "report_hash": "0x" + info.report_hash.hex(),
                "specs": {
                    "gpu_count": info.specs.gpu_count, "gpu_model": info.specs.gpu_model,
                    "gpu_memory_mib": info.specs.gpu_memory_mib, "cpu_cores": info.specs.cpu_cores,
                    "ram_mib": info.specs.ram_mib, "disk_gib": info.specs.disk_gib,
                } if info.registered else None,
            }
            if info.registered:
                run = await registry.get_run(info.run_id)
                view["discovery_uri"] = run.discovery_uri
                view["run_ended"] = run.ended
            return view
    except PrimeError as exc:
        return {"error": exc.message}


def local_view(state: MinerState, data_dir: Path) -> dict[str, Any]:
    return {
        "data_dir": str(data_dir),
        "run_id": state.run_id,
        "registration_tx": state.registration_tx,
        "master_url": state.master_url,
        "master": state.master,
        "join_tx": state.join_tx,
        "joined_at": state.joined_at,
        "last_heartbeat_at": state.last_heartbeat_at,
        "last_heartbeat_error": state.last_heartbeat_error,
        "heartbeat_interval_s": state.heartbeat_interval_s,
        "verdict": None if state.verdict is None else {
            "approved": state.verdict.approved, "reason": state.verdict.reason,
            "report_hash": state.verdict.report_hash, "validator": state.verdict.validator, "at": state.verdict.at,
        },
        "tasks": state.tasks,
    }


def discovery_view(state: MinerState, chain: dict[str, Any]) -> dict[str, Any]:
    announced = state.announced
    return {
        "url": chain.get("discovery_uri") or (announced.discovery_url if announced else None),
        "announced": None if announced is None else {"ip": announced.ip, "port": announced.port, "at": announced.at},
        "source": DISCOVERY_SOURCE,
    }


async def gather_status(*, data_dir: Path, key_file: Path | None, rpc_url: str, deployment: Path | None) -> dict[str, Any]:
    state_file = StateFile(data_dir)
    state = state_file.load()
    address = node_address(state, key_file)
    if state.node and state.node.lower() != address.lower():
        state = MinerState()  # the state in this data dir belongs to another node
    chain = await chain_view(address, rpc_url, deployment)
    return {"node": address, "chain": chain, "discovery": discovery_view(state, chain), "local": local_view(state, data_dir)}


def _ago(at: float | None) -> str:
    if at is None:
        return "never"
    seconds = max(0.0, time.time() - at)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render(status: dict[str, Any], console: Console) -> None:
    """The status for people: one table per source."""
    chain, discovery, local = status["chain"], status["discovery"], status["local"]
    table = Table(title=f"Node {status['node']}", show_header=False)
    table.add_column("What")
    table.add_column("Value")
    if "error" in chain:
        table.add_row("On chain", f"[yellow]{chain['error']}[/]")
    else:
        table.add_row("Status on chain", chain["status"])
        table.add_row("Run", "-" if chain["run_id"] is None else str(chain["run_id"]) + (" (ended)" if chain.get("run_ended") else ""))
        table.add_row("Stake (wei)", str(chain["stake_wei"]))
        if chain.get("provider"):
            table.add_row("Provider", chain["provider"])
    announced = discovery["announced"]
    table.add_row("Discovery", discovery["url"] or "-")
    table.add_row(
        "Announced",
        f"{announced['ip']}:{announced['port']} ({_ago(announced['at'])}, per the local state)" if announced else "not yet (per the local state)",
    )
    table.add_row("Master", local["master_url"] or "none yet (waiting for an invite)")
    heartbeat = _ago(local["last_heartbeat_at"])
    if local["last_heartbeat_error"]:
        heartbeat += f"; last error: {local['last_heartbeat_error']}"
    table.add_row("Last heartbeat", heartbeat)
    verdict = local["verdict"]
    if verdict:
        table.add_row("Validator verdict", f"{'approved' if verdict['approved'] else 'rejected'}: {verdict['reason']}")
    console.print(table)
    tasks = local["tasks"]
    if tasks:
        task_table = Table(title="Tasks (as last reported to the master)")
        for column in ("Task", "Replica", "State", "Exit code", "Error"):
            task_table.add_column(column)
        for task in tasks:
            task_table.add_row(
                str(task.get("id")), str(task.get("replica")), str(task.get("state")),
                "-" if task.get("exit_code") is None else str(task.get("exit_code")), task.get("error") or "",
            )
        console.print(task_table)
    else:
        console.print("No tasks reported yet.")
