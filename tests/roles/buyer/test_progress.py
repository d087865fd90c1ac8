"""`prime buyer files --download` progress: one bar on a terminal, nothing in a pipe or with --json."""

from __future__ import annotations

import io

from rich.console import Console

from prime.roles.buyer.progress import DownloadBars

ENTRIES = [{"path": "ckpt/step-1.bin", "size": 3_000_000}, {"path": "result.txt", "size": 1_000}]


def test_on_a_terminal_one_bar_counts_every_byte_and_files_already_there():
    out = io.StringIO()
    with DownloadBars(Console(file=out, force_terminal=True, width=120), ENTRIES, enabled=True) as bars:
        advance = bars.file(ENTRIES[0])
        assert advance is not None
        for _ in range(3):
            advance(1_000_000)
        bars.skipped(ENTRIES[1])  # already downloaded: counted at once
        (task,) = bars.progress.tasks
        assert (task.completed, task.total, task.description) == (3_001_000, 3_001_000, "ckpt/step-1.bin")
    assert bars.progress.finished and "Downloading" in out.getvalue()


def test_in_a_pipe_or_with_json_there_is_no_bar():
    for console, enabled in ((Console(file=io.StringIO(), force_terminal=False), True), (Console(file=io.StringIO(), force_terminal=True), False)):
        with DownloadBars(console, ENTRIES, enabled=enabled) as bars:
            assert bars.progress is None and bars.file(ENTRIES[0]) is None
            bars.skipped(ENTRIES[1])
        assert console.file.getvalue() == ""
