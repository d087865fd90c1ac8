"""How many signed heartbeats per second does a real master process take? Prints figures; asserts nothing.

    python bench/heartbeats.py [--sizes 100,1000,10000] [--seconds 8] [--concurrency 64]

For each size N:
1. Membership on a real anvil, N real node keys: registerNode (a provider pays the stake),
   reportValidation (a validator), joinRun (with the master's invite signature) -- 3N real
   transactions, signed locally and sent in JSON-RPC batches with automine off, then mined in a
   few large blocks (anvil runs with --disable-block-gas-limit). Nothing is written to contract
   storage behind the contract's back; the run's on-chain node count is checked to be N.
2. A real `prime master start` process (its own SQLite data dir) follows the chain from the
   deployment block and learns the N members from their NodeValidated/NodeJoined events.
3. Load over loopback, every heartbeat signed by its node's key (fresh timestamp and nonce,
   pre-signed just before each phase so the load generator's signing does not compete with the
   master for the machine's CPUs):
   - paced: N/30 heartbeats per second (N nodes at the default 30 s interval), open loop;
   - saturated: ``--concurrency`` requests in flight, round robin over the N nodes, closed loop;
   - floor: the same saturated load against a bare aiohttp handler (own process) that only
     verifies the same signature and answers the same empty heartbeat answer.
   Reported: heartbeats/s sustained, p50/p99 latency, CPU of the server process (psutil,
   % of one core: the master is one asyncio process).

The load generator is one Python process with aiohttp on the same machine, so at saturation
the figures are a lower bound of what the master could take from many real nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixtures.processes (RoleProcess) when run from a checkout

from bench.world import deploy_for_bench  # noqa: E402
from prime.auth.signing import HEADER_NONCE, Domain, recover_signer, sign_answer, sign_headers  # noqa: E402
from prime.chain.anvil import AnvilProcess, rpc_call, start_anvil  # noqa: E402
from prime.chain.client import RegistryClient, invite_digest, registration_digest, sign_digest  # noqa: E402
from prime.chain.types import Requirements, Specs  # noqa: E402
from prime.keys import create_keystore  # noqa: E402
from tests.fixtures.processes import RoleProcess, free_port, prime_command  # noqa: E402

SPECS = Specs(gpu_count=8, gpu_model="NVIDIA H100 80GB HBM3", gpu_memory_mib=81_559, cpu_cores=96,
              ram_mib=1_048_576, disk_gib=8_000)
BODY = json.dumps({
    "tasks": [],
    "gpus": [{"index": i, "util": 97.0, "mem_used_mib": 70_000.0, "temp_c": 64.0} for i in range(8)],
    "load": {"cpu_pct": 35.0, "mem_used_mib": 200_000.0},
}).encode()
GAS = {"registerNode": 600_000, "reportValidation": 200_000, "joinRun": 400_000}


# --- membership on chain -------------------------------------------------------------------------


def _batch_rpc(rpc_url: str, calls: list[tuple[str, list[Any]]]) -> list[Any]:
    import urllib.request

    body = json.dumps([{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]).encode()
    req = urllib.request.Request(rpc_url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        answers = json.loads(resp.read())
    errors = [a["error"] for a in answers if a.get("error")]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(calls)} RPC calls failed, first: {errors[0]}")
    return [a.get("result") for a in sorted(answers, key=lambda a: a["id"])]


def _send_phase(anvil: AnvilProcess, sender: LocalAccount, calls: list[tuple[str, list[Any]]], contract: Any,
                registry: str, value: int = 0) -> None:
    """Sign one transaction per call (sequential nonces), send them in batches, mine them all."""
    nonce = int(rpc_call(anvil.rpc_url, "eth_getTransactionCount", [sender.address, "pending"]), 16)
    raws = []
    for i, (fn, args) in enumerate(calls):
        tx = {"to": registry, "data": contract.encode_abi(fn, args=args), "value": value, "gas": GAS[fn],
              "maxFeePerGas": 50 * 10**9, "maxPriorityFeePerGas": 10**9, "nonce": nonce + i,
              "chainId": anvil.chain_id, "type": 2}
        raws.append("0x" + bytes(sender.sign_transaction(tx).raw_transaction).hex())
    rpc_call(anvil.rpc_url, "evm_setAutomine", [False])
    try:
        for start in range(0, len(raws), 500):
            _batch_rpc(anvil.rpc_url, [("eth_sendRawTransaction", [r]) for r in raws[start:start + 500]])
        for _ in range(1000):
            status = rpc_call(anvil.rpc_url, "txpool_status", [])
            if int(status["pending"], 16) == 0 and int(status["queued"], 16) == 0:
                break
            rpc_call(anvil.rpc_url, "evm_mine", [], timeout_s=300)
    finally:
        rpc_call(anvil.rpc_url, "evm_setAutomine", [True])


async def seed_run(anvil: AnvilProcess, deployment: Any, n: int, master: LocalAccount) -> tuple[int, list[LocalAccount], float]:
    """A run whose N nodes registered, were approved and joined, all with real transactions."""
    owner, validator, provider = anvil.accounts[2], anvil.accounts[1], anvil.accounts[4]
    started = time.perf_counter()
    async with await RegistryClient.connect(anvil.rpc_url, deployment, owner) as client:
        run_id = await client.create_run(Requirements(min_gpus=1), "http://127.0.0.1:9", [master.address])
        stake = await client.min_stake()
        nodes = [Account.create() for _ in range(n)]
        chain_id, registry = client.chain_id, client.address
        expiry = await client.block_timestamp() + 24 * 3600
        register = [("registerNode", [run_id, node.address, SPECS.as_tuple(),
                                      sign_digest(node, registration_digest(chain_id, registry, provider.address,
                                                                            node.address, run_id))])
                    for node in nodes]
        _send_phase(anvil, provider, register, client.contract, registry, value=stake)
        _send_phase(anvil, validator, [("reportValidation", [node.address, True, b"\x11" * 32]) for node in nodes],
                    client.contract, registry)
        join = [("joinRun", [run_id, node.address, expiry,
                             sign_digest(master, invite_digest(chain_id, registry, run_id, node.address, expiry))])
                for node in nodes]
        _send_phase(anvil, provider, join, client.contract, registry)
        run = await client.get_run(run_id)
    if run.node_count != n:
        raise RuntimeError(f"only {run.node_count} of {n} nodes joined run {run_id} on chain; check the gas limits")
    return run_id, nodes, time.perf_counter() - started


# --- servers -------------------------------------------------------------------------------------


async def metric(base_url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(base_url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def start_master(anvil: AnvilProcess, deployment_path: Path, run_id: int, master: LocalAccount, work: Path) -> RoleProcess:
    key_file = work / "master-key.json"
    create_keystore(key_file, "bench", master.key.hex(), kdf="pbkdf2", iterations=2)
    port = free_port()
    proc = RoleProcess("master", prime_command(
        "master", "start", "--run-id", str(run_id), "--key-file", str(key_file), "--host", "127.0.0.1",
        "--port", str(port), "--rpc-url", anvil.rpc_url, "--deployment", str(deployment_path),
        "--data-dir", str(work / "master"), "--heartbeat-interval", "30", "--poll-interval", "0.5",
    ), port=port, env={"PRIME_KEY_PASSWORD": "bench"}, log_dir=work)
    return proc.start(timeout_s=120)


def floor_server(port: int, key: str, chain_id: int, registry: str) -> None:
    """A bare aiohttp handler that verifies the heartbeat's signature and answers like a master
    (its answer signed for the request's nonce, as a master's is)."""
    account = Account.from_key(key)
    domain = Domain(chain_id, registry)

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            recover_signer(request.headers, request.method, request.raw_path, body, audience=account.address, domain=domain)
        except Exception as exc:  # noqa: BLE001 - a benchmark floor, not a service
            return web.json_response({"error": "unauthorized", "detail": str(exc)}, status=401)
        answer = b'{"interval_s":30.0,"desired":[]}'
        headers = sign_answer(account, request.headers[HEADER_NONCE], 200, answer, domain)
        return web.Response(body=answer, content_type="application/json", headers=headers)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/heartbeat", handler)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    sent: int
    ok: int
    seconds: float
    latencies: list[float]
    cpu_pct: float
    client_cpu_pct: float

    def row(self) -> str:
        lat = sorted(self.latencies) or [float("nan")]
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        rate = self.ok / self.seconds if self.seconds else 0.0
        errors = self.sent - self.ok
        return (f"{self.label:<28} {rate:>9.0f} hb/s  p50 {p50:>7.2f} ms  p99 {p99:>7.2f} ms  "
                f"server CPU {self.cpu_pct:>4.0f}%  load generator CPU {self.client_cpu_pct:>4.0f}%  "
                f"({self.ok} ok, {errors} errors)")


def presign(nodes: list[LocalAccount], count: int, to: str, domain: Domain) -> list[dict[str, str]]:
    """``count`` heartbeats signed by the nodes in turn, addressed to the master ``to``."""
    return [sign_headers(nodes[i % len(nodes)], "POST", "/heartbeat", BODY, audience=to, domain=domain) for i in range(count)]


async def run_load(label: str, base_url: str, pid: int, requests: list[dict[str, str]], *, concurrency: int,
                   seconds: float, rate: float | None = None) -> Result:
    """Send the pre-signed heartbeats: closed loop with ``concurrency`` in flight, or paced at ``rate``/s."""
    proc = psutil.Process(pid)
    latencies: list[float] = []
    ok = sent = 0
    url = base_url + "/heartbeat"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(headers: dict[str, str]) -> None:
            nonlocal ok, sent
            sent += 1
            began = time.perf_counter()
            try:
                async with session.post(url, data=BODY, headers={**headers, "Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok += 1
                        latencies.append(time.perf_counter() - began)
            except aiohttp.ClientError:
                pass

        cpu_before = sum(proc.cpu_times()[:2])
        me = psutil.Process()
        my_cpu_before = sum(me.cpu_times()[:2])
        started = time.perf_counter()
        deadline = started + seconds
        it = iter(requests)
        if rate is None:
            async def worker() -> None:
                for headers in it:
                    if time.perf_counter() > deadline:
                        return
                    await one(headers)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            pending: set[asyncio.Task[None]] = set()
            for i, headers in enumerate(it):
                due = started + i / rate
                if due > deadline:
                    break
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.ensure_future(one(headers))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
        cpu = sum(proc.cpu_times()[:2]) - cpu_before
        my_cpu = sum(me.cpu_times()[:2]) - my_cpu_before
    return Result(label, sent, ok, elapsed, latencies, 100.0 * cpu / elapsed, 100.0 * my_cpu / elapsed)


async def bench_size(anvil: AnvilProcess, deployment: Any, n: int, args: argparse.Namespace, work: Path) -> list[str]:
    master = Account.create()
    domain = Domain.of(deployment)
    run_id, nodes, seed_s = await seed_run(anvil, deployment, n, master)
    print(f"\nN = {n:,}: {3 * n:,} transactions (register, approve, join) mined in {seed_s:.1f} s; run {run_id}")
    proc = start_master(anvil, deployment.path, run_id, master, work / f"n{n}")
    lines: list[str] = []
    try:
        began = time.perf_counter()
        while await metric(proc.base_url, 'prime_master_nodes{state="Joined"}') < n:
            if time.perf_counter() - began > 600:
                raise RuntimeError("the master did not learn every member from the chain within 10 minutes")
            await asyncio.sleep(0.5)
        print(f"  master learned {n:,} members from chain events in {time.perf_counter() - began:.1f} s")

        # Warm up: every node's first heartbeat (Joined -> Healthy), not measured.
        warm = await run_load("warm-up", proc.base_url, proc.proc.pid, presign(nodes, n, master.address, domain), concurrency=args.concurrency,
                              seconds=600)
        healthy = await metric(proc.base_url, 'prime_master_nodes{state="Healthy"}')
        print(f"  warm-up: {warm.ok:,} first heartbeats, {healthy:,.0f} nodes Healthy")

        paced_rate = n / 30.0
        paced_count = int(paced_rate * args.seconds) + 1
        paced = await run_load(f"paced {paced_rate:,.0f}/s (N/30 s)", proc.base_url, proc.proc.pid,
                               presign(nodes, paced_count, master.address, domain), concurrency=max(args.concurrency, 256),
                               seconds=args.seconds, rate=paced_rate)
        budget = args.max_requests
        saturated = await run_load(f"saturated, {args.concurrency} in flight", proc.base_url, proc.proc.pid,
                                   presign(nodes, budget, master.address, domain), concurrency=args.concurrency, seconds=args.seconds)
        lines += [f"  master  {paced.row()}", f"  master  {saturated.row()}"]
        for line in lines:
            print(line)
        rss = psutil.Process(proc.proc.pid).memory_info().rss / 2**20
        print(f"  master RSS {rss:,.0f} MiB")
    finally:
        proc.stop()

    port = free_port()
    floor_key = Account.create()
    floor = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port), floor_key.key.hex(),
                              str(domain.chain_id), domain.registry], stdin=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                async with aiohttp.ClientSession() as s, s.get(base + "/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        result = await run_load(f"saturated, {args.concurrency} in flight", base, floor.pid,
                                presign(nodes, args.max_requests, floor_key.address, domain), concurrency=args.concurrency, seconds=args.seconds)
        line = f"  floor   {result.row()}"
        print(line)
        lines.append(line)
    finally:
        floor.terminate()
        floor.wait(10)
    return [f"N = {n:,}"] + lines


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="prime-bench-hb-") as tmp:
        work = Path(tmp)
        anvil = start_anvil(None, log_path=work / "anvil.log", extra_args=["--disable-block-gas-limit"])
        try:
            deployment = await deploy_for_bench(anvil, work)
            print(f"machine: {os.cpu_count()} CPUs; load generator and servers share them; "
                  f"{args.seconds:g} s per phase; bodies {len(BODY)} bytes (8 GPU samples)")
            summary = []
            for n in sizes:
                summary += await bench_size(anvil, deployment, n, args, work)
            print("\nsummary")
            for line in summary:
                print(line)
        finally:
            anvil.stop()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--floor-server":
        floor_server(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000", help="comma-separated node counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured phase")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight at saturation")
    parser.add_argument("--max-requests", type=int, default=20_000,
                        help="heartbeats pre-signed for a saturated phase (it ends when they run out)")
    asyncio.run(main(parser.parse_args()))
