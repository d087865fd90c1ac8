"""The skeleton every long-running role process shares: its data dir, its logging, its lifetime.

Three pieces, used in this order by ``prime discovery|validator|master|miner start``::

    from prime.roles.process import configure_logging, open_data_dir, serve_until_stopped

    configure_logging()                                   # in the CLI command, before asyncio.run

    async def serve(...):
        with open_data_dir(data_dir, "discovery") as data:    # lock + marker, or one sentence
            store = DiscoveryStore.open(data.path)
            app = build_app(store, ...)
            await serve_until_stopped(app, host=host, port=port,
                                      on_listening=lambda port: log.info("listening on %d", port))
        # app cleanup (cleanup_ctx, on_cleanup) has run; the lock is released

- ``open_data_dir(path, role, *, identity=None, marker=MARKER) -> DataDir``: creates the
  directory, takes an exclusive ``flock`` on ``<path>/prime.lock`` (held until ``close()``;
  the holder's pid is written in it) and checks the marker file ``<path>/role.json``:
  written on first use as ``{"role": role, **identity}``; later opens refuse a directory of
  another role, or whose saved identity differs in any key of ``identity`` (e.g. the
  master's ``chain_id``/``registry``/``run_id``). Every refusal is a ``PrimeError`` of one
  sentence (the CLI prints it and exits 1), e.g. "Another discovery (pid 4711) is already
  running with data directory /d; stop it or pass another --data-dir."
  ``DataDir`` has ``path``, ``role``, ``saved`` (the marker's content) and ``close()``; it is
  a context manager. The lock dies with the process, so a crash never leaves a stale lock.
- ``configure_logging(*, quiet=QUIET_LOGGERS)``: INFO to stderr (DEBUG with ``PRIME_DEBUG``)
  unless the root logger already has handlers; the chatty loggers in ``quiet`` are set to
  WARNING unless ``PRIME_DEBUG`` is set.
- ``await serve_until_stopped(app, *, host, port, on_listening=None, stop=None)``: listens
  (``prime.web.serve``: a busy port is one sentence), calls ``on_listening(bound_port)``,
  waits for SIGINT/SIGTERM (or ``stop``, an ``asyncio.Event``, for in-process use), then
  cleans the app up. ``serving(app, host=, port=)`` is the same as an async context
  manager yielding the ``AppRunner``, for roles that keep other handles open while serving;
  ``wait_for_stop_signal(stop=None)`` is the waiting part alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Self

from aiohttp import web

from prime.errors import PrimeError

LOCK = "prime.lock"
MARKER = "role.json"
QUIET_LOGGERS = ("web3", "aiohttp.access")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _article(role: str) -> str:
    return "an" if role[:1].lower() in "aeiou" else "a"


class DataDir:
    """A role's data directory, locked for this process. Use ``open_data_dir``."""

    def __init__(self, path: Path, role: str, handle: IO[str], saved: dict[str, Any]) -> None:
        self.path = path
        self.role = role
        self.saved = saved
        self._handle: IO[str] | None = handle

    def close(self) -> None:
        """Release the lock (also released when the process ends, however it ends)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    @property
    def locked(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _unusable(path: Path, exc: OSError) -> PrimeError:
    return PrimeError(f"Cannot use data directory {path} ({exc.strerror or exc}); pass a writable --data-dir.")


def _lock(path: Path, role: str) -> IO[str]:
    import fcntl

    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK, "a+")  # noqa: SIM115 - held for the process's life
    except OSError as exc:
        raise _unusable(path, exc) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            handle.seek(0)
            pid = int(handle.read().strip() or "0")
            holder = f" (pid {pid})" if pid > 0 else ""
        handle.close()
        raise PrimeError(
            f"Another {role}{holder} is already running with data directory {path}; stop it or pass another --data-dir."
        ) from None
    with contextlib.suppress(OSError):
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return handle


def _check_marker(path: Path, role: str, identity: Mapping[str, Any], marker: str) -> dict[str, Any]:
    file = path / marker
    try:
        if not file.exists():
            saved = {"role": role, **identity}
            tmp = file.with_name(f".{marker}.tmp")
            tmp.write_text(json.dumps(saved, indent=2) + "\n")
            os.replace(tmp, file)
            return saved
        saved = json.loads(file.read_text())
    except OSError as exc:
        raise _unusable(path, exc) from None
    except ValueError:
        raise PrimeError(f"{file} is not valid JSON; fix it or move the data directory aside.") from None
    if not isinstance(saved, dict):
        raise PrimeError(f"{file} is not a prime data directory marker; fix it or move the data directory aside.")
    other = saved.get("role", role)  # a marker without "role" (older master run.json) is taken as ours
    if other != role:
        raise PrimeError(
            f"The data directory {path} belongs to {_article(str(other))} {other}, not {_article(role)} {role}; pass another --data-dir."
        )
    mismatched = [k for k in identity if k in saved and saved[k] != identity[k]]
    if mismatched:
        held = ", ".join(f"{k} {saved[k]}" for k in identity if k in saved)
        wanted = ", ".join(f"{k} {identity[k]}" for k in mismatched)
        raise PrimeError(
            f"The data directory {path} holds the state of {held}, not {wanted}; pass another --data-dir for this one."
        )
    missing = {k: v for k, v in identity.items() if k not in saved}
    if missing or "role" not in saved:
        saved = {"role": role, **saved, **missing}
        with contextlib.suppress(OSError):
            file.write_text(json.dumps(saved, indent=2) + "\n")
    return saved


def open_data_dir(
    path: str | Path, role: str, *, identity: Mapping[str, Any] | None = None, marker: str = MARKER
) -> DataDir:
    """Create, lock and check ``path`` for ``role``; a ``PrimeError`` sentence when it cannot be used."""
    path = Path(path).expanduser()
    handle = _lock(path, role)
    try:
        saved = _check_marker(path, role, dict(identity or {}), marker)
    except BaseException:
        handle.close()
        raise
    return DataDir(path, role, handle, saved)


def configure_logging(*, quiet: Iterable[str] = QUIET_LOGGERS) -> None:
    """Log lines to stderr for a role process (once; a host that configured logging keeps its own)."""
    debug = bool(os.environ.get("PRIME_DEBUG"))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=LOG_FORMAT)
    if not debug:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.WARNING)


async def wait_for_stop_signal(stop: asyncio.Event | None = None) -> None:
    """Return on SIGINT or SIGTERM (or when ``stop`` is set); the handlers are removed again."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def serving(app: web.Application, *, host: str, port: int) -> AsyncIterator[web.AppRunner]:
    """``app`` listening on ``host:port`` for the body of the ``async with``; cleaned up after."""
    from prime.web import serve as listen

    runner = await listen(app, host=host, port=port)
    try:
        yield runner
    finally:
        await runner.cleanup()


async def serve_until_stopped(
    app: web.Application,
    *,
    host: str,
    port: int,
    on_listening: Callable[[int], Any] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM (or ``stop``), then clean it up."""
    from prime.web import bound_port

    async with serving(app, host=host, port=port) as runner:
        if on_listening is not None:
            on_listening(bound_port(runner))
        await wait_for_stop_signal(stop)
