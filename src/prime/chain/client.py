"""RegistryClient: typed async access to the PrimeRegistry contract over web3 v8.

One client = one RPC connection + one registry address + optionally one sending account.
Transactions are serialized per account under an asyncio lock (nonce from the node's pending
count, taken and used while the lock is held, so concurrent senders in one process never reuse
a nonce); gas is estimated first, which also surfaces reverts before anything is signed. Every
failure reaches the caller as ``ChainError`` with one sentence: custom errors of the contract
are decoded from the ABI, an unreachable RPC names its URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncWeb3
from web3.exceptions import ContractLogicError, Web3RPCError
from web3.types import BlockIdentifier, FilterParams

from prime.chain.abi import (
    ADMIN_ROLE,
    CONTRACT_NAME,
    VALIDATOR_ROLE,
    ZERO_ADDRESS,
    RevertError,
    _rpc_message,
    decode_log,
    decode_revert,
    event_topic,
    load_artifact,
    registry_abi,
    revert_error_name,
)
from prime.chain.connection import _to_bytes32, close_web3, make_web3, read_chain_id, to_address, unreachable
from prime.chain.tx import TxResult, TxSender, _revert_error, rpc_errors
from prime.chain.types import (
    ChainEvent,
    NodeInfo,
    NodeStatus,
    Requirements,
    RunInfo,
    Specs,
)
from prime.errors import ChainError, PrimeError
from prime.protocol.invite import invite_digest  # the digest a master signs; defined with the invite

# What callers import from here (some names live in the modules split out of this one).
__all__ = [
    "ADMIN_ROLE", "CONTRACT_NAME", "VALIDATOR_ROLE", "ZERO_ADDRESS", "RegistryClient", "RevertError", "TxResult",
    "TxSender", "close_web3", "decode_log", "decode_revert", "event_topic", "invite_digest", "load_artifact",
    "make_web3", "recover_digest_signer", "registration_digest", "registry_abi", "revert_error_name", "rpc_errors",
    "sign_digest", "to_address", "unreachable",
]

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
                chain_id = await read_chain_id(w3, rpc_url)
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

    async def report_revalidation_failure(self, node: str | LocalAccount, report_hash: bytes | str) -> TxResult:
        """Validator only: ``node`` failed a re-challenge; ejects it and slashes the revalidation penalty."""
        return await self._transact("reportRevalidationFailure", [to_address(node), _to_bytes32(report_hash)])

    # -- admin

    async def slash(self, node: str | LocalAccount, amount: int) -> TxResult:
        return await self._transact("slash", [to_address(node), int(amount)])

    async def set_min_stake(self, min_stake_wei: int) -> TxResult:
        return await self._transact("setMinStake", [int(min_stake_wei)])

    async def set_revalidation_penalty_bps(self, penalty_bps: int) -> TxResult:
        """Admin only: the share of the stake (basis points, 0..10000) a failed re-validation slashes."""
        return await self._transact("setRevalidationPenaltyBps", [int(penalty_bps)])

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

    async def revalidation_penalty_bps(self) -> int:
        """The share of a node's stake, in basis points, that a failed re-validation slashes."""
        return int(await self._call("revalidationPenaltyBps"))

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

    async def get_logs(self, from_block: int, to_block: int, event_names: Sequence[str] | None = None, *,
                       run_id: int | None = None) -> list[ChainEvent]:
        """Registry events in [from_block, to_block], ordered by (block, log_index).

        ``run_id``: only events whose first indexed argument is that run id (the RPC filters them;
        give only names of events that index ``runId`` first: Run*, Master*, Node* but NodeSlashed).
        """
        params: FilterParams = {"address": self.address, "fromBlock": from_block, "toBlock": to_block}
        names = [HexBytes(event_topic(n)) for n in event_names] if event_names else None
        if run_id is not None:
            params["topics"] = [names, HexBytes(int(run_id).to_bytes(32, "big"))]
        elif names:
            params["topics"] = [names]
        async with rpc_errors(self.rpc_url):
            try:
                logs = await self.w3.eth.get_logs(params)
            except Web3RPCError as exc:
                raise ChainError(f"Reading registry events for blocks {from_block}-{to_block} failed: {_rpc_message(exc).rstrip('.')}.") from None
        events = [e for e in (decode_log(self.w3, log) for log in logs) if e is not None]
        return sorted(events, key=lambda e: e.position)
