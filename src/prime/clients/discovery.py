"""Talk to a discovery service: announce this node, look up other nodes.

Every other role uses this module instead of building discovery URLs by hand.

A run's discovery URI names the service's signing address in its fragment,
``http://host:port#0xADDRESS`` (a fragment is never sent on the wire): every request is
addressed to that key and every answer must be signed by it, so a node address read from
discovery comes from the service the run owner named on chain, not from whoever answered.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from prime.errors import PeerError
from prime.protocol.discovery import UNKNOWN_NODE, NodeAddress, RunNodes
from prime.protocol.errors import ValidationError

if TYPE_CHECKING:  # only for hints: importing the client pulls in aiohttp and signing
    from prime.auth.client import SignedClient


_SIGNER = re.compile(r"^0x[0-9a-fA-F]{40}\Z")


def split_discovery_uri(uri: str) -> tuple[str, str | None]:
    """(base URL, signing address or None) of a discovery URI ``http://host:port[/path]#0xADDRESS``."""
    base, _, fragment = uri.partition("#")
    return base.rstrip("/"), (fragment if _SIGNER.match(fragment) else None)


def discovery_uri(base_url: str, signer: str) -> str:
    """The URI a run stores on chain for a discovery service at ``base_url`` signing as ``signer``."""
    if not _SIGNER.match(signer):
        raise ValueError(f"the discovery signer must be a 0x address, not {signer!r}")
    scheme = urlsplit(base_url).scheme
    if scheme not in ("http", "https") or "#" in base_url:
        raise ValueError(f"the discovery URL must be http(s) without a fragment, not {base_url!r}")
    return f"{base_url.rstrip('/')}#{signer}"


class DiscoveryClient:
    """Signed calls to one discovery service (``uri``: a run's discovery_uri, signer included).

    Errors (unreachable service, 401/403, answers not signed by the named key, malformed
    answers) raise ``PeerError``.
    """

    def __init__(self, signed_client: SignedClient, uri: str) -> None:
        self._client = signed_client
        self.uri = uri
        self.base_url, self.signer = split_discovery_uri(uri)

    async def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        if self.signer is None:
            raise PeerError(
                f"The run's discovery URI {self.uri!r} names no signing address (write it as {self.base_url}#0xADDRESS); "
                "without it no answer of discovery can be trusted, so none is asked for. The run owner sets it when creating the run."
            )
        return await self._client.request(method, url, audience=self.signer, **kwargs)

    async def announce(self, ip: str, port: int, run_id: int) -> NodeAddress:
        """Announce the signing node's address for ``run_id``; returns the stored record."""
        answer = await self._request("PUT", f"{self.base_url}/nodes", json={"ip": ip, "port": port, "run_id": run_id})
        return self._parse(answer)

    async def get_node(self, address: str) -> NodeAddress | None:
        """The last announced address of ``address``, or None if it never announced."""
        try:
            answer = await self._request("GET", f"{self.base_url}/nodes/{quote(address, safe='')}")
        except PeerError as exc:
            # Only the service's own "unknown node" answer means None; any other 404
            # (a wrong base URL, a proxy) is an error the caller should see.
            if exc.status == 404 and isinstance(exc.body, dict) and exc.body.get("error") == UNKNOWN_NODE:
                return None
            raise
        return self._parse(answer)

    async def run_nodes(self, run_id: int) -> list[NodeAddress]:
        """Every node that announced itself for ``run_id`` (callable by a master of that run)."""
        answer = await self._request("GET", f"{self.base_url}/runs/{int(run_id)}/nodes")
        try:
            return list(RunNodes.from_json(answer).nodes) if isinstance(answer, dict) else self._no_list(answer)
        except ValidationError as exc:
            raise PeerError(
                f"Discovery at {self.base_url} answered with a malformed node list ({exc}); check that the URL points at a prime discovery service.",
                body=answer,
            ) from None

    def _no_list(self, answer: Any) -> list[NodeAddress]:
        raise PeerError(
            f"Discovery at {self.base_url} answered without a node list; check that the URL points at a prime discovery service.",
            body=answer,
        )

    def _parse(self, answer: Any) -> NodeAddress:
        try:
            return NodeAddress.from_json(answer)
        except ValidationError as exc:
            raise PeerError(
                f"Discovery at {self.base_url} answered with a malformed node record ({exc}); check that the URL points at a prime discovery service.",
                body=answer,
            ) from None
