"""Deploying the registry and the deployment file that tells every role where it is."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from prime.chain.client import CONTRACT_NAME, TxSender, close_web3, load_artifact, make_web3, rpc_errors
from prime.chain.connection import read_chain_id
from prime.errors import ChainError, ConfigError


@dataclass(frozen=True)
class Deployment:
    """Where the registry lives: chain id, contract address, deployment block (where event
    followers start) and the RPC URL it was deployed through. ``path`` is the file it was
    saved to / loaded from (not part of the file's content)."""

    chain_id: int
    registry: str
    block: int
    rpc_url: str
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # One spelling of the address everywhere (raises ValueError for a non-address).
        object.__setattr__(self, "registry", to_checksum_address(self.registry))

    def to_json(self) -> dict:
        return {
            "chain_id": self.chain_id,
            "registry": self.registry,
            "block": self.block,
            "rpc_url": self.rpc_url,
            "contract": CONTRACT_NAME,
        }

    def save(self, path: str | os.PathLike) -> Deployment:
        """Write the file atomically (temp file + rename); returns the deployment with ``path`` set."""
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_json(), fh, indent=2)
                fh.write("\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Deployment(self.chain_id, self.registry, self.block, self.rpc_url, path=target)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Deployment:
        source = Path(path).expanduser()
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"Deployment file {source} does not exist; deploy with `prime chain deploy --out {source}` or pass the right --deployment.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"Cannot read deployment file {source} ({exc.__class__.__name__}); check its path and permissions.") from None
        except json.JSONDecodeError:
            raise ConfigError(f"Deployment file {source} is not valid JSON; write it again with `prime chain deploy`.") from None
        try:
            return cls(
                chain_id=int(data["chain_id"]),
                registry=to_checksum_address(data["registry"]),
                block=int(data["block"]),
                rpc_url=str(data.get("rpc_url", "")),
                path=source,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"Deployment file {source} lacks a valid {exc} field; write it again with `prime chain deploy`.") from None


async def deploy_registry(rpc_url: str, admin_account: LocalAccount, *, min_stake_wei: int, receipt_timeout_s: float = 120.0) -> Deployment:
    """Deploy PrimeRegistry with ``admin_account`` as deployer and admin; returns where it is."""
    if min_stake_wei < 0:
        raise ConfigError("The minimum stake cannot be negative; pass a number of wei >= 0.")
    artifact = load_artifact(CONTRACT_NAME)
    w3 = make_web3(rpc_url)
    try:
        async with rpc_errors(rpc_url):
            chain_id = await read_chain_id(w3, rpc_url)
        factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        data = factory.constructor(admin_account.address, int(min_stake_wei)).data_in_transaction
        sender = TxSender(w3, rpc_url, chain_id, admin_account, receipt_timeout_s=receipt_timeout_s)
        receipt = await sender.send(to=None, data=data, what="registry deployment")
        address = receipt.get("contractAddress")
        if not address:
            raise ChainError("The registry deployment was mined but created no contract; check the chain's logs.")
        return Deployment(chain_id=chain_id, registry=to_checksum_address(address), block=int(receipt["blockNumber"]), rpc_url=rpc_url)
    finally:
        await close_web3(w3)
