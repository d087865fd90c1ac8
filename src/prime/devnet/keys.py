"""The devnet's identities: anvil's public dev keys as ordinary encrypted keystores.

Every role loads its key the way it does in production (a keystore + a password from the
environment); only the keys are throwaway ones that anvil funds on every start. The cheap
scrypt work factor keeps the five role processes from spending seconds each on decryption;
it protects nothing, and does not need to: these keys are public.

The node's key is the exception: each state directory makes its own (random, once, kept in its
keystores), so two local networks on one Docker engine never share a node identity. The node
never pays for anything (the provider sends registerNode and joinRun), so it needs no funds.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount

from prime.chain.anvil import dev_accounts
from prime.devnet.state import PASSWORD, DevnetPaths
from prime.errors import PrimeError
from prime.keys import create_keystore, keystore_address, load_account, read_keystore

# role -> index of anvil's dev account (the same split as the test fixtures).
DEV_ROLES: dict[str, int] = {
    "admin": 0,      # deploys the registry, grants VALIDATOR_ROLE
    "validator": 1,
    "owner": 2,      # the buyer: owns the run, signs requests to the master
    "master": 3,
    "provider": 4,   # pays for the node's registration and stake
    "discovery": 6,  # signs discovery's answers; the run names it in its discovery URI
}
# Roles whose key is made per state dir (random, kept): the miner machine's identity.
OWN_ROLES: tuple[str, ...] = ("node",)
ROLES: tuple[str, ...] = (*DEV_ROLES, *OWN_ROLES)
ANVIL_ACCOUNTS = 10  # anvil's funded dev accounts: never a state dir's own key
DEVNET_SCRYPT_N = 2**12


@dataclass(frozen=True)
class DevKey:
    role: str
    account: LocalAccount
    key_file: str

    @property
    def address(self) -> str:
        return self.account.address


def dev_account(role: str) -> LocalAccount:
    return dev_accounts(max(DEV_ROLES.values()) + 1)[DEV_ROLES[role]]


def ensure_dev_keys(paths: DevnetPaths) -> dict[str, DevKey]:
    """Write a keystore per role unless it is already there (and holds that role's key); the
    node's key is this state dir's own: made at random the first time, then reused."""
    keys: dict[str, DevKey] = {}
    anvils = {account.address for account in dev_accounts(ANVIL_ACCOUNTS)}
    for role in OWN_ROLES:
        path = paths.key(role)
        if path.exists() and keystore_address(read_keystore(path)) in anvils:
            path.unlink()  # an older devnet's node key (anvil's shared account 5): this state dir gets its own
        if not path.exists():
            create_keystore(path, PASSWORD, Account.create().key.hex(), kdf="scrypt", iterations=DEVNET_SCRYPT_N)
        keys[role] = DevKey(role, load_account(path, password=PASSWORD, prompt=False), str(path))
    for role in DEV_ROLES:
        account = dev_account(role)
        path = paths.key(role)
        if path.exists():
            stored = keystore_address(read_keystore(path))
            if stored != account.address:
                raise PrimeError(f"{path} holds the key of {stored}, not the devnet's {role} key {account.address}; remove {paths.keys} and run `prime devnet up` again.")
        else:
            create_keystore(path, PASSWORD, account.key.hex(), kdf="scrypt", iterations=DEVNET_SCRYPT_N)
        keys[role] = DevKey(role, account, str(path))
    return {role: keys[role] for role in ROLES}
