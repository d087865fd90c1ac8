"""Background processes of the devnet: start with a log file and a pid file, check, stop.

A pid file records the pid, the exact command line and the process's start time. A pid is
only ever signalled after checking that the process with that pid still has that command line
and start time, so a stale pid file can never make `down` kill an unrelated process that
happens to have been given the same pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeGuard

import psutil

from prime.devnet.state import DevnetPaths, write_atomic
from prime.errors import PrimeError

# Children start with none of the caller's PRIME_* settings (the devnet passes every option
# explicitly; PRIME_PORT and friends are shared by all roles and would collide), except these.
KEEP_ENV = {"PRIME_DEBUG", "PRIME_ANVIL_BIN", "PRIME_ALLOW_NO_DOCKER"}
START_TIME_SLACK_S = 1.0


@dataclass(frozen=True)
class ProcessRecord:
    """The content of a pid file."""

    name: str
    pid: int
    cmdline: list[str]
    create_time: float
    log: str | None = None
    port: int | None = None
    url: str | None = None
    started_at: float = 0.0

    def save(self, paths: DevnetPaths) -> None:
        write_atomic(paths.pid_file(self.name), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, paths: DevnetPaths, name: str) -> ProcessRecord | None:
        try:
            data = json.loads(paths.pid_file(name).read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # a damaged pid file names no process we can prove is ours


def prime_command(*args: str) -> list[str]:
    """The argv of the ``prime`` CLI in this interpreter (independent of PATH)."""
    return [sys.executable, "-m", "prime.cli", *args]


def child_env(paths: DevnetPaths, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_") or k in KEEP_ENV}
    env["PRIME_HOME"] = str(paths.home)  # a user's ~/.config/prime/config.toml must not change the devnet
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file as they happen
    env.update(extra or {})
    return env


def _process(record: ProcessRecord) -> psutil.Process | None:
    """The live process the record names, or None (gone, a zombie, or a different process now)."""
    try:
        proc = psutil.Process(record.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if proc.cmdline() != record.cmdline:
            return None
        if abs(proc.create_time() - record.create_time) > START_TIME_SLACK_S:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_alive(record: ProcessRecord | None) -> TypeGuard[ProcessRecord]:
    """Whether ``record`` names a live process (still that process); True narrows it to a record."""
    return record is not None and _process(record) is not None


def start_process(
    paths: DevnetPaths,
    name: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    port: int | None = None,
    url: str | None = None,
) -> ProcessRecord:
    """Start ``command`` in its own session (it outlives this CLI), output appended to its log."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    log_path = paths.log(name)
    argv = [str(c) for c in command]
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env), cwd=paths.root, start_new_session=True,
            )
        except OSError as exc:
            raise PrimeError(f"Cannot start the {name} ({argv[0]}: {exc.strerror or exc}); check the installation.") from None
    create_time, observed = _identity(proc.pid, argv)
    record = ProcessRecord(name, proc.pid, observed, create_time, str(log_path), port, url, time.time())
    record.save(paths)
    return record


def _identity(pid: int, argv: list[str], timeout_s: float = 2.0) -> tuple[float, list[str]]:
    """(start time, command line) of a just-started child, as /proc will show them from now on.

    Right after exec the kernel may briefly show an empty command line; what it shows once it
    settles is what later checks compare against.
    """
    deadline = time.monotonic() + timeout_s
    try:
        proc = psutil.Process(pid)
        create_time = proc.create_time()
        while True:
            cmdline = proc.cmdline()
            if cmdline or time.monotonic() > deadline:
                return create_time, cmdline or argv
            time.sleep(0.01)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return time.time(), argv  # it already exited: nothing will ever match, as it should


def record_current_process(paths: DevnetPaths, name: str, argv: Sequence[str], *, port: int | None, url: str | None) -> ProcessRecord:
    """A pid file for this very process, which is about to ``exec`` ``argv`` (same pid, same start time)."""
    pid = os.getpid()
    record = ProcessRecord(name, pid, [str(a) for a in argv], psutil.Process(pid).create_time(), None, port, url, time.time())
    record.save(paths)
    return record


def stop_process(paths: DevnetPaths, name: str, *, timeout_s: float = 15.0) -> str:
    """Stop the process of ``name``'s pid file if it is still that process; says what happened."""
    record = ProcessRecord.load(paths, name)
    if record is None:
        return "not running"
    proc = _process(record)
    if proc is None:
        paths.pid_file(name).unlink(missing_ok=True)
        return "already stopped"
    # Our background processes lead their own session: signal the whole group (anvil's or a
    # role's children too). A foreground `devnet miner` shares the user's terminal group: only it.
    group = _leads_group(record.pid)
    _signal(record.pid, signal.SIGTERM, group)
    if _wait_gone(proc, timeout_s):
        outcome = "stopped"
    else:
        _signal(record.pid, signal.SIGKILL, group)
        if not _wait_gone(proc, 5):
            return f"still running (pid {record.pid}) after SIGKILL"
        outcome = f"killed (did not stop within {timeout_s:.0f} s)"
    if group:
        _signal(record.pid, signal.SIGKILL, True)  # stragglers left in its group
    paths.pid_file(name).unlink(missing_ok=True)
    return outcome


def _wait_gone(proc: psutil.Process, timeout_s: float) -> bool:
    """True once the process has exited. A zombie counts as exited: its parent (a shell that ran
    `devnet miner` in the foreground, say) reaps it, not us."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            proc.wait(0.1)  # reaps it when it is our own child
            return True
        except psutil.TimeoutExpired:
            pass
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _signal(pid: int, sig: signal.Signals, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: str | Path | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def last_meaningful_line(path: str | Path | None) -> str:
    """The last line of a log worth quoting (an `Error: …` line if there is one near the end)."""
    tail = [line.strip() for line in log_tail(path, 40).splitlines() if line.strip() and not line.startswith("=====")]
    for line in reversed(tail):
        if line.startswith("Error:"):
            return line
    return tail[-1] if tail else "no output"


def wait_until_healthy(record: ProcessRecord, health_url: str, *, timeout_s: float, what: str) -> None:
    """Poll ``health_url`` until 200; one sentence (with the log's last line) if the process dies or stays down."""
    deadline = time.monotonic() + timeout_s
    problem = "no answer"
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=2) as answer:
                if answer.status == 200:
                    return
                problem = f"/health answered {answer.status}"
        except urllib.error.HTTPError as exc:
            problem = f"/health answered {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            problem = f"no answer ({getattr(exc, 'reason', exc)})"
        if not is_alive(record):
            raise PrimeError(f"The {what} exited before it was ready: {last_meaningful_line(record.log)} (log: {record.log}).")
        if time.monotonic() > deadline:
            raise PrimeError(f"The {what} was not ready at {health_url} within {timeout_s:.0f} s ({problem}); see {record.log}.")
        time.sleep(0.2)


def wait_for_rpc(record: ProcessRecord, rpc_url: str, chain_id: int, *, timeout_s: float) -> None:
    """Wait until anvil answers eth_chainId with ``chain_id``."""
    from prime.chain.anvil import rpc_call
    from prime.errors import ChainError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if int(rpc_call(rpc_url, "eth_chainId", timeout_s=1.0), 16) == chain_id:
                return
        except (ChainError, TypeError, ValueError):
            pass
        if not is_alive(record):
            raise PrimeError(f"anvil exited before it answered: {last_meaningful_line(record.log)} (log: {record.log}).")
        if time.monotonic() > deadline:
            raise PrimeError(f"anvil did not answer at {rpc_url} within {timeout_s:.0f} s; see {record.log}.")
        time.sleep(0.1)


def scan_processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``text`` (for tests and for `status`)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(text in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
