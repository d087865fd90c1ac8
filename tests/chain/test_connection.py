"""A closed chain client leaves nothing running: web3 8's session manager starts a thread pool of
its own (it takes its cache lock through it) that web3 never shuts down. Real anvil."""

from __future__ import annotations

import asyncio
import threading

from prime.chain.client import RegistryClient


def pool_threads() -> int:
    """Threads of unnamed thread pools (the event loop's own are named asyncio_N)."""
    return sum(1 for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor-"))


async def test_a_closed_client_leaves_no_thread_behind(anvil, deployment) -> None:
    before = pool_threads()
    clients = [await RegistryClient.connect(anvil.rpc_url, deployment) for _ in range(3)]
    for client in clients:
        assert await client.block_number() >= 1
    assert pool_threads() >= before + 3  # one pool each
    for client in clients:
        await client.close()
    for _ in range(100):  # a shut-down pool's idle thread ends at its next look at the queue
        if pool_threads() == before:
            break
        await asyncio.sleep(0.05)
    assert pool_threads() == before
