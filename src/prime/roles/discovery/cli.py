"""`prime discovery` commands."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import typer
from aiohttp import web

from prime.config import DEFAULT_HOST, DEFAULT_RPC_URL, DataDir, DeploymentPath, Host, Port, RpcUrl, prime_home
from prime.errors import ConfigError, PrimeError

log = logging.getLogger("prime.discovery")

app = typer.Typer(no_args_is_help=True)

DEFAULT_PORT = 8090
DEFAULT_DATA_DIR = prime_home() / "discovery"


@app.command()
def start(
    deployment: DeploymentPath = None,
    rpc_url: RpcUrl = DEFAULT_RPC_URL,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    host: Host = DEFAULT_HOST,
    port: Port = DEFAULT_PORT,
) -> None:
    """Start the discovery service: nodes announce their address, validators and masters look them up."""
    if deployment is None:
        raise ConfigError("No deployment file given; pass --deployment (or set PRIME_DEPLOYMENT) to the file `prime chain deploy` wrote.")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(rpc_url=rpc_url, deployment_path=Path(deployment), data_dir=Path(data_dir), host=host, port=port))


async def serve(*, rpc_url: str, deployment_path: Path, data_dir: Path, host: str, port: int) -> None:
    """Run the service until SIGTERM/SIGINT; closes the store and the chain connection on the way out."""
    # Imported here, not at the top: the root CLI imports every role's cli.py, and `prime --help`
    # should not pay for web3.
    from prime.auth.permissions import ChainPermissions
    from prime.chain.client import RegistryClient
    from prime.chain.deploy import Deployment
    from prime.roles.discovery.app import build_app
    from prime.web import serve as listen

    deployment = Deployment.load(deployment_path)  # ConfigError (one sentence) when missing or malformed
    store = _open_store(data_dir)
    registry = None
    runner: web.AppRunner | None = None
    try:
        registry = await RegistryClient.connect(rpc_url, deployment)
        runner = await listen(build_app(store, ChainPermissions(registry)), host=host, port=port)
        log.info("discovery listening on http://%s:%d (data in %s, %d nodes known)", host, port, data_dir, store.count())
        await _until_stopped()
        log.info("discovery stopping")
    finally:
        if runner is not None:
            await runner.cleanup()
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


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
