"""`prime chain deploy|anvil|info|grant-validator|set-min-stake|set-revalidation-penalty|slash`: the registry's operator tools."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Optional

import typer

from prime.config import DEFAULT_PASSWORD_ENV, DEFAULT_RPC_URL, DeploymentPath, KeyFile, PasswordEnv, RpcUrl
from prime.errors import ConfigError

app = typer.Typer(no_args_is_help=True)

DEFAULT_MIN_STAKE = "0.01eth"
_UNITS = {"wei": 0, "gwei": 9, "eth": 18, "ether": 18}
_AMOUNT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

MinStake = Annotated[
    str,
    typer.Option("--min-stake", envvar="PRIME_MIN_STAKE", help="Minimum node stake: wei, or with a unit (0.01eth, 5gwei)."),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of text.")]
OutFile = Annotated[
    Path,
    typer.Option("--out", "-o", envvar="PRIME_DEPLOYMENT", help="Where to write the deployment file."),
]


def parse_wei(text: str) -> int:
    """An amount of wei from '1000', '1000wei', '5gwei' or '0.01eth'; ConfigError otherwise."""
    match = _AMOUNT.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in (*_UNITS, ""):
        raise ConfigError(f"{text!r} is not an amount; write wei as a whole number or use a unit, e.g. 0.01eth or 5gwei.")
    try:
        value = Decimal(match.group(1)) * (Decimal(10) ** _UNITS[unit or "wei"])
    except InvalidOperation:
        raise ConfigError(f"{text!r} is not an amount; write e.g. 0.01eth.") from None
    if value != value.to_integral_value():
        raise ConfigError(f"{text!r} is not a whole number of wei; use fewer decimals.")
    return int(value)


def _account(key_file: Path | None, password_env: str):
    from prime.keys import load_account

    return load_account(key_file, password_env=password_env)


@app.command()
def deploy(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    out: OutFile = Path("deployment.json"),
    min_stake: MinStake = DEFAULT_MIN_STAKE,
    validator: Annotated[
        Optional[list[str]],
        typer.Option("--validator", help="Grant the validator role to this address after deploying (repeatable)."),
    ] = None,
    json_output: JsonOutput = False,
) -> None:
    """Deploy the registry (the key becomes its admin) and write the deployment file."""
    from prime.chain.client import RegistryClient, to_address
    from prime.chain.deploy import deploy_registry

    stake = parse_wei(min_stake)
    validators = [to_address(v) for v in validator or []]
    account = _account(key_file, password_env)

    async def run() -> None:
        deployment = await deploy_registry(rpc_url, account, min_stake_wei=stake)
        if validators:
            async with await RegistryClient.connect(rpc_url, deployment, account) as client:
                for address in validators:
                    await client.grant_validator(address)
        saved = deployment.save(out)
        if json_output:
            typer.echo(json.dumps({"registry": deployment.registry, "chain_id": deployment.chain_id, "block": deployment.block,
                                   "admin": account.address, "min_stake_wei": stake, "validators": validators,
                                   "deployment": str(saved.path)}, indent=2))
            return
        typer.echo(f"registry:   {deployment.registry}")
        typer.echo(f"chain id:   {deployment.chain_id}  (block {deployment.block})")
        typer.echo(f"admin:      {account.address}")
        typer.echo(f"min stake:  {stake} wei")
        for address in validators:
            typer.echo(f"validator:  {address}")
        typer.echo(f"deployment: {saved.path}")

    asyncio.run(run())


@app.command()
def anvil(
    port: Annotated[int, typer.Option("--port", envvar="PRIME_ANVIL_PORT", min=1, max=65535, help="TCP port for the chain's RPC.")] = 8545,
    host: Annotated[str, typer.Option("--host", envvar="PRIME_ANVIL_HOST", help="Address to listen on (keep it on loopback).")] = "127.0.0.1",
    chain_id: Annotated[int, typer.Option("--chain-id", help="Chain id of the local chain.")] = 31337,
    block_time: Annotated[Optional[float], typer.Option("--block-time", help="Seconds between blocks (default: a block per transaction).")] = None,
    deploy_out: Annotated[Optional[Path], typer.Option("--deploy-out", help="Also deploy the registry (admin: dev account 0) and write the deployment file here.")] = None,
    min_stake: MinStake = DEFAULT_MIN_STAKE,
) -> None:
    """Run a local anvil chain in the foreground with anvil's public dev accounts (devnet only)."""
    from prime.chain.anvil import start_anvil
    from prime.chain.deploy import deploy_registry

    stake = parse_wei(min_stake)
    chain = start_anvil(port, host=host, chain_id=chain_id, block_time_s=block_time, inherit_output=True)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if deploy_out is not None:
            deployment = asyncio.run(deploy_registry(chain.rpc_url, chain.accounts[0], min_stake_wei=stake)).save(deploy_out)
            typer.echo(f"registry {deployment.registry} deployed; deployment file: {deployment.path}")
        typer.echo(f"anvil is serving {chain.rpc_url} (chain {chain_id}); Ctrl-C stops it.")
        while chain.running and not stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        chain.stop()


@app.command()
def info(
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    json_output: JsonOutput = False,
) -> None:
    """Show where the registry is and its settings."""
    from prime.chain.client import RegistryClient

    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")

    async def run() -> dict:
        async with await RegistryClient.connect(rpc_url, deployment) as client:
            return {
                "registry": client.address, "chain_id": client.chain_id, "block": await client.block_number(),
                "min_stake_wei": await client.min_stake(), "revalidation_penalty_bps": await client.revalidation_penalty_bps(),
                "run_count": await client.run_count(),
            }

    facts = asyncio.run(run())
    if json_output:
        typer.echo(json.dumps(facts, indent=2))
        return
    bps = facts["revalidation_penalty_bps"]
    typer.echo(f"registry:  {facts['registry']}")
    typer.echo(f"chain id:  {facts['chain_id']}")
    typer.echo(f"block:     {facts['block']}")
    typer.echo(f"min stake: {facts['min_stake_wei']} wei")
    typer.echo(f"revalidation penalty: {bps} bps ({bps / 100:g} % of the stake)")
    typer.echo(f"runs:      {facts['run_count']}")


def _admin_tx(rpc_url: str, deployment: Path | None, key_file: Path | None, password_env: str, action, json_output: bool = False) -> None:
    from prime.chain.client import RegistryClient

    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")
    account = _account(key_file, password_env)

    async def run() -> None:
        async with await RegistryClient.connect(rpc_url, deployment, account) as client:
            result = await action(client)
            if json_output:
                typer.echo(json.dumps({"tx_hash": result.tx_hash, "block": result.block, "events": [e.name for e in result.events]}, indent=2))
                return
            typer.echo(f"done in transaction {result.tx_hash} (block {result.block})")

    asyncio.run(run())


@app.command("grant-validator")
def grant_validator(
    address: Annotated[str, typer.Argument(help="The validator's address.")],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    revoke: Annotated[bool, typer.Option("--revoke", help="Take the role away instead.")] = False,
    json_output: JsonOutput = False,
) -> None:
    """Give (or with --revoke take away) the validator role; the key must be the registry's admin."""
    from prime.chain.client import to_address

    target = to_address(address)
    _admin_tx(rpc_url, deployment, key_file, password_env, lambda c: c.revoke_validator(target) if revoke else c.grant_validator(target), json_output)


@app.command("set-min-stake")
def set_min_stake(
    amount: Annotated[str, typer.Argument(help="New minimum stake: wei, or with a unit (0.01eth).")],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Change the minimum stake for new registrations; the key must be the registry's admin."""
    wei = parse_wei(amount)
    _admin_tx(rpc_url, deployment, key_file, password_env, lambda c: c.set_min_stake(wei), json_output)


@app.command("set-revalidation-penalty")
def set_revalidation_penalty(
    bps: Annotated[int, typer.Argument(min=0, max=10_000, help="Basis points of the stake (0-10000; 1000 = 10 %).")],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Change the share of a node's stake that a failed re-validation slashes; the key must be the registry's admin."""
    _admin_tx(rpc_url, deployment, key_file, password_env, lambda c: c.set_revalidation_penalty_bps(bps), json_output)


@app.command()
def slash(
    node: Annotated[str, typer.Argument(help="The node's address.", show_default=False)],
    amount: Annotated[str, typer.Argument(help="How much of its stake to take: wei, or with a unit (0.005eth).", show_default=False)],
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    deployment: DeploymentPath = None,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    json_output: JsonOutput = False,
) -> None:
    """Take AMOUNT of a node's stake, paid to the admin sending it (the treasury); the key must be the registry's admin."""
    from prime.chain import operator
    from prime.chain.client import to_address

    target = to_address(node)
    wei = parse_wei(amount)
    if wei == 0:
        raise ConfigError("A slash of 0 wei changes nothing; give an amount above 0, e.g. 0.005eth.")
    account = _account(key_file, password_env)
    change = operator.run_action(rpc_url, deployment, account, lambda client: operator.slash(client, target, wei))
    operator.report([change], json_output=json_output)
