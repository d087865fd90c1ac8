"""`prime devnet logs [ROLE] [-f]`: the last lines of the devnet's log files, then (with -f)
new lines as they are written, prefixed with the process name when several are shown."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from prime.devnet.processes import log_tail
from prime.devnet.state import PROCESSES, DevnetPaths
from prime.errors import PrimeError


def log_names(paths: DevnetPaths, role: str | None) -> list[str]:
    if role is not None:
        if role not in PROCESSES:
            raise PrimeError(f"{role!r} is not a devnet process; choose from {', '.join(PROCESSES)}.")
        if not paths.log(role).exists():
            raise PrimeError(f"The {role} has no log in {paths.logs} (it was not started by this devnet, or runs in the foreground).")
        return [role]
    names = [name for name in PROCESSES if paths.log(name).exists()]
    if not names:
        raise PrimeError(f"There are no devnet logs in {paths.logs}; start the devnet with `prime devnet up`.")
    return names


def show_logs(
    paths: DevnetPaths,
    names: Sequence[str],
    *,
    tail: int = 50,
    follow: bool = False,
    emit: Callable[[str], None] = print,
    poll_s: float = 0.25,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    prefix = len(names) > 1
    width = max(len(n) for n in names)

    def out(name: str, line: str) -> None:
        emit(f"{name:<{width}} | {line}" if prefix else line)

    offsets: dict[str, int] = {}
    for name in names:
        path = paths.log(name)
        for line in log_tail(path, tail).splitlines() if tail else []:
            out(name, line)
        offsets[name] = _size(path)
    if not follow:
        return
    partial: dict[str, str] = {name: "" for name in names}
    while not stop():
        for name in names:
            path = paths.log(name)
            size = _size(path)
            if size < offsets[name]:  # truncated by a fresh `up`
                offsets[name] = 0
            if size == offsets[name]:
                continue
            with open(path, "rb") as fh:
                fh.seek(offsets[name])
                chunk = fh.read(size - offsets[name])
            offsets[name] = size
            text = partial[name] + chunk.decode("utf-8", "replace")
            *lines, partial[name] = text.split("\n")
            for line in lines:
                out(name, line)
        time.sleep(poll_s)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
