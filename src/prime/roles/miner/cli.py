"""`prime miner` commands."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from prime.config import DataDir, prime_home
from prime.errors import NotBuiltYet

app = typer.Typer(no_args_is_help=True)

DEFAULT_DATA_DIR = prime_home() / "miner"


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
def start() -> None:
    """Start the miner service (not built yet)."""
    raise NotBuiltYet("The miner role is not built yet; follow the project's issues for progress.")


@app.command()
def status() -> None:
    """Show the miner's node and tasks (not built yet)."""
    raise NotBuiltYet("`prime miner status` is not built yet; follow the project's issues for progress.")
