"""Background processes of the devnet: pid files that prove identity, clean stops, clear failures."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import psutil
import pytest

from prime.devnet.processes import (
    ProcessRecord,
    child_env,
    is_alive,
    scan_processes_mentioning,
    start_process,
    stop_process,
    wait_until_healthy,
)
from prime.devnet.state import DevnetPaths
from prime.errors import PrimeError


@pytest.fixture
def paths(tmp_path):
    paths = DevnetPaths.at(tmp_path / "state")
    paths.root.mkdir()
    return paths


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_start_records_identity_and_stop_ends_it(paths):
    record = start_process(paths, "sleeper", python("import time; time.sleep(60)"), env=child_env(paths), port=1234)
    try:
        assert is_alive(record)
        saved = ProcessRecord.load(paths, "sleeper")
        assert saved == record and saved.cmdline[-1] == "import time; time.sleep(60)"
        assert os.getpgid(record.pid) == record.pid  # its own session: outlives the CLI that started it
        assert "starting:" in open(record.log).read()
        assert stop_process(paths, "sleeper") == "stopped"
        assert not is_alive(record) and not psutil.pid_exists(record.pid)
        assert ProcessRecord.load(paths, "sleeper") is None
        assert stop_process(paths, "sleeper") == "not running"
    finally:
        stop_process(paths, "sleeper")


def test_a_pid_that_now_belongs_to_another_command_is_never_signalled(paths):
    victim = start_process(paths, "victim", python("import time; time.sleep(60)"), env=child_env(paths))
    try:
        # A stale pid file naming the same pid but another command line (pid reuse).
        dataclasses.replace(victim, cmdline=[*victim.cmdline, "--other"]).save(paths)
        assert not is_alive(ProcessRecord.load(paths, "victim"))
        assert stop_process(paths, "victim") == "already stopped"
        assert psutil.Process(victim.pid).is_running()
        # Same command line but another start time: also not ours.
        dataclasses.replace(victim, create_time=victim.create_time - 3600).save(paths)
        assert stop_process(paths, "victim") == "already stopped"
        assert psutil.Process(victim.pid).is_running()
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        psutil.Process(victim.pid).wait(5)


def test_a_process_ignoring_sigterm_is_killed_with_its_children(paths):
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('ready', flush=True); time.sleep(60)"
    )
    record = start_process(paths, "stubborn", python(code), env=child_env(paths))
    deadline = time.monotonic() + 20
    while "ready" not in open(record.log).read().splitlines():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    children = psutil.Process(record.pid).children()
    assert children
    outcome = stop_process(paths, "stubborn", timeout_s=1)
    assert outcome.startswith("killed")
    for child in children:
        with pytest.raises(psutil.NoSuchProcess):
            child.wait(5)
            psutil.Process(child.pid).status()


def test_a_service_that_dies_at_start_is_one_sentence_with_its_error(paths):
    record = start_process(paths, "broken", python("print('Error: The master role is broken.'); raise SystemExit(1)"), env=child_env(paths))
    with pytest.raises(PrimeError, match=r"The broken exited before it was ready: Error: The master role is broken\. \(log: "):
        wait_until_healthy(record, "http://127.0.0.1:9/health", timeout_s=20, what="broken")


def test_children_get_no_prime_settings_of_the_caller(paths, monkeypatch):
    monkeypatch.setenv("PRIME_PORT", "1")
    monkeypatch.setenv("PRIME_DEBUG", "1")
    env = child_env(paths, {"PRIME_KEY_PASSWORD": "devnet"})
    assert "PRIME_PORT" not in env and env["PRIME_DEBUG"] == "1" and env["PRIME_KEY_PASSWORD"] == "devnet"
    assert env["PRIME_HOME"] == str(paths.home)


def test_scan_finds_processes_by_command_line(paths):
    record = start_process(paths, "marked", python(f"import time; time.sleep(60)  # {paths.root}"), env=child_env(paths))
    try:
        assert record.pid in [p.pid for p in scan_processes_mentioning(str(paths.root))]
    finally:
        stop_process(paths, "marked")
    assert record.pid not in [p.pid for p in scan_processes_mentioning(str(paths.root))]
