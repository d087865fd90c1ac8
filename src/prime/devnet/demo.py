"""`prime devnet demo`: the whole story on one machine, narrated step by step.

up (if needed) → a miner in the background → the validator challenges and approves it, the
master invites it and it heartbeats (Healthy) → a task that prints lines and writes to /data →
its logs followed live → its synced files listed and downloaded with sha256 checked.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from prime.devnet.processes import ProcessRecord, is_alive, last_meaningful_line
from prime.devnet.state import PASSWORD, DevnetInfo, DevnetPaths
from prime.errors import PrimeError

FINAL_TASK_STATES = {"Completed", "Failed", "Stopped"}
DEMO_FILE = "result.txt"
DEMO_SCRIPT = (
    'echo "hello from a prime task on $(hostname)"; '
    "for i in 1 2 3 4 5; do echo \"step $i of 5\"; sleep 1; done; "
    'echo "the answer is 42" > /data/result.txt; '
    "date > /data/finished-at.txt; "
    'echo "wrote /data/result.txt and /data/finished-at.txt"'
)


@dataclass
class DemoOptions:
    node_timeout_s: float = 300.0
    task_timeout_s: float = 180.0
    sync_timeout_s: float = 90.0


class Narrator:
    """Numbered steps and indented details."""

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.total = total
        self.number = 0

    def step(self, text: str) -> None:
        self.number += 1
        self.console.print(f"\n[bold cyan]\\[{self.number}/{self.total}][/] [bold]{text}[/]", highlight=False, soft_wrap=True)

    def detail(self, text: str, style: str = "") -> None:
        self.console.print(f"      {text}", style=style, highlight=False, markup=False, soft_wrap=True)


def owner_account(info: DevnetInfo) -> Any:
    from prime.keys import load_account

    return load_account(info.key_file("owner"), password=PASSWORD)


async def wait_for_healthy_node(info: DevnetInfo, master: Any, miner: ProcessRecord, say, *, timeout_s: float) -> None:
    """Narrate the node's way through chain and master states until the master sees it Healthy."""
    from prime.chain.client import RegistryClient

    node = info.node_address
    seen: list[str] = []
    last_error = ""
    deadline = time.monotonic() + timeout_s
    async with await RegistryClient.connect(info.rpc_url, info.deployment) as chain:
        while True:
            status = (await chain.node_status(node)).label
            if f"chain: {status}" not in seen:
                seen.append(f"chain: {status}")
                say(f"on chain the node is {status}")
            if status == "rejected":
                raise PrimeError("The validator rejected the devnet's node; see `prime devnet logs validator` and `prime devnet logs miner`.")
            try:
                nodes = await master.nodes()
                last_error = ""
            except PrimeError as exc:
                nodes, last_error = [], exc.message
            record = next((n for n in nodes if str(n.get("address", "")).lower() == node.lower()), None)
            state = record.get("state") if record else None
            if state and f"master: {state}" not in seen:
                seen.append(f"master: {state}")
                say(f"the master sees the node as {state}")
            if state == "Healthy":
                return
            if not is_alive(miner):
                raise PrimeError(f"The miner stopped: {last_meaningful_line(miner.log)} (log: {miner.log}).")
            if time.monotonic() > deadline:
                where = f"master: {last_error}" if last_error else f"last states: {', '.join(seen) or 'none'}"
                raise PrimeError(f"The node did not become Healthy within {timeout_s:.0f} s ({where}); see `prime devnet logs`.")
            await asyncio.sleep(1.0)


async def follow_task(master: Any, task_id: str, emit, *, timeout_s: float) -> dict[str, Any]:
    """Print the task's log lines live until it finishes; returns the final task."""
    deadline = time.monotonic() + timeout_s
    printed = 0

    async def follow() -> None:
        nonlocal printed
        async for entry in master.logs(task_id, follow=True):
            if "line" in entry:
                emit(entry)
                printed += 1

    follower: asyncio.Task | None = None
    task: dict[str, Any] = {}
    try:
        while True:
            task = await master.get_task(task_id)
            state = task.get("state")
            started = any(r.get("state") not in (None, "Pending", "Assigned") for r in task.get("replicas") or [])
            if follower is None and (started or state in FINAL_TASK_STATES):
                follower = asyncio.create_task(follow())
            if state in FINAL_TASK_STATES:
                break
            if time.monotonic() > deadline:
                raise PrimeError(f"Task {task_id} did not finish within {timeout_s:.0f} s (state {state}); see `prime buyer task show {task_id}`.")
            await asyncio.sleep(1.0)
        if follower is not None:
            # The master ends the stream after the last line; give it a moment, then stop waiting.
            done, _ = await asyncio.wait({follower}, timeout=5)
            if follower in done and follower.exception() is not None and not printed:
                follower = None  # following failed: fall back to reading the logs once below
    finally:
        if follower is not None and not follower.done():
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    if not printed:
        async for entry in master.logs(task_id, follow=False):
            if "line" in entry:
                emit(entry)
    return task


async def wait_for_files(master: Any, task_id: str, wanted: str, *, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        files = await master.files(task_id)
        if any(f.get("path") == wanted for f in files):
            return files
        if time.monotonic() > deadline:
            raise PrimeError(f"The master did not list /data/{wanted} of task {task_id} within {timeout_s:.0f} s; see `prime devnet logs master`.")
        await asyncio.sleep(1.0)


async def run_task_story(info: DevnetInfo, paths: DevnetPaths, miner: ProcessRecord, image: str, narrator: Narrator, options: DemoOptions) -> None:
    from prime.roles.buyer.master_client import MasterClient, download_target
    from prime.roles.buyer.render import files_table, format_log_line
    from prime.roles.buyer.spec import build_task_spec

    account = owner_account(info)
    async with MasterClient.open(account, info.url("master"), timeout_s=10, retries=1) as master:
        narrator.step("The validator challenges the node, the master invites it, it starts heartbeating")
        await wait_for_healthy_node(info, master, miner, narrator.detail, timeout_s=options.node_timeout_s)

        narrator.step("Creating a task as the run's owner (what `prime buyer task create` does)")
        spec = build_task_spec(image=image, command=["sh", "-c", DEMO_SCRIPT], persistent=True)
        task = await master.create_task(spec)
        task_id = task["id"]
        narrator.detail(f"task {task_id}: {image} sh -c '…' (persistent /data)")
        narrator.detail(f"same as: prime buyer task create --image {image} --persistent -- sh -c '…'")

        narrator.step(f"Following its logs (prime buyer logs {task_id} -f)")
        final = await follow_task(master, task_id, lambda e: narrator.detail(format_log_line(e)), timeout_s=options.task_timeout_s)
        narrator.detail(f"task {task_id} is {final.get('state')}", style="green" if final.get("state") == "Completed" else "red")
        if final.get("state") != "Completed":
            raise PrimeError(f"The demo task ended {final.get('state')}; see `prime buyer task show {task_id}` and `prime devnet logs miner`.")

        narrator.step(f"Reading the files the master synced from /data (prime buyer files {task_id} --download …)")
        files = await wait_for_files(master, task_id, DEMO_FILE, timeout_s=options.sync_timeout_s)
        narrator.console.print(files_table(task_id, files))
        target_dir = paths.root / "demo" / task_id
        per_replica = len({f.get("replica", 0) for f in files}) > 1
        for entry in files:
            target = download_target(target_dir, entry, per_replica=per_replica)
            await master.download(task_id, entry, target)
            narrator.detail(f"downloaded {entry['path']} → {target} (sha256 {entry['sha256'][:16]}… verified)")
        result = download_target(target_dir, next(f for f in files if f["path"] == DEMO_FILE), per_replica=per_replica)
        narrator.detail(f"{DEMO_FILE} says: {Path(result).read_text().strip()}", style="bold")


def demo(paths: DevnetPaths, up_result: Any, *, gpu: str, task_network: str, console: Console, options: DemoOptions | None = None) -> None:
    """Everything after `up` (the caller brought the devnet up and holds the lock)."""
    from prime.devnet.images import docker_client, ensure_demo_image
    from prime.devnet.miner import start_background

    options = options or DemoOptions()
    info = up_result.info
    narrator = Narrator(console, total=7)
    narrator.step("Local network")
    narrator.detail(("already up" if up_result.already_up else "started") + f": anvil {info.rpc_url}, discovery {info.url('discovery')}, "
                    f"validator {info.url('validator')}, master {info.url('master')}; run {info.run_id}")

    narrator.step("Task image")
    client = docker_client()
    try:
        image, built = ensure_demo_image(client)
    finally:
        client.close()
    narrator.detail(f"{image}: " + ("built from /bin/busybox (FROM scratch, no registry needed)" if built else "already present"))

    narrator.step("Miner")
    miner, started = start_background(paths, info, gpu=gpu, task_network=task_network)
    narrator.detail(("started in the background" if started else "already running") + f" (pid {miner.pid}, node {info.node_address}, log {miner.log})")

    asyncio.run(run_task_story(info, paths, miner, image, narrator, options))

    console.print("\n[bold green]Done.[/] The devnet keeps running. Try:", highlight=False)
    for line in (
        f"source {paths.root}/env                 # act as the run's owner",
        "prime buyer tasks ; prime buyer nodes",
        "prime devnet status --watch            # live view (make status)",
        "prime devnet down                      # stop everything (make down)",
    ):
        console.print(f"  {line}", highlight=False, markup=False)
