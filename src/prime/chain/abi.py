"""The registry's ABI: loading the committed artifact, decoding custom-error reverts and event logs.

Pure decoding (no RPC calls): ``decode_revert`` turns a revert's data into one sentence,
``decode_log`` turns a raw log into a ``ChainEvent``.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any, cast

from eth_abi import decode as abi_decode
from eth_typing import ABI, ABIEvent
from eth_utils import abi_to_signature, event_abi_to_log_topic, get_abi_input_types, keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3._utils.events import get_event_data
from web3.exceptions import ContractLogicError, Web3RPCError

from prime.chain.types import (
    ChainEvent,
    NodeStatus,
    requirement_name,
)
from prime.errors import ChainError, PrimeError

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
        "has left or been ejected or rejected (or its run has ended) and its stake was withdrawn."
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
    "CannotLeave": lambda node, st: (
        f"Node {node} cannot leave in status {_status(st)}; only registered, approved or active nodes can"
        + (" (its run has ended, so the stake is withdrawable already)." if st == NodeStatus.RELEASED else ".")
    ),
    "NodeNotActive": lambda node, st: f"Node {node} is not active in the run (status {_status(st)}).",
    "StakeLocked": lambda node, st: f"The stake of node {node} is locked while it is {_status(st)}; leave the run first.",
    "NothingToWithdraw": lambda node: f"Node {node} has no stake left to withdraw.",
    "SlashExceedsStake": lambda node, amount, stake: f"Cannot slash {amount} wei from node {node}: its stake is {stake} wei and the amount must be between 1 and the stake.",
    "TransferFailed": lambda to, amount: f"Paying {amount} wei to {to} failed; that address does not accept ETH.",
    "NotRevalidatable": lambda node, st: (
        f"Node {node} cannot be reported for a failed re-validation in status {_status(st)}; only approved or active nodes can."
    ),
    "MissingEvidence": lambda node: f"A re-validation failure of node {node} needs the failed report's hash as evidence, not zero.",
    "PenaltyTooHigh": lambda bps, max_bps: f"A penalty of {bps} basis points is more than the whole stake; give 0 to {max_bps}.",
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


