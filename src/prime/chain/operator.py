"""What operators do to one node's record on chain: leave, withdraw, deregister, eject, slash.

Each action reads the node first (a node the registry does not know is one sentence before
anything is signed), sends its transaction and waits for the receipt (a revert arrives as the
contract's own error, decoded into a sentence), then reads the record again and, when stake
moved, the payee's balance just before and at the transaction's block. The result is a
``NodeChange`` per transaction: what changed, as a line for people or a dict for ``--json``.

Used by ``prime miner leave|withdraw|deregister``, ``prime master eject`` and ``prime chain slash``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from prime.chain.client import RegistryClient, TxResult, rpc_errors, to_address
from prime.chain.types import NodeInfo, NodeStatus
from prime.errors import ChainError, ConfigError

# The statuses leaveRun accepts (the contract's CannotLeave otherwise).
LEAVABLE = (NodeStatus.REGISTERED, NodeStatus.APPROVED, NodeStatus.ACTIVE)


def format_eth(wei: int) -> str:
    """``10**16`` → ``0.01 ETH``: exact (no float), without trailing zeros."""
    text = f"{Decimal(wei) / Decimal(10**18):f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} ETH"


@dataclass(frozen=True)
class NodeChange:
    """One action on one node: its record before and after, and who was paid what."""

    action: str  # leave | withdraw | eject | slash
    node: str
    run_id: int
    provider: str
    status_before: str
    status_after: str
    stake_before: int
    stake_after: int
    tx_hash: str | None = None  # None: nothing was sent (see note)
    block: int | None = None
    payee: str | None = None  # who received stake (the provider on withdraw, the admin on slash)
    amount: int = 0  # wei paid to the payee
    payee_balance_before: int | None = None
    payee_balance_after: int | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"sent": self.tx_hash is not None, **asdict(self)}

    def sentence(self) -> str:
        """What changed, in one line."""
        where = f" (transaction {self.tx_hash}, block {self.block})" if self.tx_hash else ""
        status = f"status {self.status_before} → {self.status_after}"
        if self.tx_hash is None:
            return f"Node {self.node}: {self.note}; nothing was sent."
        if self.action == "leave":
            after = (f"; its stake of {format_eth(self.stake_after)} can now be withdrawn" if self.stake_after else "; it has no stake left")
            return f"Node {self.node} left run {self.run_id}: {status}{where}{after}."
        if self.action == "eject":
            return (f"Node {self.node} was ejected from run {self.run_id}: {status}{where}; its provider {self.provider} "
                    f"can withdraw the stake of {format_eth(self.stake_after)}.")
        balance = ""
        if self.payee_balance_before is not None and self.payee_balance_after is not None:
            balance = f" (balance {format_eth(self.payee_balance_before)} → {format_eth(self.payee_balance_after)})"
        if self.action == "withdraw":
            return (f"Node {self.node}: {format_eth(self.amount)} of stake returned to provider {self.payee}{balance}; "
                    f"stake {format_eth(self.stake_before)} → {format_eth(self.stake_after)}, {status}{where}.")
        return (f"Node {self.node}: {format_eth(self.amount)} slashed and paid to {self.payee}{balance}; "
                f"stake {format_eth(self.stake_before)} → {format_eth(self.stake_after)}{where}.")


async def _balance_at(client: RegistryClient, address: str, block: int) -> int:
    async with rpc_errors(client.rpc_url):
        return int(await client.w3.eth.get_balance(to_address(address), block_identifier=block))


async def known_node(client: RegistryClient, node: str) -> NodeInfo:
    """The node's record; one sentence when the registry never saw it."""
    info = await client.get_node(node)
    if not info.registered:
        raise ChainError(
            f"Node {info.node} is not registered with the registry at {client.address}; "
            "check the node's address (--node or the key file) and --deployment."
        )
    return info


async def _change(
    client: RegistryClient, action: str, before: NodeInfo, result: TxResult, *, payee: str | None = None, note: str = ""
) -> NodeChange:
    after = await client.get_node(before.node)
    amount = 0
    balances: tuple[int | None, int | None] = (None, None)
    if payee is not None:
        amount = max(0, before.stake - after.stake)
        balances = (await _balance_at(client, payee, result.block - 1), await _balance_at(client, payee, result.block))
    return NodeChange(
        action=action, node=before.node, run_id=before.run_id, provider=before.provider,
        status_before=before.status.label, status_after=after.status.label,
        stake_before=before.stake, stake_after=after.stake, tx_hash=result.tx_hash, block=result.block,
        payee=payee, amount=amount, payee_balance_before=balances[0], payee_balance_after=balances[1], note=note,
    )


def _unsent(action: str, info: NodeInfo, note: str) -> NodeChange:
    return NodeChange(
        action=action, node=info.node, run_id=info.run_id, provider=info.provider, status_before=info.status.label,
        status_after=info.status.label, stake_before=info.stake, stake_after=info.stake, note=note,
    )


async def leave(client: RegistryClient, node: str) -> NodeChange:
    before = await known_node(client, node)
    return await _change(client, "leave", before, await client.leave_run(before.node))


async def withdraw(client: RegistryClient, node: str) -> NodeChange:
    before = await known_node(client, node)
    return await _change(client, "withdraw", before, await client.withdraw_stake(before.node), payee=before.provider)


async def deregister(client: RegistryClient, node: str) -> list[NodeChange]:
    """Leave (only when the node is still in its run), then withdraw whatever stake is left."""
    info = await known_node(client, node)
    changes: list[NodeChange] = []
    if info.status in LEAVABLE:
        changes.append(await _change(client, "leave", info, await client.leave_run(info.node)))
        info = await client.get_node(info.node)
    else:
        changes.append(_unsent("leave", info, f"already out of run {info.run_id} (status {info.status.label}), no leave needed"))
    if info.stake == 0:
        changes.append(_unsent("withdraw", info, "no stake left to withdraw"))
    else:
        changes.append(await _change(client, "withdraw", info, await client.withdraw_stake(info.node), payee=info.provider))
    return changes


async def eject(client: RegistryClient, node: str, run_id: int | None = None) -> NodeChange:
    before = await known_node(client, node)
    return await _change(client, "eject", before, await client.eject_node(before.run_id if run_id is None else run_id, before.node))


async def slash(client: RegistryClient, node: str, amount_wei: int) -> NodeChange:
    before = await known_node(client, node)
    if client.account is None:
        raise ChainError("Slashing needs the admin's key; pass --key-file.")
    return await _change(client, "slash", before, await client.slash(before.node, amount_wei), payee=client.account.address)


def run_action(
    rpc_url: str, deployment: Path | None, account: Any, action: Callable[[RegistryClient], Awaitable[Any]]
) -> Any:
    """``action(client)`` on a client that sends with ``account``; its result."""
    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")

    async def go() -> Any:
        async with await RegistryClient.connect(rpc_url, deployment, account) as client:
            return await action(client)

    return asyncio.run(go())


def report(changes: list[NodeChange], *, json_output: bool) -> None:
    """Print the changes: one sentence each, or one JSON document."""
    import json

    import typer

    if json_output:
        typer.echo(json.dumps({"changes": [c.to_json() for c in changes]}, indent=2))
        return
    for change in changes:
        typer.echo(change.sentence())
