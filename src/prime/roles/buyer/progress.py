"""Download progress of `prime buyer files --download`: a rich bar on a terminal, nothing in pipes.

One bar for the whole download (bytes of every listed file, a file already there counts at
once) with the file being fetched as its description. In a log or pipe (or with --json) it
prints nothing: the command's summary line says what was downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


class DownloadBars:
    """``with DownloadBars(console, entries, enabled) as bars``: ``bars.file(entry)`` before each
    file (the callback for its bytes, or None when disabled), ``bars.skipped(entry)`` for one
    already there."""

    def __init__(self, console: Console, entries: Sequence[dict[str, Any]], *, enabled: bool) -> None:
        self.enabled = enabled and console.is_terminal and bool(entries)
        self.total = sum(int(e.get("size", 0)) for e in entries)
        self.progress: Progress | None = None
        if self.enabled:
            self.progress = Progress(
                TextColumn("[cyan]Downloading[/] {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TimeRemainingColumn(), console=console, transient=True,
            )
            self._task = self.progress.add_task(f"{len(entries)} file(s)", total=self.total or None)

    def __enter__(self) -> DownloadBars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def file(self, entry: dict[str, Any]) -> Callable[[int], None] | None:
        if self.progress is None:
            return None
        progress, task = self.progress, self._task
        progress.update(task, description=escape(str(entry.get("path", "?"))))
        return lambda n: progress.advance(task, n)

    def skipped(self, entry: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.advance(self._task, int(entry.get("size", 0)))
