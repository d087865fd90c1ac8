"""What the miner tells its operator on the terminal (rich): start-up progress, pulls, status.

Every line also goes to the log at debug level. On a terminal the chain status is a live
spinner line; in logs and pipes it is a plain line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rich.console import Console
from rich.markup import escape

from prime.chain.types import Specs

log = logging.getLogger("prime.miner")


class PullPrinter:
    """Image pull progress as rich lines: one per layer step, at most one per second per image."""

    def __init__(self, console: Console, min_gap_s: float = 1.0) -> None:
        self.console = console
        self.min_gap_s = min_gap_s
        self._last: dict[str, float] = {}

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        final = progress.status.lower().startswith(("pull complete", "download complete", "status:", "digest:", "already exists"))
        if not final and now - self._last.get(progress.image, 0.0) < self.min_gap_s:
            return
        self._last[progress.image] = now
        amount = ""
        if progress.current is not None and progress.total:
            amount = f" {progress.current / 1e6:.1f}/{progress.total / 1e6:.1f} MB"
        layer = f" [dim]{progress.layer}[/]" if progress.layer else ""
        self.console.print(f"[cyan]Pulling[/] {progress.image}{layer}: {progress.status}{amount}", highlight=False)


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

    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(f"[{style}]{text}[/]" if style else text, highlight=False)
        log.debug(text)

    def pull_printer(self) -> PullPrinter:
        return PullPrinter(self.console)

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
        if self.console.is_terminal:
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
        if self._status_line is not None:
            self._status_line.stop()
            self._status_line = None
