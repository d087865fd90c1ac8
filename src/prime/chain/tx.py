"""Sending transactions: one lock per account (nonces never reused in one process), gas estimated
first (reverts surface before anything is signed), receipts awaited, failures as one sentence."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception, Web3RPCError
from web3.types import TxParams, Wei

from prime.chain.abi import RevertError, _revert_data, _rpc_message, decode_revert, revert_error_name
from prime.chain.connection import _CONNECTION_ERRORS, unreachable
from prime.chain.types import (
    ChainEvent,
)
from prime.errors import ChainError

# ------------------------------------------------------------------- transactions


@dataclass(frozen=True)
class TxResult:
    """A mined, successful transaction and the registry events it emitted."""

    tx_hash: str
    block: int
    gas_used: int
    events: list[ChainEvent] = field(default_factory=list)

    def event(self, name: str) -> ChainEvent:
        for ev in self.events:
            if ev.name == name:
                return ev
        raise ChainError(f"Transaction {self.tx_hash} emitted no {name} event.")


# Per-process, per-account send locks: every client in this process that sends from the same
# account takes the same lock, so nonces are taken and used one at a time.
_SEND_LOCKS: dict[tuple[int, str], asyncio.Lock] = {}


def _send_lock(address: str) -> asyncio.Lock:
    key = (id(asyncio.get_running_loop()), address)
    lock = _SEND_LOCKS.get(key)
    if lock is None:
        lock = _SEND_LOCKS[key] = asyncio.Lock()
    return lock


_NONCE_RACE = ("nonce too low", "already known", "replacement transaction underpriced", "nonce has already been used")


class TxSender:
    """Signs and sends transactions for one account, estimating gas and decoding reverts."""

    def __init__(self, w3: AsyncWeb3, rpc_url: str, chain_id: int, account: LocalAccount, *, receipt_timeout_s: float = 120.0) -> None:
        self.w3 = w3
        self.rpc_url = rpc_url
        self.chain_id = chain_id
        self.account = account
        self.receipt_timeout_s = receipt_timeout_s

    async def send(self, *, to: str | None, data: bytes | str, value: int = 0, what: str = "transaction") -> dict:
        """Send and wait for the receipt; ChainError (RevertError for reverts) on failure."""
        tx: TxParams = {"from": self.account.address, "data": HexBytes(data), "value": Wei(value), "chainId": self.chain_id}
        if to is not None:
            tx["to"] = to
        async with rpc_errors(self.rpc_url):
            async with _send_lock(self.account.address):
                tx_hash = await self._sign_and_send(tx, what)
            try:
                receipt = await self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.receipt_timeout_s, poll_latency=0.05)
            except TimeExhausted:
                raise ChainError(
                    f"The {what} {tx_hash.to_0x_hex()} was not mined within {self.receipt_timeout_s:.0f} s; "
                    "check that the chain is producing blocks and retry."
                ) from None
            if receipt["status"] != 1:
                await self._raise_mined_revert(tx, receipt, what)
        return dict(receipt)

    async def _sign_and_send(self, tx: TxParams, what: str) -> HexBytes:
        # Estimating first turns a revert into a decoded error before anything is signed or spent.
        try:
            gas = await self.w3.eth.estimate_gas(tx)
        except ContractLogicError as exc:
            raise _revert_error(exc, what) from None
        except Web3RPCError as exc:
            raise _rpc_error(exc, self.account.address, what) from None
        tx["gas"] = int(gas * 1.2) + 10_000
        tx.update(await self._fees())
        for attempt in range(3):
            tx["nonce"] = await self.w3.eth.get_transaction_count(self.account.address, "pending")
            unsigned: dict[str, Any] = {k: v for k, v in tx.items() if k != "from"}
            signed = self.account.sign_transaction(unsigned)
            try:
                return await self.w3.eth.send_raw_transaction(signed.raw_transaction)
            except Web3RPCError as exc:
                message = _rpc_message(exc).lower()
                if attempt < 2 and any(m in message for m in _NONCE_RACE):
                    # Another process sent from this account meanwhile: take the next nonce.
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                raise _rpc_error(exc, self.account.address, what) from None
        raise AssertionError("unreachable")

    async def _fees(self) -> TxParams:
        block = await self.w3.eth.get_block("latest")
        base_fee = block.get("baseFeePerGas")
        if base_fee is None:  # a pre-London chain: legacy gas price
            return {"gasPrice": await self.w3.eth.gas_price}
        priority = await self.w3.eth.max_priority_fee
        # Twice the base fee survives several full blocks of base-fee increases.
        return {"type": 2, "maxPriorityFeePerGas": priority, "maxFeePerGas": Wei(2 * base_fee + priority)}

    async def _raise_mined_revert(self, tx: TxParams, receipt: Any, what: str) -> None:
        # The estimate passed but the mined transaction reverted: the state changed in between
        # (typically another transaction in the same or an earlier block). Replaying it as a call
        # on the state after its block recovers the reason in that common case.
        tx_hash = receipt["transactionHash"].to_0x_hex()
        if int(receipt["gasUsed"]) >= int(tx["gas"]):
            raise ChainError(f"The {what} {tx_hash} ran out of gas ({tx['gas']}) on chain; retry it.")
        call: TxParams = {"from": tx["from"], "data": tx["data"], "value": tx["value"]}  # always set by send()
        if "to" in tx:
            call["to"] = tx["to"]
        try:
            await self.w3.eth.call(call, block_identifier=receipt["blockNumber"])
        except ContractLogicError as exc:
            raise _revert_error(exc, what) from None
        except Web3Exception:
            pass
        raise ChainError(f"The {what} {tx_hash} reverted on chain and the reason could not be recovered.")


def _revert_error(exc: ContractLogicError, what: str) -> RevertError:
    data = _revert_data(exc)
    if data is not None:
        return RevertError(decode_revert(data), revert_error_name(data), data)
    reason = (exc.message or "execution reverted").removeprefix("execution reverted").strip(": ")
    if reason:
        return RevertError(f"The {what} was rejected: {reason}.")
    return RevertError(f"The {what} was rejected by the registry without a reason.")


def _rpc_error(exc: Web3RPCError, sender: str, what: str) -> ChainError:
    message = _rpc_message(exc)
    if "insufficient funds" in message.lower():
        return ChainError(f"Account {sender} does not have enough ETH to pay for the {what} (value plus gas); fund it and retry.")
    return ChainError(f"The chain refused the {what}: {message.rstrip('.')}.")


@contextlib.asynccontextmanager
async def rpc_errors(rpc_url: str) -> AsyncIterator[None]:
    """Turn connection failures into ChainError naming the RPC URL."""
    try:
        yield
    except _CONNECTION_ERRORS:
        raise unreachable(rpc_url) from None


