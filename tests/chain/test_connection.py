"""The chain connection survives cancelled requests (real anvil).

web3 8 takes one process-wide thread lock on every HTTP request; a request cancelled while it
waited for it left it taken, and every later web3 call of the process hung (web3.py #3867). That
is what hung CI's run: fixtures cancel their services' loops mid-call. ``LoopSessions`` takes no
such lock, so neither a cancelled request nor a lock some other web3 user left taken stops us.
"""

from __future__ import annotations

import asyncio
import threading

from web3._utils.http_session_manager import HTTPSessionManager

from prime.chain.client import RegistryClient

ANSWER_S = 10.0  # far more than a loopback call takes; a hang shows as a timeout


def pool_threads() -> int:
    """Threads of unnamed thread pools (the event loop's own are named asyncio_N)."""
    return sum(1 for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor-"))


async def test_calls_go_on_while_web3s_own_lock_is_held(anvil, deployment) -> None:
    client = await RegistryClient.connect(anvil.rpc_url, deployment)
    poisoned = HTTPSessionManager._lock
    assert poisoned.acquire(timeout=5)  # as a cancelled web3 request leaves it
    try:
        assert await asyncio.wait_for(client.block_number(), ANSWER_S) >= 1
    finally:
        poisoned.release()
        await client.close()


async def test_requests_cancelled_in_flight_leave_the_next_ones_answered(anvil, deployment) -> None:
    before = pool_threads()
    client = await RegistryClient.connect(anvil.rpc_url, deployment)
    try:
        for delay in (0, 0.001, 0.005, 0.02):
            calls = [asyncio.create_task(client.block_number()) for _ in range(20)]
            await asyncio.sleep(delay)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            assert await asyncio.wait_for(client.block_number(), ANSWER_S) >= 1
        other = await RegistryClient.connect(anvil.rpc_url, deployment)  # another client of the process too
        assert await asyncio.wait_for(other.block_number(), ANSWER_S) >= 1
        await other.close()
    finally:
        await client.close()
    assert pool_threads() == before  # and no thread was started for a lock
