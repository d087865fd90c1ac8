"""What the miner remembers across restarts, in one small JSON file in its data directory.

Docker itself is the record of the node's tasks (container labels, see executor.py); this
file holds the rest: which run the node is in, where its master is (so a restarted miner
resumes heartbeats without a new invite or joinRun), what it last announced to discovery,
the validator's verdict, and the last heartbeat with the task states it reported (for
``prime miner status``). Written atomically (temp file + rename), so a crash never leaves
half a file.

``MinerStore`` is the one writer while the miner runs: one method per change, each applied
to the in-memory state at once and written in a worker thread (never on the event loop);
writes are serialized and coalesced, and each method returns once its change is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from prime.files import write_text_atomic

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
        self.write(state.to_json())

    def write(self, data: dict[str, Any]) -> None:
        """Write the JSON of a state atomically (blocking: call it from a worker thread)."""
        write_text_atomic(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")

class MinerStore:
    """The miner's state while it runs: read ``state`` freely, change it only through these methods.

    The state object is changed in place (readers holding it see the change at once); the
    file is written off the event loop, and each method returns when its change is saved
    (raising ``OSError`` when it could not be).
    """

    def __init__(self, file: StateFile, state: MinerState | None = None) -> None:
        self.file = file
        self._state = state if state is not None else MinerState()
        self._lock = asyncio.Lock()
        self._changes = 0
        self._written = 0

    @property
    def state(self) -> MinerState:
        return self._state

    async def _save(self) -> None:
        self._changes += 1
        wanted = self._changes
        async with self._lock:
            if self._written >= wanted:
                return  # a later write already carried this change
            upto = self._changes
            data = self._state.to_json()  # a snapshot taken on the loop, written in a thread
            await asyncio.to_thread(self.file.write, data)
            self._written = upto

    def _replace(self, fresh: MinerState) -> None:
        self._state.__dict__.update(fresh.__dict__)

    async def open_for(self, node: str, run_id: int) -> MinerState:
        """Load the saved state, forgetting what belongs to another node or run."""
        loaded = await asyncio.to_thread(self.file.load)
        loaded.reset_for(node, run_id)
        self._replace(loaded)
        await self._save()
        return self._state

    async def registered(self, node: str, run_id: int, tx_hash: str) -> None:
        """A new membership: nothing of an earlier one (master, verdict) applies any more."""
        self._replace(MinerState(node=node, run_id=run_id, registration_tx=tx_hash))
        await self._save()

    async def joined(self, master_url: str, master: str, tx_hash: str | None, at: float) -> None:
        """An accepted invite: heartbeats go to this master, also after a restart."""
        state = self._state
        state.master_url = master_url
        state.master = master
        if tx_hash is not None or state.joined_at is None:
            state.join_tx = tx_hash or state.join_tx
            state.joined_at = at
        await self._save()

    async def master_gone(self, master: str) -> bool:
        """The node's master is no master of the run any more (issue 14): forget it, so nothing of it is
        obeyed and another master of the run may adopt the node. False when ``master`` was not the node's."""
        state = self._state
        if state.master is None or state.master.lower() != master.lower():
            return False
        state.master = None
        state.master_url = None
        await self._save()
        return True

    async def announced(self, announcement: Announcement) -> None:
        self._state.announced = announcement
        await self._save()

    async def verdict(self, verdict: Verdict) -> None:
        self._state.verdict = verdict
        await self._save()

    async def heartbeat_ok(self, at: float, interval_s: float, tasks: list[dict[str, Any]]) -> None:
        state = self._state
        state.last_heartbeat_at = at
        state.last_heartbeat_error = None
        state.heartbeat_interval_s = interval_s
        state.tasks = tasks
        await self._save()

    async def heartbeat_failed(self, message: str) -> None:
        self._state.last_heartbeat_error = message
        await self._save()
