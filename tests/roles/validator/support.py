"""Test support for the validator: miners served in the test's own event loop, and helpers.

``InProcessMiner`` is a miner's challenge surface as the miner service mounts it:
prime.challenge.service behind the real signed-request middleware and a real on-chain
``is_validator`` check, with any prover (honest, or a cheater from tests/challenge/cheaters.py).
It counts the challenges it accepted and keeps the verdicts it was sent.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.auth.client import SignedClient
from prime.auth.middleware import require, signed_request_middleware
from prime.auth.permissions import ChainPermissions
from prime.auth.signing import Domain
from prime.chain.client import RegistryClient
from prime.chain.types import NodeInfo, NodeStatus, Specs
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import Commitment, MatmulProver, NumpyBackend, Prover
from prime.challenge.service import ChallengeService, add_challenge_routes
from prime.clients.discovery import DiscoveryClient
from prime.protocol.challenge import DriverIdentity, VerdictNote
from prime.web import bound_port, make_app, serve

# A CPU-only node: float32 challenges, sized by --challenge-n in the tests.
CPU_SPECS = Specs(gpu_count=0, gpu_model="", gpu_memory_mib=0, cpu_cores=2, ram_mib=4096, disk_gib=10)


class HeldProver(MatmulProver):
    """Honest, but holds inside commit() until ``release`` is set (a miner that is slow right now)."""

    def __init__(self) -> None:
        super().__init__(NumpyBackend())
        self.started = threading.Event()
        self.release = threading.Event()

    def commit(self, params: ChallengeParams) -> Commitment:
        self.started.set()
        self.release.wait(timeout=120)
        return super().commit(params)


class InProcessMiner:
    """POST /challenge, /challenge/{id}/open and /challenge/{id}/verdict for one node key."""

    def __init__(self, node: LocalAccount, prover: Prover, permissions: ChainPermissions, *,
                 gpu_uuids: Sequence[str] = (), driver: DriverIdentity | None = None) -> None:
        self.node = node
        # gpu_uuids/driver: what its commitments name, as a miner's probe would fill them (CPU provers too)
        self.service = ChallengeService(prover, gpu_uuids=gpu_uuids, driver=driver)
        self.permissions = permissions
        self.challenges = 0  # POST /challenge requests that passed signature and validator checks
        self.challenged_at: list[float] = []  # time.monotonic() of each of them
        self.verdicts: list[dict[str, Any]] = []
        self.signers: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _is_validator(self, request: web.Request, signer: str) -> bool:
        return await self.permissions.is_validator(signer)

    def _guard(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if handler == self.service.handle_challenge:
            inner = handler

            async def counted(request: web.Request) -> web.StreamResponse:
                self.challenges += 1
                self.challenged_at.append(time.monotonic())
                self.signers.add(request["signer"])
                return await inner(request)

            handler = counted
        return require(self._is_validator)(handler)

    async def _verdict(self, request: web.Request) -> web.Response:
        """Keep the verdict a validator sends (what a miner shows its operator)."""
        body = VerdictNote.from_json(await request.read()).to_json()  # the miner's own message type
        self.verdicts.append({"id": request.match_info["id"], "signer": request["signer"], **body})
        return web.json_response({"ok": True})

    async def start(self) -> InProcessMiner:
        app = make_app(name="test-miner", middlewares=[signed_request_middleware(self.node, domain_of_world())])
        add_challenge_routes(app, self.service, self._guard)
        app.router.add_post("/challenge/{id}/verdict", require(self._is_validator)(self._verdict))
        self._runner = await serve(app, host="127.0.0.1", port=0)
        self.port = bound_port(self._runner)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


WORLD_DOMAIN: list[Domain] = []  # the session deployment's network, set by the world fixture


def domain_of_world() -> Domain:
    return WORLD_DOMAIN[0]


async def announce(node: LocalAccount, discovery_url: str, port: int, run_id: int) -> None:
    """Announce ``node`` to the world's discovery (``discovery_url``: its base URL)."""
    from tests.roles.validator.conftest import DISCOVERY_KEY

    async with SignedClient(node, domain=domain_of_world()) as client:
        await DiscoveryClient(client, f"{discovery_url}#{DISCOVERY_KEY.address}").announce("127.0.0.1", port, run_id)


async def register(provider: RegistryClient, run_id: int, node: LocalAccount, specs: Specs = CPU_SPECS) -> None:
    await provider.register_node(run_id, node, specs)


def new_node() -> LocalAccount:
    return Account.create()


async def wait_for(check: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; AssertionError naming
    ``what`` after the timeout (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def wait_validated(reader: RegistryClient, node: str, *, timeout_s: float = 90.0) -> NodeInfo:
    """The node's record once a validator decided (status no longer Registered)."""

    async def decided() -> NodeInfo | None:
        info = await reader.get_node(node)
        return info if info.status != NodeStatus.REGISTERED else None

    return await wait_for(decided, timeout_s=timeout_s, what=f"a verdict on chain for {node}")


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0) -> tuple[int, str, str]:
    """Run ``prime *args`` without blocking the event loop (in-process miners keep serving)."""
    import os

    child_env = {k: v for k, v in os.environ.items() if not k.startswith("PRIME_")}
    child_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "prime.cli", *args, env=child_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def reports(data_dir) -> list[dict[str, Any]]:
    code, out, err = await run_cli("validator", "reports", "--json", "--data-dir", str(data_dir))
    assert code == 0, err
    return json.loads(out)


def by_node(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["node"], []).append(row)
    return grouped


# -- real miner processes (`prime miner start`, or tests/support/cheating_miner.py) -------------

REPO_ROOT = Path(__file__).resolve().parents[3]


class MinerProcess:
    """A real miner process for one node key; it registers and announces itself when it starts."""

    def __init__(self, node: LocalAccount, process: Any) -> None:
        self.node = node
        self.process = process  # tests.fixtures.processes.RoleProcess

    @property
    def address(self) -> str:
        return self.node.address

    async def challenges_received(self) -> int:
        """POST /challenge requests the miner answered, whatever the answer (from its /metrics)."""
        import aiohttp

        async with aiohttp.ClientSession() as session, session.get(self.process.base_url + "/metrics") as answer:
            text = await answer.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("prime_http_requests_total{") and 'method="POST"' in line and 'route="/challenge"' in line:
                total += float(line.split()[-1])
        return int(total)


def miner_process_command(mode: str | None, args: list[str], *, delay_s: float | None = None) -> list[str]:
    """``prime miner start <args>``, or the same miner with a cheating prover (``mode``)."""
    if mode is None:
        from tests.fixtures.processes import prime_command

        return prime_command("miner", "start", *args)
    extra = ["--delay-s", str(delay_s)] if delay_s is not None else []
    return [sys.executable, "-m", "tests.support.cheating_miner", "--mode", mode, *extra, *args]


# -- provers that simulate a GPU's rate, or narrower units, on a CPU (tests/roles/validator/test_gpu_claims.py) --

class SimulatedGpu(MatmulProver):
    """A GPU of ``flops_per_s`` simulated on a faster CPU: honest numpy answers, committed no
    sooner than that rate allows (it sleeps the difference; never sooner, whatever the load)."""

    def __init__(self, flops_per_s: float) -> None:
        super().__init__(NumpyBackend())
        self.flops_per_s = flops_per_s
        self.compute_s: list[float] = []  # what numpy itself took, per commitment
        self.commit_s: list[float] = []  # what the simulated device took

    def commit(self, params: ChallengeParams) -> Commitment:
        started = time.perf_counter()
        commitment = super().commit(params)
        self.compute_s.append(commitment.elapsed_s)
        time.sleep(max(0.0, params.flops / self.flops_per_s - (time.perf_counter() - started)))
        commitment.elapsed_s = time.perf_counter() - started
        self.commit_s.append(commitment.elapsed_s)
        return commitment


def narrow_significand(x: np.ndarray, keep_bits: int) -> np.ndarray:
    """float32 ``x`` rounded in place (to nearest, ties to even) to ``keep_bits`` significant bits:
    what tf32 or fp16 units (11 bits) hold of a float32 input, at float32's range."""
    drop = np.uint32(24 - keep_bits)
    bits = x.view(np.uint32)
    bits += (np.uint32(1) << (drop - np.uint32(1))) - np.uint32(1) + ((bits >> drop) & np.uint32(1))
    bits &= ~((np.uint32(1) << drop) - np.uint32(1))
    return x


class NarrowUnitsProver(MatmulProver):
    """Answers at full speed as NumpyBackend does, but from inputs rounded to ``keep_bits``
    significant bits (11: fp16 or tf32 units) before each block is multiplied."""

    def __init__(self, keep_bits: int = 11) -> None:
        super().__init__(NumpyBackend())
        self.keep_bits = keep_bits

    def compute(self, params: ChallengeParams) -> np.ndarray:
        from prime.challenge import generator as gen
        from prime.challenge.prover import round_to_dtype

        n, seed, bits = params.n, params.seed, gen.bits_of(params.dtype)
        a_rows = gen.axis_keys(seed, gen.MATRIX_A, gen.AXIS_ROW, np.arange(n))
        b_cols = gen.axis_keys(seed, gen.MATRIX_B, gen.AXIS_COL, np.arange(n))
        a, b, c = (np.empty((n, n), np.float32) for _ in range(3))
        c[...] = 0
        for r in range(params.repeat):
            block = np.arange(r * n, (r + 1) * n)
            gen.fill_ints(a_rows, gen.axis_keys(seed, gen.MATRIX_A, gen.AXIS_COL, block), a, bits=bits)
            gen.fill_ints(gen.axis_keys(seed, gen.MATRIX_B, gen.AXIS_ROW, block), b_cols, b, bits=bits)
            c += narrow_significand(a, self.keep_bits) @ narrow_significand(b, self.keep_bits)
        c *= np.float32(gen.value_scale(2 * bits))
        return round_to_dtype(c, params.dtype)
