"""`prime validator reports` over a store on disk, and the one-sentence failures of the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from prime.cli import app
from prime.roles.validator.store import Registration, ValidatorStore
from prime.roles.validator.verdict import Verdict
from tests.fixtures.processes import prime_command

APPROVED_NODE = "0x9f8Fc83Ef649fD2FC1Dac08E9A064230367c394B"
REJECTED_NODE = "0xbb58c1c17D8a3cAD447A3deF52CFCe07432f0489"
PENDING_NODE = "0xEc44f2cDEEE027329da9B24CDE912e3CcE2675EB"
FIGURES = {"n": 64, "dtype": "float32", "elapsed_s": 0.0123, "bound_s": 30.0}


def make_store(data_dir: Path) -> None:
    store = ValidatorStore.open(data_dir)
    regs = [Registration(node, 1, 5 + i, 0, f"0x{i + 1:064x}") for i, node in enumerate((APPROVED_NODE, REJECTED_NODE, PENDING_NODE))]
    store.enqueue(regs, 9, now=1.7e9, deadline_s=60)
    store.decide(regs[0].id, Verdict(True, None, "all checks passed", {**FIGURES, "approved": True}, "c1"), now=1.7e9, miner_url="http://127.0.0.1:1")
    store.reported(regs[0].id, tx_hash="0x" + "ab" * 32, now=1.7e9)
    reason = "merkle check failed: row [3] does not match the committed Merkle root"  # brackets are not markup
    store.decide(regs[1].id, Verdict(False, "merkle", reason, {**FIGURES, "approved": False}, "c2"), now=1.7e9, miner_url=None)
    store.reported(regs[1].id, tx_hash="0x" + "cd" * 32, now=1.7e9)
    store.close()


def test_reports_table_lists_every_registration_with_result_and_reason(tmp_path: Path) -> None:
    make_store(tmp_path)
    result = CliRunner().invoke(app, ["validator", "reports", "--data-dir", str(tmp_path)], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    approved = next(line for line in lines if APPROVED_NODE in line)
    rejected = next(line for line in lines if REJECTED_NODE in line)
    pending = next(line for line in lines if PENDING_NODE in line)
    assert "approved" in approved and "all checks passed" in approved and "n=64 float32" in approved
    assert "rejected" in rejected and "merkle check failed: row [3]" in rejected
    assert "pending" in pending


def test_reports_json_has_the_full_report(tmp_path: Path) -> None:
    make_store(tmp_path)
    result = CliRunner().invoke(app, ["validator", "reports", "--json", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {row["node"]: row for row in json.loads(result.output)}
    assert rows[APPROVED_NODE]["result"] == "approved" and rows[APPROVED_NODE]["tx_hash"] == "0x" + "ab" * 32
    assert rows[APPROVED_NODE]["report"]["n"] == 64 and rows[APPROVED_NODE]["report_hash"].startswith("0x")
    assert rows[REJECTED_NODE]["failed_check"] == "merkle" and rows[REJECTED_NODE]["approved"] is False
    assert rows[PENDING_NODE]["state"] == "pending" and rows[PENDING_NODE]["report"] is None


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(prime_command(*args), check=False, capture_output=True, text=True, timeout=60, env=env)


def test_reports_without_data_is_one_sentence(tmp_path: Path) -> None:
    done = run("validator", "reports", "--data-dir", str(tmp_path / "nothing"))
    assert done.returncode == 1
    assert "There are no validator reports in" in done.stderr and "Traceback" not in done.stderr


def test_start_without_deployment_or_key_is_one_sentence(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    done = run("validator", "start", "--data-dir", str(tmp_path), env=env)
    assert done.returncode == 1 and "--deployment" in done.stderr and "Traceback" not in done.stderr
    deployment = tmp_path / "deployment.json"
    deployment.write_text("{}")
    done = run("validator", "start", "--deployment", str(deployment), "--data-dir", str(tmp_path), env=env)
    assert done.returncode == 1 and "--key-file" in done.stderr and "Traceback" not in done.stderr
