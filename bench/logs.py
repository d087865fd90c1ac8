"""How fast does the master keep a node's logs, and how much disk do they take? Prints figures; asserts nothing.

Setup: the master's log keeper (``prime.roles.master.logkeeper.LogKeeper``) and its store
(``logstore.LogStore``, SQLite in a temporary directory) in this process; a node played by an
aiohttp server on a real loopback socket that serves one attempt's lines in the miner's NDJSON
(``{"stream","line","ts"}``, ~80 characters of text each) as fast as the keeper reads them.

Measured:
- *shipped*: lines per second from the node's first byte until the store holds every line
  (one node, one attempt; N attempts on N nodes share the same store and loop);
- *storage*: ``logs.sqlite`` (after a WAL checkpoint) per 1 M lines of that size, straight
  into the store in batches as the keeper writes them.

Usage: python bench/logs.py [--lines 200000] [--nodes 1,4] [--storage-lines 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from aiohttp import web
from eth_account import Account

from prime.auth.client import SignedClient
from prime.auth.signing import Domain
from prime.protocol.tasks import Replica, ReplicaState, Task, TaskSpec
from prime.roles.master.logkeeper import LogKeeper
from prime.roles.master.logstore import AttemptKey, LogStore, NewLine
from prime.web import bound_port

TEXT = "step {i:08d} loss=0.{i:06d} lr=3e-4 tokens/s=123456 grad_norm=1.234 mem=71.2GiB ok"


def _payload(count: int) -> bytes:
    return b"".join(json.dumps({"stream": "stdout", "line": TEXT.format(i=i), "ts": f"2026-12-02T08:00:00.{i:09d}Z"}).encode()
                    + b"\n" for i in range(count))


async def _node(payload: bytes) -> tuple[web.AppRunner, str]:
    async def logs(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "X-Prime-Log-Offset": "0"})
        await response.prepare(request)
        for start in range(0, len(payload), 256 * 1024):
            await response.write(payload[start:start + 256 * 1024])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/tasks/{task_id}/logs", logs)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{bound_port(runner)}"


class _Locator:
    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls

    async def url_for(self, node: str) -> str:
        return self.urls[node]


async def shipped(lines: int, nodes: int, tmp: Path) -> float:
    payload = _payload(lines)
    runners, urls, tasks = [], {}, {}
    for n in range(nodes):
        runner, url = await _node(payload)
        address = Account.create().address
        runners.append(runner)
        urls[address] = url
        task_id = f"bench{n}"
        tasks[task_id] = Task(task_id, TaskSpec(image="busybox"), 0.0, [Replica(task_id, 0, node=address, state=ReplicaState.RUNNING)])
    store = LogStore(tmp / f"ship-{nodes}.sqlite", max_bytes_per_task=2**40)
    client = SignedClient(Account.create(), domain=Domain(31337, "0x" + "ab" * 20), retries=0)
    keeper = LogKeeper(client, _Locator(urls), store, lambda: tasks.values(), tasks.get)  # type: ignore[arg-type]
    started = time.perf_counter()
    await keeper.step()
    while any((r := store.attempt(AttemptKey(t, 0, 0))) is None or r.received < lines for t in tasks):
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    await keeper.close()
    await client.close()
    for runner in runners:
        await runner.cleanup()
    store.close()
    return lines / elapsed


def storage(lines: int, tmp: Path) -> tuple[float, float]:
    path = tmp / "storage.sqlite"
    store = LogStore(path, max_bytes_per_task=2**40)
    key = AttemptKey("bench", 0, 0)
    started = time.perf_counter()
    batch = 500
    for start in range(0, lines, batch):
        rows = [NewLine("stdout", TEXT.format(i=i), f"2026-12-02T08:00:00.{i:09d}Z", i, 0.0) for i in range(start, min(lines, start + batch))]
        store.append(key, "0xnode", rows, received=start + len(rows))
    elapsed = time.perf_counter() - started
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = sum(p.stat().st_size for p in tmp.glob("storage.sqlite*"))
    store.close()
    return size * (1_000_000 / lines) / 2**20, lines / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--nodes", default="1,4")
    parser.add_argument("--storage-lines", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"line: {len(TEXT.format(i=0))} characters of text, ~{len(_payload(1))} bytes of NDJSON")
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in (int(n) for n in args.nodes.split(",")):
            rate = await shipped(args.lines, nodes, Path(tmp))
            print(f"shipped: {nodes} node(s) x {args.lines:,} lines: {rate:,.0f} lines/s per node, {rate * nodes:,.0f} lines/s in all")
        mib, rate = storage(args.storage_lines, Path(tmp))
        print(f"storage: {mib:,.1f} MiB per 1 M lines (written at {rate:,.0f} lines/s)")


if __name__ == "__main__":
    asyncio.run(main())
