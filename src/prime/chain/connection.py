"""The RPC connection: web3 over aiohttp with retries, and address helpers."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3._utils.http_session_manager import HTTPSessionManager
from web3.exceptions import Web3Exception
from web3.providers.rpc import AsyncHTTPProvider
from web3.providers.rpc.utils import ExceptionRetryConfiguration

from prime.errors import ChainError, PrimeError

# ---------------------------------------------------------------------- connection

_CONNECTION_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class ChainUnreachable(ChainError):
    """The RPC did not answer at all (refused, reset, timed out): worth waiting for, unlike a wrong chain."""


def unreachable(rpc_url: str) -> ChainError:
    return ChainUnreachable(
        f"Cannot reach the chain RPC at {rpc_url}; start the node (for a local chain: `prime chain anvil`) "
        "or pass the right --rpc-url / PRIME_RPC_URL."
    )


class LoopSessions(HTTPSessionManager):
    """web3's HTTP session cache, one aiohttp session per event loop, without web3's lock.

    web3 8 takes a process-wide ``threading.Lock`` (``HTTPSessionManager._lock``, a class
    attribute) on every request, through a thread pool. A request cancelled while it waits for
    that lock (a timeout, a shutdown) leaves it taken for good, and from then on every web3 HTTP
    call of the process hangs: web3.py issue #3867, still open. One event loop needs no thread
    lock here: nothing is awaited between looking a session up and storing a new one.
    """

    async def async_cache_and_return_session(self, endpoint_uri: Any, session: aiohttp.ClientSession | None = None,
                                             request_timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        key = f"{id(loop)}:{endpoint_uri}"
        cached = self.session_cache.get_cache_entry(key)
        if session is None and cached is not None and not cached.closed and cached._loop is loop:
            return cached
        if session is None:  # what web3 makes: a connection per request, closed ones cleaned up
            session = aiohttp.ClientSession(
                raise_for_status=True, connector=aiohttp.TCPConnector(force_close=True, enable_cleanup_closed=True))
        _, evicted = self.session_cache.cache(key, session)
        for old in [cached, *(evicted or {}).values()]:
            if old is not None and old is not session and not old.closed and old._loop is loop:
                loop.create_task(old.close())
        return session


def make_web3(rpc_url: str, *, timeout_s: float = 30.0) -> AsyncWeb3:
    """An AsyncWeb3 over HTTP with a request timeout and a short retry on connection errors only.

    A call that timed out is not retried: a stalled RPC (it accepts the connection and never
    answers) then ends a call after ``timeout_s``, not after three times that.
    """
    provider = AsyncHTTPProvider(
        rpc_url,
        request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)},
        exception_retry_configuration=ExceptionRetryConfiguration(
            errors=(aiohttp.ClientError,), retries=2, backoff_factor=0.1
        ),
        # web3's validation middleware asks for the chain id before every eth_call; an endpoint's
        # chain id never changes, so only that (and net_version) is cached, never state reads.
        cache_allowed_requests=True,
        cacheable_requests={"eth_chainId", "net_version"},
    )
    provider._request_session_manager = LoopSessions()  # no process-wide lock to deadlock on (see there)
    return AsyncWeb3(provider)


async def close_web3(w3: AsyncWeb3) -> None:
    with contextlib.suppress(Exception):
        await w3.provider.disconnect()


def to_address(value: str | LocalAccount | Any) -> ChecksumAddress:
    """A checksum address from an address string or an account; PrimeError on anything else."""
    raw = getattr(value, "address", value)
    try:
        return to_checksum_address(raw)
    except (ValueError, TypeError):
        raise PrimeError(f"{raw!r} is not an Ethereum address; pass a 0x-prefixed 40-hex-digit address.") from None


def _to_bytes32(value: bytes | str) -> bytes:
    raw = bytes(HexBytes(value)) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise PrimeError(f"A report hash must be exactly 32 bytes, got {len(raw)}.")
    return raw


async def read_chain_id(w3: AsyncWeb3, rpc_url: str) -> int:
    """The chain id the RPC reports; one sentence naming the URL when it is no Ethereum node."""
    try:
        return int(await w3.eth.chain_id)
    except (Web3Exception, ValueError) as exc:
        raise ChainError(f"The RPC at {rpc_url} did not answer like an Ethereum node ({exc}); check --rpc-url.") from None

