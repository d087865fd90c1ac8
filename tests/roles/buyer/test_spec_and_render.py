"""Pure parts of the buyer CLI: options → task spec, JSON → tables and log lines."""

from __future__ import annotations

import pytest
from rich.console import Console

from prime.chain.types import Requirements, RunInfo
from prime.errors import PrimeError
from prime.roles.buyer.master_client import download_target, normalize_master_url, parse_log_line
from prime.roles.buyer.render import (
    age,
    dashboard,
    files_table,
    format_log_line,
    human_size,
    nodes_table,
    replica_summary,
    run_table,
    run_to_json,
    task_detail,
)
from prime.roles.buyer.spec import build_task_spec, parse_command, parse_env, parse_gpus


def rendered(renderable) -> str:
    console = Console(width=220, record=True)
    console.print(renderable)
    return console.export_text()


def test_env_pairs():
    assert parse_env(["A=1", "B=x=y", "C=", "A=2"]) == {"A": "2", "B": "x=y", "C": ""}
    for bad in ("A", "=1", "1A=2", "A-B=1"):
        with pytest.raises(PrimeError):
            parse_env([bad])


def test_gpus_and_command():
    assert parse_gpus("all") == "all" and parse_gpus(" 2 ") == 2
    with pytest.raises(PrimeError, match="--gpus"):
        parse_gpus("two")
    assert parse_command("python train.py --name 'my run'", None) == ["python", "train.py", "--name", "my run"]
    assert parse_command(None, ["sh", "-c", "echo hi"]) == ["sh", "-c", "echo hi"]
    assert parse_command(None, None) == []
    with pytest.raises(PrimeError, match="not both"):
        parse_command("a", ["b"])
    with pytest.raises(PrimeError, match="quotes"):
        parse_command("echo 'unclosed", None)


def test_spec_is_the_masters_json_and_errors_name_the_option():
    spec = build_task_spec(image="busybox", command=["true"], gpus="all", replicas=2, persistent=True, memory_limit_mib=512)
    assert spec["command"] == ["true"] and spec["gpus"] == "all" and spec["memory_limit_mib"] == 512 and spec["cpu_limit"] is None
    with pytest.raises(PrimeError, match=r"^The task is not valid: --cpu-limit must be more than 0"):
        build_task_spec(image="busybox", cpu_limit=0)
    with pytest.raises(PrimeError, match="--restart"):
        build_task_spec(image="busybox", restart="always")


def test_master_url_and_log_lines():
    assert normalize_master_url("http://127.0.0.1:8092/") == "http://127.0.0.1:8092"
    for bad in (None, "", "127.0.0.1:8092", "ftp://x"):
        with pytest.raises(PrimeError):
            normalize_master_url(bad)
    assert parse_log_line(b'{"replica": 1, "line": "x"}') == {"replica": 1, "line": "x"}
    assert parse_log_line(b"plain text") == {"line": "plain text"}
    assert format_log_line({"replica": 2, "stream": "stderr", "line": "oops"}) == "[r2 err] oops"
    assert format_log_line({"line": "no replica"}) == "no replica"


def test_download_targets_stay_inside_the_directory(tmp_path):
    entry = {"replica": 1, "path": "a/b.txt", "size": 1, "sha256": "0" * 64}
    assert download_target(tmp_path, entry, per_replica=False) == tmp_path / "a" / "b.txt"
    assert download_target(tmp_path, entry, per_replica=True) == tmp_path / "replica-1" / "a" / "b.txt"
    for bad_path in ("../x", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(PrimeError):
            download_target(tmp_path, {**entry, "path": bad_path}, per_replica=False)
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(PrimeError, match="outside"):
        download_target(tmp_path, {**entry, "path": "link/x"}, per_replica=False)


def test_tables():
    run = RunInfo(7, "0x" + "ab" * 20, Requirements(1, "", 0, 4, 1024, 10, 0), "http://d", [], False, 3)
    assert run_to_json(run)["requirements"]["min_cpu_cores"] == 4
    text = rendered(run_table(run))
    assert "Run 7" in text and "(any model)" in text and "unlimited" in text and "add-master" in text

    task = {
        "id": "abc123", "state": "Running", "created_at": 100.0,
        "spec": {"image": "busybox", "command": ["sleep", "5"], "env": {"K": "V"}, "gpus": 1, "replicas": 2, "persistent": True},
        "replicas": [
            {"index": 0, "state": "Running", "node": "0x" + "11" * 20, "gpu_indices": [0], "attempt": 0, "exit_code": None, "started_at": 90.0},
            {"index": 1, "state": "Failed", "node": None, "gpu_indices": [], "attempt": 1, "exit_code": 3, "error": "boom"},
        ],
    }
    assert replica_summary(task) == "1 Running, 1 Failed"
    detail = rendered(task_detail(task, now=130.0))
    assert "sleep 5" in detail and "K=V" in detail and "boom" in detail and "40s ago" in detail

    node = {"address": "0x" + "11" * 20, "state": "Healthy", "hardware": {"gpu_count": 0, "cpu_cores": 2, "ram_mib": 4096},
            "last_heartbeat": 120.0, "last_sample": {"gpus": [{"index": 0, "util": 55.0}]}}
    nodes = rendered(nodes_table([node], [task], now=130.0))
    assert "10s ago" in nodes and "55%" in nodes and "2 cores / 4096 MiB" in nodes
    # One live replica (the failed one does not count) on that node:
    assert "│ 1 " in nodes

    files = rendered(files_table("abc123", [{"replica": 0, "path": "out.txt", "size": 2048, "sha256": "f" * 64, "synced_at": 125.0}], now=130.0))
    assert "out.txt" in files and "2.0 KiB" in files and "5s ago" in files

    frame = rendered(dashboard([node], [task], master_url="http://m", error="master down", now=130.0))
    assert "master down" in frame and "Nodes (1)" in frame and "Tasks (1)" in frame


def test_small_formatters():
    assert age(None) == "-" and age(100.0, now=100.0 + 3600) == "60m ago" and age(0, now=3 * 86400) == "3d ago"
    assert human_size(10) == "10 B" and human_size(3 * 1024**3) == "3.0 GiB" and human_size(None) == "?"
