"""Accounts for the auth tests (servers: the shared ``serve`` fixture, tests/fixtures/servers.py)."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount


@pytest.fixture
def alice() -> LocalAccount:
    return Account.create()


@pytest.fixture
def mallory() -> LocalAccount:
    return Account.create()
