"""What the miner remembers across restarts, in one small JSON file in its data directory.

Docker itself is the record of the node's tasks (container labels, see executor.py); this
file holds the rest: which run the node is in, where its master is (so a restarted miner
resumes heartbeats without a new invite or joinRun), what it last announced to discovery,
the validator's verdict, and the last heartbeat with the task states it reported (for
``prime miner status``). Written atomically (temp file + rename), so a crash never leaves
half a file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "miner-state.json"
STATE_VERSION = 1


@dataclass
class Announcement:
    """The address last announced to discovery (and accepted by it)."""

    ip: str
    port: int
    discovery_url: str
    at: float


@dataclass
class Verdict:
    """A validator's verdict as it told the node (POST /challenge/{id}/verdict)."""

    approved: bool
    reason: str
    report_hash: str
    validator: str
    challenge_id: str
    at: float


@dataclass
class MinerState:
    node: str | None = None
    run_id: int | None = None
    registration_tx: str | None = None
    # Set by an accepted invite; survives restarts so heartbeats resume with no new joinRun.
    master_url: str | None = None
    master: str | None = None
    join_tx: str | None = None
    joined_at: float | None = None
    announced: Announcement | None = None
    verdict: Verdict | None = None
    last_heartbeat_at: float | None = None
    last_heartbeat_error: str | None = None
    heartbeat_interval_s: float | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)  # as last reported to the master

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = STATE_VERSION
        return data

    @classmethod
    def from_json(cls, data: Any) -> MinerState:
        """Parse the file's content; unknown keys are ignored, malformed parts dropped."""
        if not isinstance(data, dict):
            raise ValueError("the state file does not hold a JSON object")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        announced = values.pop("announced", None)
        verdict = values.pop("verdict", None)
        state = cls(**values)
        state.announced = _maybe(Announcement, announced)
        state.verdict = _maybe(Verdict, verdict)
        if not isinstance(state.tasks, list):
            state.tasks = []
        return state

    def reset_for(self, node: str, run_id: int) -> None:
        """Forget everything that belongs to another node or run."""
        if self.node != node or self.run_id != run_id:
            fresh = MinerState(node=node, run_id=run_id)
            self.__dict__.update(fresh.__dict__)


def _maybe(cls: type, value: Any) -> Any:
    if not isinstance(value, dict):
        return None
    try:
        return cls(**{f.name: value[f.name] for f in fields(cls)})
    except (KeyError, TypeError):
        return None


class StateFile:
    """Load and save ``MinerState`` at ``<data_dir>/miner-state.json``."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / STATE_FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> MinerState:
        """The saved state; an empty one when there is none. A damaged file is set aside, not fatal:
        the chain and Docker hold everything that matters, only the master URL is lost (a new
        invite brings it back)."""
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return MinerState()
        try:
            return MinerState.from_json(json.loads(raw))
        except (ValueError, TypeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            log.warning("the miner state file %s was unreadable (%s); moved it to %s and started afresh", self.path, exc, aside)
            return MinerState()

    def save(self, state: MinerState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(state.to_json(), fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
