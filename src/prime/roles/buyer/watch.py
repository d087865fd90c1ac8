"""The live view of one master's nodes and tasks, refreshed in place (rich ``Live``).

Shared by `prime buyer watch` and `prime devnet status --watch`. A master that is down or
slow is shown as a line in the view and retried; only a refusal (401/403: wrong key) ends it,
because retrying cannot fix that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live

from prime.errors import PrimeError
from prime.roles.buyer.master_client import MasterClient, MasterRefused
from prime.roles.buyer.render import dashboard

Header = Callable[[], RenderableType | None]


async def snapshot(master: MasterClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(nodes, tasks) fetched together."""
    nodes, tasks = await asyncio.gather(master.nodes(), master.list_tasks())
    return nodes, tasks


async def watch(
    account: Any,
    master_url: str,
    *,
    interval_s: float = 2.0,
    once: bool = False,
    header: Header | None = None,
    console: Console | None = None,
) -> None:
    """Show the dashboard until Ctrl-C (``once``: print one frame and return)."""
    console = console or Console()
    if once and not console.is_terminal:
        console = Console(width=200)  # one frame into a file or a pipe: no 80-column wrapping
    # No retries inside one refresh: the next refresh is the retry, and the view stays responsive.
    async with MasterClient.open(account, master_url, timeout_s=max(2.0, interval_s * 2), retries=0) as master:
        nodes: list[dict[str, Any]] = []
        tasks: list[dict[str, Any]] = []
        if once:
            nodes, tasks = await snapshot(master)
            console.print(dashboard(nodes, tasks, master_url=master.base_url, header=header() if header else None, width=console.width))
            return
        with Live(console=console, refresh_per_second=4, transient=False, auto_refresh=False) as live:
            while True:
                error = None
                try:
                    nodes, tasks = await snapshot(master)
                except MasterRefused:
                    raise  # retrying cannot fix a wrong key
                except PrimeError as exc:
                    error = f"{exc.message} (retrying every {interval_s:g} s; the tables show the last answer)"
                live.update(
                    dashboard(nodes, tasks, master_url=master.base_url, error=error, header=header() if header else None, width=console.width),
                    refresh=True,
                )
                await asyncio.sleep(interval_s)
