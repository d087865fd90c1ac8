"""Task start latency and storage sync throughput on a real local network. Prints figures; asserts nothing.

    python bench/tasks.py [--runs 5] [--heartbeat 1] [--large-mib 1024] [--large-files 4]
                          [--small-files 10000] [--small-kib 4] [--skip-latency] [--skip-sync] [--keep]

Setup: `prime devnet up` in a temporary state directory on free loopback ports (anvil, discovery,
validator, master as real processes) with the given heartbeat interval, then `prime devnet miner
--background --task-network none`; the bench waits until the master sees the node Healthy. At the
end `prime devnet down` and the directory is removed (unless --keep).

1. Task start latency. "prime": from just before the run owner's POST /tasks at the master to the
   moment the Docker engine started the task's container (its State.StartedAt), i.e. master
   placement + push to the miner + the miner's docker create/start with prime's labels, volume
   and limits. Also when the buyer first sees the replica Running at the master (that needs the
   miner's next heartbeat). "docker run": the same image and command with a plain
   `docker run -d --network none` (CLI start-up included), from just before the command to
   StartedAt; and the same through the Docker SDK (what the miner uses). Medians over --runs.
   Goal: prime ≤ docker run + 0.5 s at a 1 s heartbeat.

2. Storage sync. The master's own sync code (prime.roles.master.sync.StorageSync.sync_replica,
   with its content-addressed BlobStore and MasterStore in a temp directory) runs in this process
   as the devnet's master key, against the real miner process over loopback: signed GET manifest,
   then signed GET of each missing blob, sha256 verified while streaming, written, fsynced and
   renamed. The files are written by this bench straight into the miner's data directory of a
   task (<miner data>/tasks/<id>/data; no container is involved: the figure is about the sync).
   The first manifest (the miner hashes every file once) is timed apart from the transfer.
   Files are fresh in the page cache on both sides. Figures for --large-files files totalling
   --large-mib MiB (goal ≥ 200 MB/s) and for --small-files files of --small-kib KiB each.

3. Re-sync of unchanged data: the same sync again; content bytes fetched (goal: 0) and the size of
   the manifest that was exchanged instead; then one file changed: only its bytes move.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
from prometheus_client import CollectorRegistry

from prime.auth.client import SignedClient
from prime.auth.signing import Domain
from prime.chain.anvil import free_port
from prime.clients.discovery import DiscoveryClient
from prime.devnet.images import ensure_demo_image
from prime.keys import load_account
from prime.roles.buyer.master_client import MasterClient
from prime.roles.master.cas import BlobStore
from prime.roles.master.locator import NodeLocator
from prime.roles.master.metrics import MasterMetrics
from prime.roles.master.store import MasterStore
from prime.roles.master.sync import StorageSync
from prime.store import Database

PASSWORD = "devnet"
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; sleep 120 & wait"]
MIB = 1 << 20


# --- the network ---------------------------------------------------------------------------------


def prime_cli(*args: Any, env: dict[str, str] | None = None, timeout_s: float = 300) -> str:
    argv = [sys.executable, "-m", "prime.cli", *map(str, args)]
    base = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    done = subprocess.run(argv, check=False, capture_output=True, text=True, env={**base, **(env or {})}, timeout=timeout_s)
    if done.returncode != 0:
        raise SystemExit(f"`prime {' '.join(map(str, args))}` failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


@dataclass
class Network:
    state: Path
    info: dict[str, Any]

    def url(self, service: str) -> str:
        return self.info["services"][service]["url"]

    def account(self, role: str) -> Any:
        return load_account(self.info["keys"][role]["key_file"], password=PASSWORD)

    @property
    def node(self) -> str:
        return self.info["node_address"]

    def task_data_dir(self, task_id: str) -> Path:
        return self.state / "data" / "miner" / "tasks" / task_id / "data"


def bring_up(state: Path, heartbeat_s: float) -> Network:
    ports: list[int] = []
    while len(ports) < 5:
        port = free_port()
        if port not in ports:
            ports.append(port)
    names = ("anvil", "discovery", "validator", "master", "miner")
    args = [x for name, port in zip(names, ports, strict=True) for x in (f"--{name}-port", port)]
    out = prime_cli("devnet", "up", "--state-dir", state, *args, "--heartbeat-interval", heartbeat_s, "--json")
    info = json.loads(out)
    prime_cli("devnet", "miner", "--state-dir", state, "--background", "--task-network", "none")
    return Network(state, info)


async def wait_healthy(owner: MasterClient, node: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(n["address"] == node and n["state"] == "Healthy" for n in await owner.nodes()):
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"the devnet's node {node} did not become Healthy in {timeout_s:.0f} s; see the logs in the state dir")


# --- 1. task start latency -----------------------------------------------------------------------


def started_at(container: Any) -> float:
    """The engine's State.StartedAt as unix seconds (nanoseconds cut to microseconds)."""
    text = container.attrs["State"]["StartedAt"]
    head, _, frac = text.rstrip("Z").partition(".")
    frac = (frac + "000000")[:6]
    return datetime.fromisoformat(f"{head}.{frac}+00:00").timestamp()


def wait_container_started(client: docker.DockerClient, label: str, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for listed in client.api.containers(all=True, filters={"label": label}):
            if listed["State"] in ("running", "exited"):
                return started_at(client.containers.get(listed["Id"]))
        time.sleep(0.01)
    raise SystemExit(f"no container labelled {label} started within {timeout_s:.0f} s")


async def prime_start_once(owner: MasterClient, client: docker.DockerClient, image: str) -> tuple[float, float]:
    """(seconds to the container's start, seconds until the buyer sees Running) for one new task."""
    spec = {"image": image, "command": SLEEPER, "env": {}, "gpus": 0, "replicas": 1, "persistent": False}
    t0 = time.time()
    task = await owner.create_task(spec)
    container_task = asyncio.create_task(asyncio.to_thread(wait_container_started, client, f"prime.task_id={task['id']}"))
    seen_running = None
    deadline = time.monotonic() + 60
    while seen_running is None and time.monotonic() < deadline:
        current = await owner.get_task(task["id"])
        if any(r["state"] == "Running" for r in current["replicas"]):
            seen_running = time.time() - t0
        else:
            await asyncio.sleep(0.02)
    started = await container_task
    await owner.stop_task(task["id"])
    await asyncio.to_thread(wait_removed, client, f"prime.task_id={task['id']}")
    return started - t0, seen_running if seen_running is not None else float("nan")


def wait_removed(client: docker.DockerClient, label: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.api.containers(all=True, filters={"label": label}) and time.monotonic() < deadline:
        time.sleep(0.05)


def raw_cli_once(client: docker.DockerClient, image: str) -> float:
    t0 = time.time()
    out = subprocess.run(["docker", "run", "-d", "--network", "none", "--label", "prime-bench=raw", image, *SLEEPER],
                         capture_output=True, text=True, check=True).stdout.strip()
    container = client.containers.get(out)
    try:
        return started_at(container) - t0
    finally:
        container.remove(force=True)


def raw_sdk_once(client: docker.DockerClient, image: str) -> float:
    t0 = time.time()
    container = client.containers.run(image, SLEEPER, detach=True, network_mode="none", labels={"prime-bench": "raw"})
    try:
        container.reload()
        return started_at(container) - t0
    finally:
        container.remove(force=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    return f"median {median(values):6.3f} s  (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


async def bench_latency(net: Network, owner: MasterClient, client: docker.DockerClient, image: str, runs: int, heartbeat_s: float) -> None:
    print(f"\n== 1. task start latency (heartbeat {heartbeat_s:g} s, image {image})")
    await prime_start_once(owner, client, image)  # warm-up: first placement, first image lookup
    prime_started, prime_seen = [], []
    for _ in range(runs):
        started, seen = await prime_start_once(owner, client, image)
        prime_started.append(started)
        prime_seen.append(seen)
    raw_cli = [await asyncio.to_thread(raw_cli_once, client, image) for _ in range(runs)]
    raw_sdk = [await asyncio.to_thread(raw_sdk_once, client, image) for _ in range(runs)]
    print(f"  prime: POST /tasks at the master → container started   {spread(prime_started)}")
    print(f"  prime: POST /tasks → buyer sees the replica Running     {spread(prime_seen)}")
    print(f"  plain `docker run -d` → container started               {spread(raw_cli)}")
    print(f"  Docker SDK containers.run → container started           {spread(raw_sdk)}")
    overhead = median(prime_started) - median(raw_cli)
    verdict = "met" if overhead <= 0.5 else "MISSED"
    print(f"  prime − docker run: {overhead:+.3f} s (goal ≤ +0.5 s: {verdict})")


# --- 2./3. storage sync --------------------------------------------------------------------------


def write_large(root: Path, total_mib: int, files: int) -> int:
    """``files`` files of random-looking, distinct content totalling ``total_mib`` MiB."""
    root.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)
    per_file = max(1, total_mib // files)
    for i in range(files):
        with open(root / f"shard-{i:03d}.bin", "wb") as fh:
            for j in range(per_file):
                fh.write(f"{i}:{j}:".encode().ljust(32, b"."))  # makes every file's hash distinct
                fh.write(block[32:])
    return per_file * files * MIB


def write_small(root: Path, count: int, size: int) -> int:
    for i in range(count):
        directory = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{i:05d}.bin").write_bytes(os.urandom(size))
    return count * size


def overwrite_start(path: Path, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.write(data)


class Syncer:
    """The master's StorageSync with its own store in ``work``, talking to the devnet's miner."""

    def __init__(self, net: Network, work: Path, client: SignedClient) -> None:
        self.client = client
        self.work = work
        self.net = net
        self.miner_url = net.url("miner")
        discovery = f"{net.url('discovery')}#{net.info['keys']['discovery']['address']}"  # its signer, as the run names it
        locator = NodeLocator(DiscoveryClient(client, discovery), net.info["run_id"],
                              known_url=lambda node: self.miner_url, on_resolved=lambda node, url: None)
        self.db = Database(work / "master.sqlite")
        self.sync = StorageSync(client, locator, MasterStore(self.db), BlobStore(work / "blobs"),
                                MasterMetrics(CollectorRegistry(), lambda: None))  # type: ignore[arg-type]

    async def manifest_bytes(self, task_id: str) -> tuple[float, int, int]:
        """(seconds, files, JSON bytes) of one GET manifest."""
        t0 = time.perf_counter()
        answer = await self.client.request("GET", f"{self.miner_url}/tasks/{task_id}/manifest", audience=self.net.node, params={"replica": 0})
        return time.perf_counter() - t0, len(answer["files"]), len(json.dumps(answer))

    async def fetch_only(self, task_id: str) -> tuple[float, int, int]:
        """(seconds, blobs, bytes) to GET every blob of the manifest and hash it, storing nothing:
        the HTTP + miner part of a sync without the master's disk."""
        answer = await self.client.request("GET", f"{self.miner_url}/tasks/{task_id}/manifest", audience=self.net.node, params={"replica": 0})
        digests = {f["sha256"] for f in answer["files"]}
        t0 = time.perf_counter()
        total = 0
        for digest in digests:
            hasher = hashlib.sha256()
            async with self.client.stream("GET", f"{self.miner_url}/tasks/{task_id}/blobs/{digest}", audience=self.net.node, params={"replica": 0}) as resp:
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    hasher.update(chunk)
                    total += len(chunk)
            assert hasher.hexdigest() == digest
        return time.perf_counter() - t0, len(digests), total

    async def timed_sync(self, node: str, task_id: str) -> tuple[float, Any]:
        t0 = time.perf_counter()
        result = await self.sync.sync_replica(node, task_id, 0)
        return time.perf_counter() - t0, result

    def close(self) -> None:
        self.db.close()


def mb_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / 1e6 / seconds:8.1f} MB/s" if seconds > 0 else "n/a"


def disk_baseline(directory: Path, files: int, nbytes: int) -> float:
    """Seconds to write and fsync ``files`` files of ``nbytes`` in all in ``directory`` (what the
    master's blob store must at least pay), then remove them."""
    directory.mkdir(parents=True, exist_ok=True)
    per_file = nbytes // files
    block = os.urandom(min(per_file, MIB)) or b"x"
    t0 = time.perf_counter()
    for i in range(files):
        with open(directory / f"{i}.bin", "wb") as fh:
            left = per_file
            while left > 0:
                fh.write(block[:left])
                left -= len(block)
            fh.flush()
            os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    shutil.rmtree(directory, ignore_errors=True)
    return seconds


async def bench_one_sync(net: Network, syncer: Syncer, task_id: str, label: str, nbytes: int, goal_mb_s: float | None) -> None:
    hash_s, files, _ = await syncer.manifest_bytes(task_id)
    print(f"  {label}: {files} files, {nbytes / MIB:.0f} MiB")
    print(f"    first manifest (the miner hashes every file)          {hash_s:7.2f} s  {mb_s(nbytes, hash_s)}")
    seconds, blobs, fetched = await syncer.fetch_only(task_id)
    print(f"    for comparison: GET + sha256 of every blob, no store  {seconds:7.2f} s  {mb_s(fetched, seconds)}  {blobs / seconds:8.0f} files/s")
    seconds = await asyncio.to_thread(disk_baseline, syncer.work / "disk-baseline", files, nbytes)
    print(f"    for comparison: write + fsync as many files locally   {seconds:7.2f} s  {mb_s(nbytes, seconds)}  {files / seconds:8.0f} files/s")
    seconds, result = await syncer.timed_sync(net.node, task_id)
    line = f"    sync: manifest + {result.blobs_fetched} blobs fetched, verified, stored  {seconds:7.2f} s  {mb_s(result.bytes_fetched, seconds)}"
    line += f"  {result.blobs_fetched / seconds:8.0f} files/s"
    if goal_mb_s is not None:
        line += f"  (goal ≥ {goal_mb_s:g} MB/s: {'met' if result.bytes_fetched / 1e6 / seconds >= goal_mb_s else 'MISSED'})"
    print(line)
    seconds, again = await syncer.timed_sync(net.node, task_id)
    _, _, manifest_size = await syncer.manifest_bytes(task_id)
    print(f"    re-sync of unchanged data: {again.blobs_fetched} blobs, {again.bytes_fetched} content bytes moved "
          f"(goal 0: {'met' if again.bytes_fetched == 0 else 'MISSED'}); manifest exchanged {manifest_size / 1024:.0f} KiB, {seconds:.2f} s")


async def bench_sync(net: Network, work: Path, args: argparse.Namespace) -> None:
    print("\n== 2./3. storage sync (master's StorageSync in this process → real miner process, loopback)")
    master = net.account("master")
    domain = Domain(int(net.info["chain_id"]), str(net.info["registry"]))
    async with SignedClient(master, domain=domain, timeout_s=120, retries=2) as client:
        syncer = Syncer(net, work, client)
        try:
            large_id, small_id = "bench-large", "bench-small"
            large_root = net.task_data_dir(large_id)
            nbytes = await asyncio.to_thread(write_large, large_root, args.large_mib, args.large_files)
            await bench_one_sync(net, syncer, large_id, "large files", nbytes, 200.0)
            # One file changed: only its bytes move.
            changed = large_root / "shard-000.bin"
            await asyncio.to_thread(overwrite_start, changed, b"changed!")
            await syncer.manifest_bytes(large_id)  # the miner re-hashes the changed file
            seconds, result = await syncer.timed_sync(net.node, large_id)
            print(f"    one file changed: {result.blobs_fetched} blob, {result.bytes_fetched / MIB:.0f} MiB moved "
                  f"(the file is {changed.stat().st_size / MIB:.0f} MiB), {seconds:.2f} s")
            shutil.rmtree(large_root.parent, ignore_errors=True)
            if args.small_files:
                nbytes = await asyncio.to_thread(write_small, net.task_data_dir(small_id), args.small_files, args.small_kib * 1024)
                await bench_one_sync(net, syncer, small_id, f"small files ({args.small_kib} KiB each)", nbytes, None)
                shutil.rmtree(net.task_data_dir(small_id).parent, ignore_errors=True)
        finally:
            syncer.close()


# --- main ----------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="prime-bench-tasks-"))
    state = base / "devnet"
    client = docker.from_env(timeout=60)
    try:
        t0 = time.monotonic()
        net = bring_up(state, args.heartbeat)
        owner_account = net.account("owner")
        async with AsyncExitStack() as stack:
            owner = await stack.enter_async_context(MasterClient.open(owner_account, net.url("master"), timeout_s=30))
            await wait_healthy(owner, net.node)
            print(f"devnet up in {state}: node {net.node} Healthy after {time.monotonic() - t0:.1f} s")
            image, _ = await asyncio.to_thread(ensure_demo_image, client)
            if not args.skip_latency:
                await bench_latency(net, owner, client, image, args.runs, args.heartbeat)
        if not args.skip_sync:
            work = base / "master-sync"
            work.mkdir()
            await bench_sync(net, work, args)
    finally:
        if state.exists():
            prime_cli("devnet", "down", "--state-dir", state, timeout_s=120)
        for listed in client.api.containers(all=True, filters={"label": "prime-bench=raw"}):
            client.api.remove_container(listed["Id"], force=True)
        client.close()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="task starts measured per method")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="the miner's heartbeat interval (s)")
    parser.add_argument("--large-mib", type=int, default=1024, help="total size of the large files (MiB)")
    parser.add_argument("--large-files", type=int, default=4, help="how many large files")
    parser.add_argument("--small-files", type=int, default=10_000, help="how many small files (0: skip)")
    parser.add_argument("--small-kib", type=int, default=4, help="size of each small file (KiB)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
