"""A test's own anvil that it may stall (SIGSTOP: it accepts connections and never answers).

The session's shared anvil is never stopped: ``own_chain`` starts another one with the registry
deployed (validator role to accounts[1]); ``stalled(chain)`` SIGSTOPs it and always SIGCONTs it
on the way out, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from prime.chain.anvil import AnvilProcess, start_anvil
from prime.chain.client import RegistryClient
from prime.chain.deploy import deploy_registry
from tests.fixtures.chain import MIN_STAKE_WEI


@contextlib.asynccontextmanager
async def own_chain(directory: Path) -> AsyncIterator[tuple[AnvilProcess, Any]]:
    """A fresh anvil and its deployment (saved under ``directory``), stopped on the way out."""
    chain = start_anvil(None, log_path=directory / "anvil.log")
    try:
        deployed = await deploy_registry(chain.rpc_url, chain.accounts[0], min_stake_wei=MIN_STAKE_WEI)
        async with await RegistryClient.connect(chain.rpc_url, deployed, chain.accounts[0]) as admin:
            await admin.grant_validator(chain.accounts[1])
        yield chain, deployed.save(directory / "deployment.json")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(chain.process.pid, signal.SIGCONT)
        chain.stop()


@contextlib.contextmanager
def stalled(chain: AnvilProcess) -> Iterator[None]:
    """The chain stopped (SIGSTOP) inside the block, continued (SIGCONT) after it, whatever happens."""
    os.kill(chain.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(chain.process.pid, signal.SIGCONT)
