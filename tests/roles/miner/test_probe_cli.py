"""`prime miner probe`: the table for people and the JSON for scripts, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from prime.cli import app


def _env(tmp_path: Path) -> dict[str, str]:
    # An empty PRIME_HOME: no config file of the person running the tests leaks in.
    return {"PRIME_HOME": str(tmp_path / "home"), "COLUMNS": "200"}


def test_probe_json_describes_this_machine(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["miner", "probe", "--json", "--data-dir", str(tmp_path)], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"gpus", "driver_version", "cuda_version", "cpu_model", "cpu_cores", "ram_mib", "disk_free_gib"}
    assert data["cpu_cores"] >= 1 and data["ram_mib"] > 0
    assert data["data_dir"] == str(tmp_path)
    assert isinstance(data["gpus"], list)
    for gpu in data["gpus"]:
        assert set(gpu) == {"index", "uuid", "model", "memory_total_mib", "memory_used_mib", "utilization_pct", "temperature_c",
                            "pci_bus_id"}


def test_probe_table_for_people(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["miner", "probe", "--data-dir", str(tmp_path)], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    assert "CPU cores" in result.stdout and "Free disk (GiB)" in result.stdout
    assert "GPU" in result.stdout  # a GPU table, or the sentence saying why there is none


def test_probe_data_dir_from_environment_through_the_installed_command(tmp_path: Path) -> None:
    env = {**os.environ, **_env(tmp_path), "PRIME_DATA_DIR": str(tmp_path / "from-env")}
    done = subprocess.run(
        [sys.executable, "-m", "prime.cli", "miner", "probe", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data_dir"] == str(tmp_path / "from-env")
