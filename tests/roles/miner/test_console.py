"""What the miner's operator sees of image pulls: live bars on a terminal, a few lines in logs."""

from __future__ import annotations

import io
import re

from rich.console import Console

from prime.roles.miner.console import MinerConsole, PullBars, PullPrinter, PullTally
from prime.roles.miner.images import PullProgress

IMAGE = "registry.example.org/team/trainer:1"


def _pull(layers: int = 2, steps: int = 50) -> list[PullProgress]:
    """Docker's events for a pull of ``layers`` layers of 1 MB, each downloaded in ``steps`` steps."""
    events = [PullProgress(IMAGE, None, "Pulling from team/trainer")]
    for n in range(layers):
        events.append(PullProgress(IMAGE, f"layer{n}", "Pulling fs layer"))
    for n in range(layers):
        for step in range(1, steps + 1):
            events.append(PullProgress(IMAGE, f"layer{n}", "Downloading", step * 20_000, 1_000_000))
        events += [PullProgress(IMAGE, f"layer{n}", "Download complete"), PullProgress(IMAGE, f"layer{n}", "Pull complete")]
    events += [PullProgress(IMAGE, None, "Digest: sha256:00"), PullProgress(IMAGE, None, f"Status: Downloaded newer image for {IMAGE}")]
    return events + [PullProgress(IMAGE, None, "done", done=True)]


def test_tally_sums_the_layers():
    tally = PullTally()
    for event in _pull()[:40]:
        tally.add(event)
    assert (tally.current, tally.total) == (20_000 * 37, 1_000_000)  # the second layer's size is not known yet
    for event in _pull():
        tally.add(event)
    assert (tally.current, tally.total, len(tally.finished), len(tally.seen)) == (2_000_000, 2_000_000, 2, 2)
    assert tally.summary() == "2.0/2.0 MB, 2/2 layers"


def test_in_a_log_a_pull_is_a_start_and_an_end_line_not_one_per_step():
    out = io.StringIO()
    printer = MinerConsole(Console(file=out, force_terminal=False, width=200)).pull_printer()
    assert isinstance(printer, PullPrinter)
    for event in _pull(layers=3, steps=200):
        printer(event)
    lines = out.getvalue().splitlines()
    assert lines == [f"Pulling {IMAGE} …", f"Pulled {IMAGE} (3.0/3.0 MB, 3/3 layers)."], lines


def test_in_a_log_a_failed_pull_says_why():
    out = io.StringIO()
    printer = PullPrinter(Console(file=out, force_terminal=False, width=200))
    printer(PullProgress(IMAGE, None, "Pulling from team/trainer"))
    printer(PullProgress(IMAGE, None, "failed", done=True, error="manifest unknown"))
    assert out.getvalue().splitlines()[-1] == f"Pull of {IMAGE} failed: manifest unknown"


def test_on_a_terminal_a_pull_is_a_live_bar_that_ends_in_one_line_and_gives_the_spinner_back():
    out = io.StringIO()
    miner = MinerConsole(Console(file=out, force_terminal=True, width=120))
    miner.status("Waiting for a validator")
    assert miner._status_line is not None  # the spinner is live
    bars = miner.pull_printer()
    assert isinstance(bars, PullBars)
    events = _pull()
    for event in events[:60]:
        bars(event)
    assert bars.active and miner._status_line is None  # the bars took the one live display
    (task,) = bars.progress.tasks
    assert (task.completed, task.total) == (20_000 * 50 + 20_000 * 5, 2_000_000)
    miner.status("Approved; waiting for an invite")  # printed plainly while the bars are live
    for event in events[60:]:
        bars(event)
    assert not bars.active and bars.progress is None
    miner.status("Joined")
    assert miner._status_line is not None
    miner.close()
    text = re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|\]8;[^\x1b]*\x1b\\)", "", out.getvalue())
    assert f"Pulled {IMAGE} (2.0/2.0 MB, 2/2 layers)." in text and "Approved; waiting for an invite" in text
