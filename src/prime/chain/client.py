"""RegistryClient: typed async access to the PrimeRegistry contract over web3 v8.

One client = one RPC connection + one registry address + optionally one sending account.
Transactions are serialized per account under an asyncio lock (nonce from the node's pending
count, taken and used while the lock is held, so concurrent senders in one process never reuse
a nonce); gas is estimated first, which also surfaces reverts before anything is signed. Every
failure reaches the caller as ``ChainError`` with one sentence: custom errors of the contract
are decoded from the ABI, an unreachable RPC names its URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, cast

import aiohttp
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_typing import ABI, ABIEvent, ChecksumAddress
from eth_utils import abi_to_signature, event_abi_to_log_topic, get_abi_input_types, keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3._utils.events import get_event_data
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception, Web3RPCError
from web3.providers.rpc import AsyncHTTPProvider
from web3.providers.rpc.utils import ExceptionRetryConfiguration
from web3.types import BlockIdentifier, FilterParams, TxParams, Wei

from prime.chain.types import (
    ChainEvent,
    NodeInfo,
    NodeStatus,
    Requirements,
    RunInfo,
    Specs,
    requirement_name,
)
from prime.errors import ChainError, PrimeError
from prime.protocol.invite import invite_digest  # the digest a master signs; defined with the invite

CONTRACT_NAME = "PrimeRegistry"
VALIDATOR_ROLE = keccak(text="VALIDATOR_ROLE")
ADMIN_ROLE = b"\x00" * 32
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"


# --------------------------------------------------------------------------- artifacts


@cache
def load_artifact(name: str = CONTRACT_NAME) -> dict[str, Any]:
    """The committed ABI + bytecode of a contract (``src/prime/chain/artifacts/<name>.json``)."""
    text = resources.files("prime.chain").joinpath("artifacts", f"{name}.json").read_text("utf-8")
    artifact: dict[str, Any] = json.loads(text)
    return artifact


def registry_abi() -> ABI:
    # The artifact's "abi" is solc's ABI JSON, the shape eth_typing's ABI TypedDicts describe;
    # json.loads can only call it Any, so it is cast (test_artifacts checks the committed file).
    return cast(ABI, load_artifact(CONTRACT_NAME)["abi"])


# ------------------------------------------------------------------- signing helpers


def registration_digest(chain_id: int, registry: str, provider: str, node: str, run_id: int) -> bytes:
    """keccak256(abi.encode(chainId, registry, provider, node, runId)): what the node key signs to register."""
    return keccak(
        abi_encode(
            ["uint256", "address", "address", "address", "uint256"],
            [chain_id, to_checksum_address(registry), to_checksum_address(provider), to_checksum_address(node), run_id],
        )
    )


def sign_digest(account: LocalAccount, digest: bytes) -> bytes:
    """EIP-191 personal signature over the 32 bytes of ``digest`` (65 bytes r||s||v)."""
    if len(digest) != 32:
        raise ValueError("sign_digest signs exactly 32 bytes (a keccak digest).")
    return bytes(account.sign_message(encode_defunct(primitive=digest)).signature)


def recover_digest_signer(digest: bytes, signature: bytes) -> str:
    """The checksum address that EIP-191-signed ``digest`` (as the contract recovers it)."""
    return Account.recover_message(encode_defunct(primitive=digest), signature=signature)


# ------------------------------------------------------------------- revert decoding

_STATUS = {s.value: s.label for s in NodeStatus}


def _role_name(role: bytes) -> str:
    if role == ADMIN_ROLE:
        return "admin"
    if role == VALIDATOR_ROLE:
        return "validator"
    return "0x" + role.hex()


def _status(value: int) -> str:
    return _STATUS.get(value, str(value))


# Custom error name -> sentence built from its decoded arguments (in ABI order).
_ERROR_SENTENCES: dict[str, Any] = {
    "ZeroAddress": lambda: "The zero address is not allowed here; pass a real account address.",
    "RunNotFound": lambda run: f"Run {run} does not exist on this registry; check the run id.",
    "NotRunOwner": lambda run, caller: f"Only the owner of run {run} can do this, and {caller} is not its owner.",
    "RunHasEnded": lambda run: f"Run {run} has ended, so it accepts no more changes, registrations or joins.",
    "AlreadyMaster": lambda run, a: f"{a} is already a master of run {run}.",
    "NotMaster": lambda run, a: f"{a} is not a master of run {run}.",
    "StakeTooLow": lambda sent, minimum: f"The stake of {sent} wei is below the registry's minimum of {minimum} wei; send at least the minimum.",
    "NodeAlreadyRegistered": lambda node, st: (
        f"Node {node} is already registered (status {_status(st)}); it can register again only after it "
        "has left or been ejected or rejected and its stake was withdrawn."
    ),
    "InvalidNodeSignature": lambda node, signer: (
        f"The node signature does not come from node {node} (it recovers to {signer}); "
        "sign the registration digest with the node's own key."
    ),
    "NotNodeOperator": lambda node, caller: f"{caller} is neither node {node} nor its provider (or the node is not registered), so it cannot act for it.",
    "NotAwaitingValidation": lambda node, st: f"Node {node} is not awaiting validation (status {_status(st)}); only registered nodes can be approved or rejected.",
    "AlreadyJoined": lambda node, run: f"Node {node} has already joined run {run}.",
    "NodeNotApproved": lambda node, st: f"Node {node} is not approved by a validator (status {_status(st)}); wait for validation before joining.",
    "NodeNotInRun": lambda node, run: f"Node {node} is not registered for run {run}.",
    "InviteExpired": lambda expiry, now: f"The invite expired at {expiry} (chain time is {now}); ask the master for a new invite.",
    "InviteNotFromMaster": lambda run, node, signer: (
        f"The invite for node {node} is not signed by a master of run {run} (it recovers to {signer}); "
        "ask a master of this run for an invite for this node."
    ),
    "RequirementsNotMet": lambda node, req: f"Node {node} does not meet the run's {requirement_name(req)} requirement, so it cannot join.",
    "RunFull": lambda run, max_nodes: f"Run {run} already has its maximum of {max_nodes} active node(s).",
    "CannotLeave": lambda node, st: f"Node {node} cannot leave in status {_status(st)}; only registered, approved or active nodes can.",
    "NodeNotActive": lambda node, st: f"Node {node} is not active in the run (status {_status(st)}).",
    "StakeLocked": lambda node, st: f"The stake of node {node} is locked while it is {_status(st)}; leave the run first.",
    "NothingToWithdraw": lambda node: f"Node {node} has no stake left to withdraw.",
    "SlashExceedsStake": lambda node, amount, stake: f"Cannot slash {amount} wei from node {node}: its stake is {stake} wei and the amount must be between 1 and the stake.",
    "TransferFailed": lambda to, amount: f"Paying {amount} wei to {to} failed; that address does not accept ETH.",
    "AccessControlUnauthorizedAccount": lambda account, role: f"Account {account} does not have the {_role_name(role)} role needed for this.",
    "AccessControlBadConfirmation": lambda: "An account can only renounce a role for itself.",
    "ReentrancyGuardReentrantCall": lambda: "Reentrant call refused.",
}

_PANIC = {
    0x01: "an assertion failed",
    0x11: "an arithmetic overflow or underflow",
    0x12: "a division by zero",
    0x21: "an invalid enum value",
    0x32: "an out-of-bounds array access",
    0x41: "it ran out of memory",
}


@cache
def _error_table() -> dict[bytes, tuple[str, list[str]]]:
    table: dict[bytes, tuple[str, list[str]]] = {}
    for item in registry_abi():
        if item["type"] == "error":
            selector = keccak(text=abi_to_signature(item))[:4]
            table[selector] = (item["name"], get_abi_input_types(item))
    return table


def decode_revert(data: bytes | str | None) -> str:
    """One sentence for the revert data of a registry call (custom error, Error(string) or Panic)."""
    if isinstance(data, str):
        data = HexBytes(data) if data.startswith("0x") else None
    if not data or len(data) < 4:
        return "The registry rejected the call without giving a reason."
    selector, body = bytes(data[:4]), bytes(data[4:])
    try:
        if selector == keccak(text="Error(string)")[:4]:
            (reason,) = abi_decode(["string"], body)
            return f"The registry rejected the call: {reason}."
        if selector == keccak(text="Panic(uint256)")[:4]:
            (code,) = abi_decode(["uint256"], body)
            return f"The registry call failed because {_PANIC.get(code, f'of panic code {code:#x}')}."
        entry = _error_table().get(selector)
        if entry is None:
            return f"The registry rejected the call with an unknown error 0x{selector.hex()}."
        name, types = entry
        args = [to_checksum_address(a) if t == "address" else a for a, t in zip(abi_decode(types, body), types, strict=True)]
    except Exception:  # malformed revert data: still one sentence
        return f"The registry rejected the call with undecodable error data 0x{bytes(data).hex()}."
    sentence = _ERROR_SENTENCES.get(name)
    if sentence is None:
        return f"The registry rejected the call: {name}({', '.join(map(str, args))})."
    return sentence(*args)


def revert_error_name(data: bytes | str | None) -> str | None:
    """The custom error's name for revert data, or None (for callers that branch on the kind)."""
    if isinstance(data, str):
        data = HexBytes(data) if data.startswith("0x") else None
    if not data or len(data) < 4:
        return None
    entry = _error_table().get(bytes(data[:4]))
    return entry[0] if entry else None


class RevertError(ChainError):
    """A registry call reverted; ``error_name`` is the contract's custom error (None if unknown)."""

    def __init__(self, message: str, error_name: str | None = None, data: bytes | None = None) -> None:
        super().__init__(message)
        self.error_name = error_name
        self.data = data


def _revert_data(exc: ContractLogicError) -> bytes | None:
    data = exc.data
    if isinstance(data, dict):  # some nodes nest it: {"data": "0x..."} or {"message": ..., "data": ...}
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        return bytes(HexBytes(data))
    return None


def _rpc_message(exc: Web3RPCError) -> str:
    response = exc.rpc_response or {}
    error = response.get("error") if isinstance(response, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(exc.message)


# ---------------------------------------------------------------------- connection

_CONNECTION_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def unreachable(rpc_url: str) -> ChainError:
    return ChainError(
        f"Cannot reach the chain RPC at {rpc_url}; start the node (for a local chain: `prime chain anvil`) "
        "or pass the right --rpc-url / PRIME_RPC_URL."
    )


def make_web3(rpc_url: str, *, timeout_s: float = 30.0) -> AsyncWeb3:
    """An AsyncWeb3 over HTTP with a request timeout and a short retry on connection errors only."""
    provider = AsyncHTTPProvider(
        rpc_url,
        request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_s)},
        exception_retry_configuration=ExceptionRetryConfiguration(
            errors=(aiohttp.ClientError, asyncio.TimeoutError), retries=2, backoff_factor=0.1
        ),
        # web3's validation middleware asks for the chain id before every eth_call; an endpoint's
        # chain id never changes, so only that (and net_version) is cached, never state reads.
        cache_allowed_requests=True,
        cacheable_requests={"eth_chainId", "net_version"},
    )
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


# ------------------------------------------------------------------------- events


@cache
def _event_table() -> dict[bytes, ABIEvent]:
    return {bytes(event_abi_to_log_topic(item)): item for item in registry_abi() if item["type"] == "event"}


def event_topic(name: str) -> bytes:
    for topic, item in _event_table().items():
        if item["name"] == name:
            return topic
    raise PrimeError(f"The registry has no event named {name!r}.")


def decode_log(w3: AsyncWeb3, log: Any) -> ChainEvent | None:
    """A registry log as a ChainEvent (None for a log of an event the registry does not declare)."""
    topics = log.get("topics") or []
    if not topics:
        return None
    item = _event_table().get(bytes(topics[0]))
    if item is None:
        return None
    data = get_event_data(w3.codec, item, log)
    args = {k: (bytes(v) if isinstance(v, (bytes, bytearray)) else v) for k, v in dict(data["args"]).items()}
    tx_hash = data["transactionHash"]
    return ChainEvent(
        name=item["name"],
        args=args,
        block=int(data["blockNumber"]),
        tx_hash=tx_hash.to_0x_hex() if hasattr(tx_hash, "to_0x_hex") else str(tx_hash),
        log_index=int(data["logIndex"]),
    )


# ------------------------------------------------------------------------- client


class RegistryClient:
    """Typed async access to one deployed PrimeRegistry.

    ``client = await RegistryClient.connect(rpc_url, deployment, account)``; without an account
    the client can only read. ``client.with_account(other)`` shares the connection.
    """

    def __init__(self, w3: AsyncWeb3, rpc_url: str, deployment: Any, chain_id: int, account: LocalAccount | None, *, receipt_timeout_s: float = 120.0, owns_connection: bool = True) -> None:
        self.w3 = w3
        self.rpc_url = rpc_url
        self.deployment = deployment
        self.chain_id = chain_id
        self.address = to_checksum_address(deployment.registry)
        self.account = account
        self.receipt_timeout_s = receipt_timeout_s
        self.contract = w3.eth.contract(address=self.address, abi=registry_abi())
        self._owns_connection = owns_connection
        self._sender = TxSender(w3, rpc_url, chain_id, account, receipt_timeout_s=receipt_timeout_s) if account else None

    # -- lifecycle

    @classmethod
    async def connect(cls, rpc_url: str, deployment: Any, account: LocalAccount | None = None, *, timeout_s: float = 30.0, receipt_timeout_s: float = 120.0) -> RegistryClient:
        """Connect and check the chain: reachable, the deployment's chain id, registry code present.

        ``deployment`` is a ``Deployment`` or the path of a deployment file.
        """
        from prime.chain.deploy import Deployment

        if not isinstance(deployment, Deployment):
            deployment = Deployment.load(deployment)
        w3 = make_web3(rpc_url, timeout_s=timeout_s)
        try:
            async with rpc_errors(rpc_url):
                try:
                    chain_id = await w3.eth.chain_id
                except (Web3Exception, ValueError) as exc:
                    raise ChainError(f"The RPC at {rpc_url} did not answer like an Ethereum node ({exc}); check --rpc-url.") from None
                if chain_id != deployment.chain_id:
                    raise ChainError(
                        f"The RPC at {rpc_url} serves chain {chain_id} but the deployment is for chain "
                        f"{deployment.chain_id}; pass the matching --rpc-url or deployment file."
                    )
                code = await w3.eth.get_code(to_checksum_address(deployment.registry))
                if len(code) == 0:
                    raise ChainError(
                        f"There is no registry contract at {deployment.registry} on chain {chain_id}; deploy it with "
                        "`prime chain deploy` or pass the right deployment file."
                    )
        except BaseException:
            await close_web3(w3)
            raise
        return cls(w3, rpc_url, deployment, chain_id, account, receipt_timeout_s=receipt_timeout_s)

    def with_account(self, account: LocalAccount | None) -> RegistryClient:
        """A client for another account over the same connection (closing it leaves this one open)."""
        return RegistryClient(self.w3, self.rpc_url, self.deployment, self.chain_id, account, receipt_timeout_s=self.receipt_timeout_s, owns_connection=False)

    async def close(self) -> None:
        if self._owns_connection:
            await close_web3(self.w3)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing

    async def _transact(self, fn_name: str, args: Sequence[Any], *, value: int = 0) -> TxResult:
        if self._sender is None:
            raise ChainError(f"Cannot call {fn_name}: this registry client has no account to send transactions; give it a key.")
        data = self.contract.encode_abi(fn_name, args=list(args))
        receipt = await self._sender.send(to=self.address, data=data, value=value, what=f"{fn_name} transaction")
        return self._result(receipt)

    def _result(self, receipt: dict) -> TxResult:
        events = []
        for log in receipt.get("logs", []):
            if to_checksum_address(log["address"]) == self.address:
                decoded = decode_log(self.w3, log)
                if decoded is not None:
                    events.append(decoded)
        return TxResult(
            tx_hash=receipt["transactionHash"].to_0x_hex(),
            block=int(receipt["blockNumber"]),
            gas_used=int(receipt["gasUsed"]),
            events=events,
        )

    async def _call(self, fn_name: str, *args: Any) -> Any:
        async with rpc_errors(self.rpc_url):
            try:
                return await self.contract.functions[fn_name](*args).call()
            except ContractLogicError as exc:
                raise _revert_error(exc, f"{fn_name} call") from None
            except Web3RPCError as exc:
                raise ChainError(f"The {fn_name} call failed: {_rpc_message(exc).rstrip('.')}.") from None

    def _require_account(self, what: str) -> LocalAccount:
        if self.account is None:
            raise ChainError(f"Cannot {what}: this registry client has no account; give it a key.")
        return self.account

    # -- runs

    async def create_run(self, req: Requirements, discovery_uri: str, masters: Sequence[str | LocalAccount]) -> int:
        """Create a run owned by this client's account; returns the new run id."""
        result = await self._transact("createRun", [req.as_tuple(), discovery_uri, [to_address(m) for m in masters]])
        return int(result.event("RunCreated").args["runId"])

    async def create_run_tx(self, req: Requirements, discovery_uri: str, masters: Sequence[str | LocalAccount]) -> TxResult:
        """``create_run`` returning the whole transaction result (the run id is in its RunCreated event)."""
        return await self._transact("createRun", [req.as_tuple(), discovery_uri, [to_address(m) for m in masters]])

    async def add_master(self, run_id: int, master: str | LocalAccount) -> TxResult:
        return await self._transact("addMaster", [run_id, to_address(master)])

    async def remove_master(self, run_id: int, master: str | LocalAccount) -> TxResult:
        return await self._transact("removeMaster", [run_id, to_address(master)])

    async def end_run(self, run_id: int) -> TxResult:
        return await self._transact("endRun", [run_id])

    # -- nodes

    def registration_digest(self, provider: str | LocalAccount, node: str | LocalAccount, run_id: int) -> bytes:
        return registration_digest(self.chain_id, self.address, to_address(provider), to_address(node), run_id)

    def invite_digest(self, run_id: int, node: str | LocalAccount, expiry: int) -> bytes:
        return invite_digest(self.chain_id, self.address, run_id, to_address(node), expiry)

    def sign_registration(self, node_account: LocalAccount, provider: str | LocalAccount, run_id: int) -> bytes:
        """The node key's signature that lets ``provider`` register it for ``run_id``."""
        return sign_digest(node_account, self.registration_digest(provider, node_account, run_id))

    def sign_invite(self, master_account: LocalAccount, run_id: int, node: str | LocalAccount, expiry: int) -> bytes:
        """A master's invite for ``node`` to join ``run_id`` until ``expiry`` (unix seconds)."""
        return sign_digest(master_account, self.invite_digest(run_id, node, expiry))

    async def register_node(self, run_id: int, node: str | LocalAccount, specs: Specs, *, node_sig: bytes | None = None, stake_wei: int | None = None) -> TxResult:
        """Register ``node`` for ``run_id``, paid by this client's account (the provider).

        With a node account and no ``node_sig`` the signature is made here; with a bare address
        the node's signature must be given. ``stake_wei`` defaults to the registry's minimum.
        """
        provider = self._require_account("register a node")
        node_address = to_address(node)
        if node_sig is None:
            if not isinstance(node, LocalAccount):
                raise PrimeError("Registering a node by address needs the node's signature (node_sig); pass the node's account or its signature.")
            node_sig = self.sign_registration(node, provider, run_id)
        if stake_wei is None:
            stake_wei = await self.min_stake()
        return await self._transact("registerNode", [run_id, node_address, specs.as_tuple(), bytes(node_sig)], value=stake_wei)

    async def report_validation(self, node: str | LocalAccount, approved: bool, report_hash: bytes | str) -> TxResult:
        return await self._transact("reportValidation", [to_address(node), bool(approved), _to_bytes32(report_hash)])

    async def join_run(self, run_id: int, node: str | LocalAccount, expiry: int, master_sig: bytes) -> TxResult:
        return await self._transact("joinRun", [run_id, to_address(node), int(expiry), bytes(master_sig)])

    async def leave_run(self, node: str | LocalAccount) -> TxResult:
        return await self._transact("leaveRun", [to_address(node)])

    async def eject_node(self, run_id: int, node: str | LocalAccount) -> TxResult:
        return await self._transact("ejectNode", [run_id, to_address(node)])

    async def withdraw_stake(self, node: str | LocalAccount) -> TxResult:
        return await self._transact("withdrawStake", [to_address(node)])

    # -- admin

    async def slash(self, node: str | LocalAccount, amount: int) -> TxResult:
        return await self._transact("slash", [to_address(node), int(amount)])

    async def set_min_stake(self, min_stake_wei: int) -> TxResult:
        return await self._transact("setMinStake", [int(min_stake_wei)])

    async def grant_validator(self, account: str | LocalAccount) -> TxResult:
        return await self._transact("grantRole", [VALIDATOR_ROLE, to_address(account)])

    async def revoke_validator(self, account: str | LocalAccount) -> TxResult:
        return await self._transact("revokeRole", [VALIDATOR_ROLE, to_address(account)])

    # -- views

    async def get_run(self, run_id: int) -> RunInfo:
        owner, ended, node_count, req, discovery_uri, masters = await self._call("getRun", run_id)
        return RunInfo(
            run_id=run_id,
            owner=to_checksum_address(owner),
            requirements=Requirements.from_tuple(req),
            discovery_uri=discovery_uri,
            masters=[to_checksum_address(m) for m in masters],
            ended=bool(ended),
            node_count=int(node_count),
        )

    async def get_node(self, node: str | LocalAccount) -> NodeInfo:
        address = to_address(node)
        provider, run_id, status, stake, specs, report_hash = await self._call("getNode", address)
        return NodeInfo(
            node=address,
            provider=to_checksum_address(provider),
            run_id=int(run_id),
            specs=Specs.from_tuple(specs),
            stake=int(stake),
            status=NodeStatus(status),
            report_hash=bytes(report_hash),
        )

    async def is_master(self, run_id: int, account: str | LocalAccount) -> bool:
        return bool(await self._call("isMaster", run_id, to_address(account)))

    async def node_status(self, node: str | LocalAccount) -> NodeStatus:
        return NodeStatus(await self._call("nodeStatus", to_address(node)))

    async def is_validator(self, account: str | LocalAccount) -> bool:
        return bool(await self._call("hasRole", VALIDATOR_ROLE, to_address(account)))

    async def is_admin(self, account: str | LocalAccount) -> bool:
        return bool(await self._call("hasRole", ADMIN_ROLE, to_address(account)))

    async def min_stake(self) -> int:
        return int(await self._call("minStake"))

    async def run_count(self) -> int:
        """Runs created so far; run ids are 1..run_count()."""
        return int(await self._call("runCount"))

    async def block_number(self) -> int:
        async with rpc_errors(self.rpc_url):
            return int(await self.w3.eth.block_number)

    async def block_timestamp(self, block: BlockIdentifier = "latest") -> int:
        async with rpc_errors(self.rpc_url):
            return int((await self.w3.eth.get_block(block))["timestamp"])

    async def balance(self, account: str | LocalAccount) -> int:
        async with rpc_errors(self.rpc_url):
            return int(await self.w3.eth.get_balance(to_address(account)))

    async def get_logs(self, from_block: int, to_block: int, event_names: Sequence[str] | None = None) -> list[ChainEvent]:
        """Registry events in [from_block, to_block], ordered by (block, log_index)."""
        params: FilterParams = {"address": self.address, "fromBlock": from_block, "toBlock": to_block}
        if event_names:
            params["topics"] = [[HexBytes(event_topic(n)) for n in event_names]]
        async with rpc_errors(self.rpc_url):
            try:
                logs = await self.w3.eth.get_logs(params)
            except Web3RPCError as exc:
                raise ChainError(f"Reading registry events for blocks {from_block}-{to_block} failed: {_rpc_message(exc).rstrip('.')}.") from None
        events = [e for e in (decode_log(self.w3, log) for log in logs) if e is not None]
        return sorted(events, key=lambda e: e.position)
