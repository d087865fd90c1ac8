"""Where a devnet keeps its files, and devnet.json: what `up` started and how to reach it.

<state>/                      (default ./.devnet)
  devnet.json                 URLs, ports, run id, key files, deployment path (this module)
  env                         `source .devnet/env`: PRIME_* settings for `prime buyer …`
  deployment.json             the registry's deployment file
  keys/<role>.json            encrypted keystores of anvil's dev keys (password "devnet")
  run/<process>.json          pid files (pid + command line + start time)
  logs/<process>.log          stdout+stderr of each background process
  data/<role>/                each role's --data-dir
  home/                       PRIME_HOME of the children (so a user's config.toml cannot change them)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prime.errors import PrimeError
from prime.files import write_text_atomic

DEFAULT_STATE_DIR = Path(".devnet")
STATE_VERSION = 1
PASSWORD = "devnet"
SERVICES = ("anvil", "discovery", "validator", "master")  # what `up` starts, in order
PROCESSES = (*SERVICES, "miner")  # everything `down` stops (the miner runs via `devnet miner`/`demo`)


@dataclass(frozen=True)
class DevnetPaths:
    root: Path

    @classmethod
    def at(cls, state_dir: str | os.PathLike) -> DevnetPaths:
        return cls(Path(state_dir).expanduser().resolve())

    @property
    def info(self) -> Path:
        return self.root / "devnet.json"

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    @property
    def deployment(self) -> Path:
        return self.root / "deployment.json"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def data(self, role: str) -> Path:
        return self.root / "data" / role

    def key(self, role: str) -> Path:
        return self.keys / f"{role}.json"

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.json"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


@dataclass
class Service:
    """One service of the devnet: where it listens (whether or not it runs now)."""

    port: int
    url: str
    skipped: bool = False  # `up --skip ROLE`: the user runs it by hand


@dataclass
class DevnetInfo:
    """devnet.json."""

    state_dir: str
    rpc_url: str
    chain_id: int
    registry: str
    deployment: str
    run_id: int
    keys: dict[str, dict[str, str]]  # role -> {"address", "key_file"}
    services: dict[str, Service]
    node_address: str
    password: str = PASSWORD
    created_at: float = 0.0
    version: int = STATE_VERSION
    commands: dict[str, list[str]] = field(default_factory=dict)  # how each service is started

    def url(self, service: str) -> str:
        return self.services[service].url

    def key_file(self, role: str) -> str:
        return self.keys[role]["key_file"]

    def address(self, role: str) -> str:
        return self.keys[role]["address"]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["services"] = {name: asdict(s) for name, s in self.services.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DevnetInfo:
        services = {name: Service(**s) for name, s in data["services"].items()}
        return cls(**{**data, "services": services})

    def save(self, paths: DevnetPaths) -> None:
        write_atomic(paths.info, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, paths: DevnetPaths) -> DevnetInfo | None:
        """The saved devnet, None when there is none; damage is one sentence."""
        try:
            data = json.loads(paths.info.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise PrimeError(f"{paths.info} cannot be read ({type(exc).__name__}); remove the directory {paths.root} and run `prime devnet up` again.") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise PrimeError(f"{paths.info} was written by another prime version; run `prime devnet down`, remove {paths.root} and run `prime devnet up`.")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError) as exc:
            raise PrimeError(f"{paths.info} is incomplete ({exc}); remove the directory {paths.root} and run `prime devnet up` again.") from None


def require_info(paths: DevnetPaths) -> DevnetInfo:
    info = DevnetInfo.load(paths)
    if info is None:
        raise PrimeError(f"There is no devnet in {paths.root}; start one with `prime devnet up` (or pass the right --state-dir).")
    return info


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    write_text_atomic(path, text, mode=mode)

def env_file_text(info: DevnetInfo) -> str:
    """Shell lines that point `prime buyer …` (and the other CLIs) at this devnet as the run owner."""
    values = {
        "PRIME_RPC_URL": info.rpc_url,
        "PRIME_DEPLOYMENT": info.deployment,
        "PRIME_MASTER_URL": info.url("master"),
        "PRIME_KEY_FILE": info.key_file("owner"),
        "PRIME_KEY_PASSWORD": info.password,
        "PRIME_DISCOVERY_URI": f"{info.url('discovery')}#{info.address('discovery')}" if "discovery" in info.keys else info.url("discovery"),
    }
    lines = ["# prime devnet: `source` this file to act as the devnet run's owner (buyer)."]
    lines += [f"export {name}={shlex.quote(str(value))}" for name, value in values.items()]
    lines.append(f"# run id: {info.run_id}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def devnet_lock(paths: DevnetPaths, what: str) -> Iterator[None]:
    """One up/down/demo at a time per state directory."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrimeError(f"Another `prime devnet` command is changing {paths.root} right now; wait for it to finish, then {what} again.") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
