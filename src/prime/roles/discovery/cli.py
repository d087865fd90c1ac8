"""`prime discovery` commands."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import typer

from prime.config import (
    DEFAULT_HOST,
    DEFAULT_PASSWORD_ENV,
    DEFAULT_RPC_URL,
    DISCOVERY_PORT,
    DataDir,
    DeploymentPath,
    Host,
    KeyFile,
    PasswordEnv,
    Port,
    RpcUrl,
    prime_home,
)
from prime.errors import ConfigError, PrimeError
from prime.roles.process import configure_logging, open_data_dir, serve_until_stopped

log = logging.getLogger("prime.discovery")

app = typer.Typer(no_args_is_help=True)

DEFAULT_PORT = DISCOVERY_PORT
DEFAULT_DATA_DIR = prime_home() / "discovery"
ROLE = "discovery"


@app.command()
def start(
    deployment: DeploymentPath = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Host = DEFAULT_HOST,
    port: Port = DEFAULT_PORT,
    key_file: KeyFile = None,
    password_env: PasswordEnv = DEFAULT_PASSWORD_ENV,
) -> None:
    """Start the discovery service: nodes announce their address, validators and masters look them up.

    Its key signs every answer (where a node is); the run names that key's address in its
    discovery URI (``http://host:port#0xADDRESS``), so callers can tell its answers from a forgery.
    """
    from prime.keys import load_account

    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")
    account = load_account(key_file, password_env=password_env)
    configure_logging()
    asyncio.run(serve(rpc_url=rpc_url, deployment_path=Path(deployment), data_dir=Path(data_dir), host=host, port=port,
                      account=account))


async def serve(
    *, rpc_url: str, deployment_path: Path, data_dir: Path, host: str, port: int, account: Any,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the service until SIGTERM/SIGINT (or ``stop``); closes the store and the chain connection on the way out."""
    # Imported here, not at the top: the root CLI imports every role's cli.py, and `prime --help`
    # should not pay for web3.
    from prime.auth.middleware import SignedService
    from prime.auth.permissions import ChainPermissions
    from prime.auth.replay import ReplayCache
    from prime.auth.signing import Domain
    from prime.chain.client import RegistryClient
    from prime.chain.deploy import Deployment
    from prime.roles.discovery.app import build_app
    from prime.web import HEALTH

    deployment = Deployment.load(deployment_path)  # ConfigError (one sentence) when missing or malformed
    with open_data_dir(data_dir, ROLE) as data:
        store = _open_store(data.path)
        registry = None
        try:
            registry = await RegistryClient.connect(rpc_url, deployment)

            def listening(bound: int) -> None:
                log.info("discovery listening on http://%s:%d#%s (data in %s, %d nodes known)",
                         host, bound, account.address, data.path, store.count())

            signing = SignedService(account, Domain.of(deployment), ReplayCache.persistent(data.path / "nonces"))
            permissions = ChainPermissions(registry)
            app = build_app(store, permissions, signing)
            permissions.attach(app[HEALTH])  # an RPC outage is named in /health
            await serve_until_stopped(app, host=host, port=port,
                                      on_listening=listening, stop=stop)
            log.info("discovery stopped")
        finally:
            if registry is not None:
                await registry.close()
            store.close()


def _open_store(data_dir: Path):
    from prime.roles.discovery.store import DiscoveryStore

    try:
        return DiscoveryStore.open(data_dir)
    except PrimeError:
        raise
    except OSError as exc:
        raise PrimeError(f"Cannot use data directory {data_dir} ({exc.strerror or exc}); pass a writable --data-dir.") from None
