"""`prime validator start|challenge|reports|revalidations`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prime.config import (
    DEFAULT_HOST,
    DEFAULT_PASSWORD_ENV,
    DEFAULT_RPC_URL,
    VALIDATOR_PORT,
    DataDir,
    DeploymentPath,
    Host,
    KeyFile,
    PasswordEnv,
    Port,
    RpcUrl,
    prime_home,
)
from prime.errors import ConfigError, PrimeError

app = typer.Typer(no_args_is_help=True)

DEFAULT_PORT = VALIDATOR_PORT
DEFAULT_DATA_DIR = prime_home() / "validator"


@app.command()
def start(
    deployment: DeploymentPath = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Host = DEFAULT_HOST,
    port: Port = DEFAULT_PORT,
    poll_interval: Annotated[float, typer.Option(
        "--poll-interval", envvar="PRIME_POLL_INTERVAL", min=0.05, help="Seconds between reads of new chain events.")] = 2.0,
    challenge_n: Annotated[int | None, typer.Option(
        "--challenge-n", envvar="PRIME_CHALLENGE_N", min=1, max=32768,
        help="Matrix size of every challenge (default: sized from the node's claimed GPUs).")] = None,
    challenge_timeout: Annotated[float | None, typer.Option(
        "--challenge-timeout", envvar="PRIME_CHALLENGE_TIMEOUT", min=0.001,
        help="Seconds a node may take to commit to its answer (default: the time its claimed hardware needs).")] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", envvar="PRIME_CONCURRENCY", min=1, max=1024, help="Nodes validated at the same time.")] = 8,
    unreachable_after: Annotated[float, typer.Option(
        "--unreachable-after", envvar="PRIME_UNREACHABLE_AFTER", min=1.0,
        help="Seconds after a registration within which the node must become reachable; then it is rejected as unreachable.")] = 900.0,
    from_block: Annotated[int | None, typer.Option(
        "--from-block", envvar="PRIME_FROM_BLOCK", min=0,
        help="First block to read when no cursor is saved yet (default: the registry's deployment block).")] = None,
    revalidate_every: Annotated[float, typer.Option(
        "--revalidate-every", envvar="PRIME_REVALIDATE_EVERY", min=0.0,
        help="Mean seconds between re-challenges of each active node, at random (exponential) times; "
             "a failure ejects and slashes it on chain. 0: never.")] = 6 * 3600.0,
    gpu_classes: Annotated[Path | None, typer.Option(
        "--gpu-classes", envvar="PRIME_GPU_CLASSES", dir_okay=False,
        help="JSON or TOML file of GPU models (name, memory variants in MiB, fp32/fp16 peaks in TFLOP/s) "
             "added to the built-in table; one named like a built-in model replaces it.")] = None,
) -> None:
    """Challenge every newly registered node with a proof of compute and approve or reject it on chain."""
    from prime.keys import load_account
    from prime.roles.process import configure_logging
    from prime.roles.validator.service import ValidatorSettings, serve

    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")
    extra_models = _load_gpu_classes(gpu_classes) if gpu_classes is not None else ()
    account = load_account(key_file, password_env=password_env)
    settings = ValidatorSettings(
        poll_interval_s=poll_interval, concurrency=concurrency, unreachable_after_s=unreachable_after,
        challenge_n=challenge_n, challenge_timeout_s=challenge_timeout, from_block=from_block,
        revalidate_every_s=revalidate_every,
    )
    configure_logging()
    if extra_models:
        _install_gpu_classes(extra_models, gpu_classes)
    asyncio.run(serve(rpc_url=rpc_url, deployment_path=Path(deployment), account=account, data_dir=Path(data_dir),
                      host=host, port=port, settings=settings))


@app.command()
def challenge(
    node: Annotated[str, typer.Argument(help="The node's address.", show_default=False)],
    url: Annotated[str | None, typer.Option("--url", help="The miner's URL (default: where the node announced itself to its run's discovery).")] = None,
    deployment: DeploymentPath = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
    challenge_n: Annotated[int | None, typer.Option(
        "--challenge-n", min=1, max=32768, help="Matrix size (default: sized from the node's claimed GPUs).")] = None,
    challenge_timeout: Annotated[float | None, typer.Option(
        "--challenge-timeout", min=0.001, help="Seconds the node may take to commit (default: what its claimed hardware needs).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON (for scripts), without the live view.")] = False,
) -> None:
    """Challenge one node now and show each stage; a dry run: nothing is reported on chain (the key must be a validator's)."""
    from prime.chain.client import to_address
    from prime.keys import load_account
    from prime.roles.validator.probe import challenge_node, overrides_from

    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")
    target = to_address(node)
    overrides = overrides_from(challenge_n, challenge_timeout)
    account = load_account(key_file, password_env=password_env)
    # The live view goes to stderr (none with --json), so stdout is the result alone.
    view = Console(stderr=True, soft_wrap=True, quiet=json_output)
    report, reached = asyncio.run(challenge_node(account=account, rpc_url=rpc_url, deployment=Path(deployment), node=target,
                                                 url=url, overrides=overrides, console=view))
    if json_output:
        typer.echo(json.dumps({"node": target, "url": reached, "report_hash": "0x" + report.report_hash().hex(),
                               "report": report.to_json()}, indent=2))
        return
    failed = next((name for name, problem in report.checks.items() if problem), "")
    verdict = "[green]passed[/] the challenge" if report.approved else f"[red]failed[/] the challenge's {failed} check"
    Console(highlight=False, soft_wrap=True).print(
        f"Node {target} {verdict}: {escape(report.reason)} (n={report.n} {report.dtype}, "
        f"{report.elapsed_s:.3f} s of {report.bound_s:.3f} s, {report.checked_rows} rows checked); nothing was reported on chain.")


def _load_gpu_classes(path: Path) -> tuple:
    from prime.challenge.classes import GpuClassError, extended_table, load_gpu_classes

    try:
        models = load_gpu_classes(path)
        extended_table(models)  # its errors before anything starts
    except GpuClassError as exc:
        raise ConfigError(f"{str(exc)[:1].upper()}{str(exc)[1:]}; fix it or start without --gpu-classes.") from None
    return models


def _install_gpu_classes(models: tuple, path: Path | None) -> None:
    """The validator's table for the whole process (prime.challenge.classes: set once, at start)."""
    import logging

    from prime.challenge.classes import GPU_MODELS, extended_table, use_gpu_table

    use_gpu_table(extended_table(models))
    built_in = {m.name.upper() for m in GPU_MODELS}
    logging.getLogger("prime.validator").info(
        "GPU classes from %s: %s", path, ", ".join(
            f"{m.name} ({'replaces the built-in' if m.name.upper() in built_in else 'new'}; "
            + " or ".join(f"{v.memory_mib} MiB {v.fp16:g} fp16 TFLOP/s" for v in m.variants) + ")" for m in models))


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str | None, keep: int = 10) -> str:
    if not text:
        return "-"
    return text if len(text) <= 2 * keep else f"{text[:keep]}…{text[-4:]}"


def _figures(report: dict | None) -> str:
    if not report or "n" not in report:
        return "-"
    return f"n={report['n']} {report['dtype']} {report['elapsed_s']:.3f}s/{report['bound_s']:.3f}s"


def _read_store(data_dir: Path, read: Any) -> Any:
    """``read(store)`` on the validator database in ``data_dir``; a missing or damaged file is one sentence."""
    from prime.roles.validator.store import DB_FILE, ValidatorStore
    from prime.store import Database

    path = Path(data_dir).expanduser() / DB_FILE
    if not path.is_file():
        raise PrimeError(f"There are no validator reports in {data_dir}; pass the --data-dir the validator runs with.")
    try:
        store = ValidatorStore(Database(path))
    except PrimeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file: one sentence, no traceback
        raise PrimeError(f"Cannot read the validator database {path} ({exc}); check the file.") from None
    try:
        return read(store)
    finally:
        store.close()


@app.command()
def reports(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List this validator's reports: one per node registration, with verdict, reason and transaction."""
    rows = _read_store(data_dir, lambda store: store.all())
    if json_output:
        typer.echo(json.dumps([row.to_json() for row in rows], indent=2))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped into a file or grep: keep each report on one line
    if not rows:
        console.print("No node registrations seen yet.")
        return
    table = Table(title=f"Validator reports ({len(rows)})")
    table.add_column("Node", overflow="fold", min_width=21)  # a narrow terminal splits it in two halves
    table.add_column("Run", no_wrap=True)
    table.add_column("Result", no_wrap=True)
    table.add_column("Reason", overflow="fold", ratio=3)  # starts with the failed check's name
    wide = console.width >= 140  # figures and hashes only where they fit; --json has them all
    extra = ("Figures", "Report hash", "Tx", "Time") if wide else ("Tx", "Time")
    for column in extra:
        table.add_column(column, overflow="fold", ratio=1)
    colors = {"approved": "green", "rejected": "red", "pending": "yellow", "skipped": "dim", "superseded": "dim"}
    for row in rows:
        result = row.result
        reason = row.reason or row.note or row.last_error or "-"
        cells = [row.node, str(row.run_id), f"[{colors.get(result, 'white')}]{result}[/]", escape(reason)]
        if wide:
            cells += [_figures(row.report), _short(row.report_hash)]
        cells += [_short(row.tx_hash, 6), _when(row.reported_at or row.decided_at or row.seen_at)]
        table.add_row(*cells)
    console.print(table)


@app.command()
def revalidations(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """List this validator's re-challenges of active nodes: passed, or failed and reported on chain."""
    rows = _read_store(data_dir, lambda store: store.revalidations())
    if json_output:
        typer.echo(json.dumps([row.to_json() for row in rows], indent=2))
        return
    console = Console() if Console().is_terminal else Console(width=200)
    if not rows:
        console.print("No re-validations yet.")
        return
    table = Table(title=f"Re-validations ({len(rows)})")
    table.add_column("Node", overflow="fold", min_width=21)
    table.add_column("Run", no_wrap=True)
    table.add_column("Result", no_wrap=True)
    table.add_column("Reason", overflow="fold", ratio=3)
    table.add_column("Tx", overflow="fold", ratio=1)
    table.add_column("Time", overflow="fold", ratio=1)
    colors = {"passed": "green", "failed": "red", "pending": "yellow", "skipped": "dim", "superseded": "dim"}
    for row in rows:
        result = row.result
        reason = row.reason or row.note or row.last_error or "-"
        table.add_row(row.node, str(row.run_id), f"[{colors.get(result, 'white')}]{result}[/]", escape(reason),
                      _short(row.tx_hash, 6), _when(row.reported_at or row.decided_at or row.started_at))
    console.print(table)
