"""Shared setup of the chain tests: one client per party over one connection, fresh runs and nodes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest_asyncio
from eth_account.signers.local import LocalAccount

from prime.chain.client import RegistryClient
from prime.chain.types import Requirements


@dataclass
class Parties:
    reader: RegistryClient
    admin: RegistryClient
    validator: RegistryClient
    buyer: RegistryClient
    master: RegistryClient
    admin_account: LocalAccount
    validator_account: LocalAccount
    buyer_account: LocalAccount
    master_account: LocalAccount

    def as_(self, account: LocalAccount) -> RegistryClient:
        return self.reader.with_account(account)

    async def new_run(self, req: Requirements | None = None, masters: list | None = None, uri: str = "http://127.0.0.1:8090") -> int:
        return await self.buyer.create_run(req or Requirements(), uri, [self.master_account] if masters is None else masters)


@pytest_asyncio.fixture(loop_scope="session")
async def parties(anvil, deployment, chain_client) -> Parties:
    reader = await chain_client(None)
    admin, validator, buyer, master = anvil.accounts[:4]
    return Parties(
        reader=reader,
        admin=reader.with_account(admin),
        validator=reader.with_account(validator),
        buyer=reader.with_account(buyer),
        master=reader.with_account(master),
        admin_account=admin,
        validator_account=validator,
        buyer_account=buyer,
        master_account=master,
    )
