"""Start and stop a local anvil chain ($PRIME_ANVIL_BIN, the one npm installs under contracts/node_modules, or anvil on PATH).

Synchronous on purpose: test fixtures, the CLI and the devnet start it before any event loop
work, and talking to it takes one urllib request.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, Any

from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.errors import ChainError, PrimeError

# anvil's (and hardhat's) public development mnemonic: its keys are known to everyone, devnet only.
DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEFAULT_CHAIN_ID = 31337
# Past its 500 in-memory states anvil writes each older one to ~/.foundry/anvil/tmp and never
# deletes them (about 130 MB a test run, left behind after it stops): every anvil we start keeps
# none. Nothing here reads state at an old block; blocks, receipts and logs are kept either way.
NO_DISK_STATES = ("--max-persisted-states", "0")

_PLATFORM_PACKAGES = {
    ("Linux", "x86_64"): "anvil-linux-amd64",
    ("Linux", "aarch64"): "anvil-linux-arm64",
    ("Darwin", "x86_64"): "anvil-darwin-amd64",
    ("Darwin", "arm64"): "anvil-darwin-arm64",
}


def _contracts_dirs() -> list[Path]:
    """contracts/ of the source checkout this package runs from, then of the working directory's."""
    found: list[Path] = []
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            candidate = parent / "contracts"
            if (candidate / "package.json").is_file() and candidate not in found:
                found.append(candidate)
                break
    return found


def find_anvil() -> Path:
    """The anvil binary: $PRIME_ANVIL_BIN, else contracts/node_modules (npm's platform package), else PATH."""
    explicit = os.environ.get("PRIME_ANVIL_BIN")
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise PrimeError(f"PRIME_ANVIL_BIN points to {path}, which is not an executable file; fix or unset it.")
    package = _PLATFORM_PACKAGES.get((platform.system(), platform.machine()))
    for contracts in _contracts_dirs():
        candidates = []
        if package:
            candidates.append(contracts / "node_modules" / "@foundry-rs" / package / "bin" / "anvil")
        candidates.append(contracts / "node_modules" / "@foundry-rs" / "dist" / "anvil")
        for candidate in candidates:
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    on_path = shutil.which("anvil")
    if on_path:
        return Path(on_path)
    raise PrimeError(
        "No anvil binary was found (not in PRIME_ANVIL_BIN, a prime checkout's contracts/node_modules or PATH); "
        "install it with `npm install -g @foundry-rs/anvil` (in a prime checkout: `cd contracts && npm ci`) "
        "or set PRIME_ANVIL_BIN to an anvil binary."
    )


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR like the servers themselves
    (aiohttp, anvil): connections of a service that just stopped linger in TIME_WAIT for a minute
    and must not make a restart refuse the port; a live listener still makes the bind fail."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@cache
def _dev_account(index: int) -> LocalAccount:
    Account.enable_unaudited_hdwallet_features()
    return Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")


def dev_accounts(count: int = 10) -> list[LocalAccount]:
    """anvil's funded development accounts (same keys on every anvil started with the dev mnemonic)."""
    return [_dev_account(i) for i in range(count)]


def rpc_call(rpc_url: str, method: str, params: list | None = None, *, timeout_s: float = 5.0) -> Any:
    """One synchronous JSON-RPC call; ChainError on an error answer or an unreachable node."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    request = urllib.request.Request(rpc_url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        raise ChainError(f"Cannot reach the chain RPC at {rpc_url}; start the node or pass the right --rpc-url.") from None
    if answer.get("error"):
        raise ChainError(f"The chain at {rpc_url} refused {method}: {answer['error'].get('message', answer['error'])}.")
    return answer.get("result")


@dataclass
class AnvilProcess:
    """A running anvil; ``stop()`` (or leaving the ``with`` block) ends it."""

    process: subprocess.Popen
    host: str
    port: int
    chain_id: int
    accounts: list[LocalAccount] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def rpc(self, method: str, params: list | None = None) -> Any:
        return rpc_call(self.rpc_url, method, params)

    def set_balance(self, address: str, wei: int) -> None:
        self.rpc("anvil_setBalance", [address, hex(wei)])

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> AnvilProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_anvil(
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    chain_id: int = DEFAULT_CHAIN_ID,
    accounts: int = 10,
    balance_eth: int = 10_000,
    block_time_s: float | None = None,
    log_path: str | os.PathLike | None = None,
    inherit_output: bool = False,
    startup_timeout_s: float = 20.0,
    extra_args: list[str] | None = None,
) -> AnvilProcess:
    """Start anvil on ``port`` (a free loopback port when None) and wait until it answers.

    Output goes to ``log_path`` (appended), to this terminal with ``inherit_output``, else nowhere.
    """
    binary = find_anvil()
    if port is not None and not port_is_free(host, port):
        # Checked first: otherwise whatever already listens there would answer our readiness probe.
        raise ChainError(f"Could not start anvil on {host}:{port}: the port is in use; stop what uses it or choose another --port.")
    attempts = 1 if port is not None else 3  # a free port can be taken between probe and bind
    last_error = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port(host)
        args = [
            str(binary), "--host", host, "--port", str(chosen), "--chain-id", str(chain_id),
            "--accounts", str(accounts), "--balance", str(balance_eth), "--mnemonic", DEV_MNEMONIC,
            *NO_DISK_STATES,
        ]
        if block_time_s:
            args += ["--block-time", str(block_time_s)]
        args += extra_args or []
        log: IO[bytes] | int | None
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        else:
            log = None if inherit_output else subprocess.DEVNULL
        try:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log is not None else None)
        finally:
            if log_path is not None:
                log.close()  # type: ignore[union-attr]
        anvil = AnvilProcess(process, host, chosen, chain_id, dev_accounts(accounts), Path(log_path) if log_path else None)
        if _wait_until_up(anvil, startup_timeout_s):
            return anvil
        anvil.stop()
        last_error = f"anvil exited with code {process.returncode}" if process.returncode is not None else "anvil did not answer in time"
    where = f"; see {log_path}" if log_path else ""
    raise ChainError(f"Could not start anvil on {host}:{port or 'a free port'} ({last_error}{where}); check that the port is free.")


def _wait_until_up(anvil: AnvilProcess, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not anvil.running:
            return False
        try:
            if int(rpc_call(anvil.rpc_url, "eth_chainId", timeout_s=1.0), 16) == anvil.chain_id:
                return True
        except ChainError:
            pass
        time.sleep(0.05)
    return False
