"""The discovery HTTP service: nodes announce where they listen; validators and masters look them up.

Who may do what (DESIGN.md, Discovery):
- ``PUT /nodes``: a node registered on chain for the announced run.
- ``GET /nodes/{address}``: a validator, or a master of that node's run.
- ``GET /runs/{run_id}/nodes``: a master of that run.
Every request is signed (401 otherwise); input is checked before the chain is asked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from eth_utils import to_checksum_address
from prometheus_client import CollectorRegistry, Counter

from prime.auth.middleware import SIGNER, SignedService
from prime.errors import ChainError
from prime.protocol.discovery import UNKNOWN_NODE, Announcement, NodeAddress, RunNodes
from prime.protocol.errors import InvalidJson, ValidationError
from prime.protocol.nodes import ADDRESS_RE
from prime.roles.discovery.store import DiscoveryStore
from prime.web import METRICS, api, json_error, make_app

log = logging.getLogger(__name__)

# Run ids are small counters on chain; the cap keeps them inside SQLite's 64-bit INTEGER.
MAX_RUN_ID = 2**63 - 1


class DiscoveryMetrics:
    """Counters on the app's own Prometheus registry (served at /metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # result: stored | invalid | denied
        self.announces = Counter("prime_discovery_announces", "Node announcements, by outcome.", ["result"], registry=registry)
        # kind: node | run; result: found | not_found
        self.lookups = Counter("prime_discovery_lookups", "Address lookups, by kind and outcome.", ["kind", "result"], registry=registry)
        self.denials = Counter("prime_discovery_denials", "Signed requests refused with 403, by endpoint.", ["endpoint"], registry=registry)

    def denied(self, endpoint: str, detail: str) -> web.Response:
        self.denials.labels(endpoint).inc()
        return json_error(403, "forbidden", detail)


class Permissions(Protocol):
    """The on-chain checks discovery needs (prime.auth.permissions.ChainPermissions)."""

    async def is_validator(self, addr: str) -> bool: ...
    async def is_master(self, run_id: int, addr: str) -> bool: ...
    async def is_registered_node(self, run_id: int, addr: str) -> bool: ...
    async def node_run_id(self, addr: str) -> int | None: ...


def parse_address(text: str) -> str | None:
    """Checksum form of a 0x-prefixed address, or None. All-lower/all-upper hex is accepted; mixed
    case must be a correct EIP-55 checksum (a wrong one is a typo that would name another node)."""
    if not ADDRESS_RE.match(text):
        return None
    checksummed = to_checksum_address(text)
    digits = text[2:]
    if digits != digits.lower() and digits != digits.upper() and text != checksummed:
        return None
    return checksummed


def parse_run_id(text: str) -> int | None:
    """A run id from a URL segment: decimal digits only, at most MAX_RUN_ID."""
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        return None
    value = int(text)
    return value if value <= MAX_RUN_ID else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not port 1


@web.middleware
async def chain_unavailable_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A permission check that cannot reach the chain is the service's problem, not the caller's: 503, retryable."""
    try:
        return await handler(request)
    except ChainError as exc:
        log.warning("chain check failed for %s %s: %s", request.method, request.path, exc)
        return json_error(503, "chain_unavailable", f"could not check permissions on chain: {exc}")


def build_app(
    store: DiscoveryStore, permissions: Permissions, signing: SignedService, *, clock: Callable[[], float] = time.time
) -> web.Application:
    """The discovery aiohttp application over ``store``, asking ``permissions`` who may do what;
    its answers (where nodes are) are signed by ``signing``'s key, the one the run names on chain."""
    app = make_app(name="discovery", middlewares=[signing.middleware(), chain_unavailable_middleware], identity=signing.identity())
    metrics = DiscoveryMetrics(app[METRICS])
    routes = web.RouteTableDef()

    @routes.put("/nodes")
    @api(request=Announcement, response=NodeAddress, errors=(401, 403, 503))
    async def announce(request: web.Request) -> web.Response:
        """Announce the signing node's address.

        Body {ip, port, run_id}: an IPv4/IPv6 literal, a port in 1..65535, a run id. The signer
        must be registered on chain for that run (403 otherwise, nothing stored). A re-announce
        replaces the record. Answers the stored record {address, ip, port, run_id, updated_at}.
        """
        signer: str = request[SIGNER]
        try:
            body = Announcement.from_json(await request.read())  # 413 past the app's body limit
        except InvalidJson as exc:
            metrics.announces.labels("invalid").inc()
            return json_error(400, "invalid_json", exc.detail)
        except ValidationError as exc:
            metrics.announces.labels("invalid").inc()
            return json_error(400, "invalid_announcement", str(exc))
        except web.HTTPException:
            metrics.announces.labels("invalid").inc()
            raise
        if not await permissions.is_registered_node(body.run_id, signer):
            metrics.announces.labels("denied").inc()
            return metrics.denied("announce", f"{signer} is not registered on chain for run {body.run_id}")
        record = store.upsert(NodeAddress(signer, body.ip, body.port, body.run_id, clock()))
        metrics.announces.labels("stored").inc()
        log.info("node %s announced %s for run %d", signer, record.url, record.run_id)
        return web.json_response(record.to_json())

    @routes.get("/nodes/{address}")
    @api(response=NodeAddress, errors=(400, 404, 401, 403, 503))
    async def get_node(request: web.Request) -> web.Response:
        """Last announced address of one node.

        For validators and masters of the node's run (on chain); anyone else gets 403, even
        for a node that never announced. Answers {address, ip, port, run_id, updated_at};
        404 with error "unknown_node" when the node has not announced.
        """
        signer: str = request[SIGNER]
        address = parse_address(request.match_info["address"])
        if address is None:
            return json_error(400, "invalid_address", "expected a 0x-prefixed 20-byte hex address")
        # Permission comes before existence, so strangers cannot probe who announced. The node's
        # run is the chain's answer, not the record's: it also covers nodes that never announced.
        if not await permissions.is_validator(signer):
            run_id = await permissions.node_run_id(address)
            if run_id is None or not await permissions.is_master(run_id, signer):
                return metrics.denied("get_node", f"{signer} is neither a validator nor a master of this node's run")
        record = store.get(address)
        if record is None:
            metrics.lookups.labels("node", "not_found").inc()
            return json_error(404, UNKNOWN_NODE, f"{address} has not announced an address")
        metrics.lookups.labels("node", "found").inc()
        return web.json_response(record.to_json())

    @routes.get("/runs/{run_id}/nodes")
    @api(response=RunNodes, errors=(400, 401, 403, 503))
    async def run_nodes(request: web.Request) -> web.Response:
        """Every announced node of one run.

        For masters of that run. Answers {run_id, nodes: [{address, ip, port, run_id, updated_at}, ...]}.
        """
        signer: str = request[SIGNER]
        run_id = parse_run_id(request.match_info["run_id"])
        if run_id is None:
            return json_error(400, "invalid_run_id", f"expected a decimal integer in 0..{MAX_RUN_ID}")
        if not await permissions.is_master(run_id, signer):
            return metrics.denied("run_nodes", f"{signer} is not a master of run {run_id}")
        records = store.run_nodes(run_id)
        metrics.lookups.labels("run", "found" if records else "not_found").inc()
        return web.json_response({"run_id": run_id, "nodes": [r.to_json() for r in records]})

    app.add_routes(routes)
    return app
