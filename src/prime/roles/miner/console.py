"""What the miner tells its operator on the terminal (rich): start-up progress, pulls, status.

Every line also goes to the log at debug level. On a terminal the chain status is a live
spinner line and image pulls are live progress bars; in logs and pipes each is a few plain lines.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rich.console import Console
from rich.markup import escape

from prime.chain.types import Specs

log = logging.getLogger("prime.miner")


class PullTally:
    """One image pull summed over its layers: bytes downloaded of bytes known, layers done."""

    def __init__(self) -> None:
        self.layers: dict[str, tuple[int, int]] = {}  # layer -> (downloaded, size), once its size is known
        self.finished: set[str] = set()
        self.seen: set[str] = set()

    def add(self, progress: Any) -> None:
        layer, status = progress.layer, progress.status.lower()
        if not layer or progress.done:
            return
        self.seen.add(layer)
        if status.startswith("downloading") and progress.total:
            self.layers[layer] = (min(progress.current or 0, progress.total), progress.total)
        elif status.startswith(("download complete", "verifying", "extracting", "pull complete")) and layer in self.layers:
            self.layers[layer] = (self.layers[layer][1], self.layers[layer][1])
        if status.startswith(("pull complete", "already exists")):
            self.finished.add(layer)

    @property
    def current(self) -> int:
        return sum(done for done, _ in self.layers.values())

    @property
    def total(self) -> int | None:
        return sum(size for _, size in self.layers.values()) or None

    def summary(self) -> str:
        amount = f"{self.current / 1e6:.1f}/{self.total / 1e6:.1f} MB, " if self.total else ""
        return f"{amount}{len(self.finished)}/{len(self.seen)} layers"


def _pull_end(progress: Any, tally: PullTally) -> str:
    if progress.error:
        return f"[red]Pull of {escape(progress.image)} failed:[/] {escape(progress.error)}"
    return f"[cyan]Pulled[/] {escape(progress.image)} ({tally.summary()})."


class PullPrinter:
    """Image pulls in logs and pipes: a line when one starts, at most one per ``min_gap_s`` while
    it downloads (summed over its layers, never one per layer step) and one when it ends."""

    def __init__(self, console: Console, min_gap_s: float = 10.0) -> None:
        self.console = console
        self.min_gap_s = min_gap_s
        self._last: dict[str, float] = {}
        self._tallies: dict[str, PullTally] = {}

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        tally = self._tallies.setdefault(progress.image, PullTally())
        tally.add(progress)
        if progress.done:
            self._tallies.pop(progress.image, None)
            self._last.pop(progress.image, None)
            self.console.print(_pull_end(progress, tally), highlight=False)
            return
        if progress.image not in self._last:
            self._last[progress.image] = now
            self.console.print(f"[cyan]Pulling[/] {escape(progress.image)} …", highlight=False)
        elif now - self._last[progress.image] >= self.min_gap_s:
            self._last[progress.image] = now
            self.console.print(f"[cyan]Pulling[/] {escape(progress.image)}: {tally.summary()}", highlight=False)


class PullBars:
    """Image pulls on a terminal: a live rich progress bar per image (bytes of all its layers),
    replaced by one line when the pull ends. ``owner`` pauses its status spinner meanwhile
    (one live display at a time)."""

    def __init__(self, owner: MinerConsole) -> None:
        self.owner = owner
        self.progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._tallies: dict[str, PullTally] = {}

    def __call__(self, progress: Any) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        tally = self._tallies.setdefault(progress.image, PullTally())
        tally.add(progress)
        if self.progress is None:
            self.owner.pause_status()
            self.progress = Progress(
                TextColumn("[cyan]Pulling[/] {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[layers]}"), console=self.owner.console, transient=True,
            )
            self.progress.start()
        task = self._tasks.get(progress.image)
        if task is None:
            task = self._tasks[progress.image] = self.progress.add_task(escape(progress.image), total=None, layers="")
        self.progress.update(task, completed=tally.current, total=tally.total, layers=f"{len(tally.finished)}/{len(tally.seen)} layers")
        if progress.done:
            self.progress.remove_task(self._tasks.pop(progress.image))
            self._tallies.pop(progress.image, None)
            self.progress.console.print(_pull_end(progress, tally), highlight=False)
            if not self._tasks:
                self.progress.stop()
                self.progress = None

    @property
    def active(self) -> bool:
        return self.progress is not None


def describe_specs(specs: Specs) -> str:
    gpus = f"{specs.gpu_count}× {specs.gpu_model} ({specs.gpu_memory_mib} MiB)" if specs.gpu_count else "no GPUs"
    return f"{gpus}, {specs.cpu_cores} CPU cores, {specs.ram_mib} MiB RAM, {specs.disk_gib} GiB free disk"


class MinerConsole:
    """The miner's operator-facing lines, one method per thing worth saying."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self._status_line: Any = None
        self._announced_once = False
        self._announced: tuple[str, int] | None = None
        self._pulls: PullBars | None = None

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(f"[{style}]{text}[/]" if style else text, highlight=False)
        log.debug(text)

    def pull_printer(self) -> PullBars | PullPrinter:
        """Where image pull progress goes: live bars on a terminal, a few plain lines otherwise."""
        if self.console.is_terminal:
            self._pulls = PullBars(self)
            return self._pulls
        return PullPrinter(self.console)

    def pause_status(self) -> None:
        """Stop the status spinner (a pull's bars take the live display); status lines print plainly meanwhile."""
        if self._status_line is not None:
            self._status_line.stop()
            self._status_line = None

    def errors(self, messages: list[str]) -> None:
        for message in messages:
            self.say(f"Error: {escape(message)}", "bold red")

    def node(self, address: str, provider: str, specs: Specs, gpus: list[int]) -> None:
        self.say(f"Node {address} (provider {provider}): {describe_specs(specs)}; GPUs offered: {', '.join(map(str, gpus)) or 'none'}.")

    def registered(self, run_id: int, stake: int, tx_hash: str) -> None:
        self.say(f"Registered for run {run_id} with a stake of {stake} wei (tx {tx_hash}).", "green")

    def already_registered(self, run_id: int, status_label: str) -> None:
        self.say(f"Already registered for run {run_id} (status {status_label}); no transaction sent.")

    def adopted(self, statuses: list[Any]) -> None:
        if statuses:
            running = sum(1 for s in statuses if str(getattr(s.state, "value", s.state)) == "Running")
            self.say(f"Adopted {len(statuses)} task container(s) from before the restart ({running} running); none was restarted.")

    def backend(self, name: str) -> None:
        self.say(f"Challenge backend: {name}.")

    def serving(self, host: str, port: int, discovery_uri: str) -> None:
        self.say(f"Serving the miner API on {host}:{port}; discovery is {discovery_uri}.")

    def announced(self, ip: str, port: int) -> None:
        if self._announced != (ip, port) or not self._announced_once:
            self.say(f"Announced {ip}:{port} to discovery.")
        self._announced = (ip, port)
        self._announced_once = True

    def invited(self, master: str, master_url: str, run_id: int, tx_hash: str | None) -> None:
        how = f"joined run {run_id} (tx {tx_hash})" if tx_hash else "already active in the run"
        self.say(f"Invited by master {master} ({master_url}); {how}.", "green")

    def verdict(self, validator: str, approved: bool, reason: str) -> None:
        word = "approved" if approved else "rejected"
        self.say(f"Validator {validator} {word} the node: {reason}", "green" if approved else "red")

    def status(self, line: str) -> None:
        """The node's chain status: a live spinner line on a terminal; plain lines in logs and pipes."""
        if self.console.is_terminal and not (self._pulls is not None and self._pulls.active):
            if self._status_line is None:
                self._status_line = self.console.status(line)
                self._status_line.start()
            else:
                self._status_line.update(line)
            self.console.log(line)
        else:
            self.say(line)

    def stopping(self) -> None:
        self.say("Stopping; task containers keep running and are adopted at the next start.")

    def close(self) -> None:
        if self._pulls is not None and self._pulls.progress is not None:
            self._pulls.progress.stop()
            self._pulls.progress = None
        if self._status_line is not None:
            self._status_line.stop()
            self._status_line = None
