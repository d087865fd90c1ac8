"""A starting miner waits for the chain RPC: one visible line, retries with backoff, a reminder a minute."""

from __future__ import annotations

import asyncio

import pytest

from prime.chain.connection import unreachable
from prime.errors import ChainError
from prime.roles.miner.chainwait import until_chain_answers


async def test_waits_through_failures_and_stalls_then_answers() -> None:
    lines: list[str] = []
    outcomes: list[str] = ["refused", "stall", "refused", "ok"]

    async def call() -> int:
        outcome = outcomes.pop(0)
        if outcome == "refused":
            raise unreachable("http://127.0.0.1:1")
        if outcome == "stall":
            await asyncio.sleep(3600)
        return 42

    result = await until_chain_answers(call, rpc_url="http://127.0.0.1:1", say=lines.append,
                                       attempt_timeout_s=0.05, first_delay_s=0.01, max_delay_s=0.02)
    assert result == 42
    assert len(lines) == 2
    assert lines[0].startswith("The chain RPC at http://127.0.0.1:1 does not answer (connection failed); retrying")
    assert "Ctrl-C" in lines[0] and "answers again" in lines[1]


async def test_reminds_once_a_minute() -> None:
    lines: list[str] = []
    now = [0.0]
    attempts = [0]

    async def call() -> int:
        attempts[0] += 1
        now[0] += 20.0  # each attempt "takes" 20 s
        if attempts[0] < 8:
            raise TimeoutError
        return 1

    await until_chain_answers(call, rpc_url="http://rpc", say=lines.append, first_delay_s=0.0, max_delay_s=0.0,
                              clock=lambda: now[0])
    assert "no answer within 10 s" in lines[0]
    assert [line.startswith("Still waiting") for line in lines[1:-1]] == [True, True]
    assert lines[-1].startswith("The chain RPC at http://rpc answers again")


async def test_a_wrong_chain_is_not_waited_for() -> None:
    async def call() -> None:
        raise ChainError("The RPC at http://rpc serves chain 1 but the deployment is for chain 31337.")

    with pytest.raises(ChainError, match="serves chain 1"):
        await until_chain_answers(call, rpc_url="http://rpc", say=print)
