"""Signing test requests the way a real caller does: addressed to one service in one network.

``DOMAIN`` is the network of the tests that run without a chain (tests/web/roles.py's stubs);
tests on the session's anvil use ``Domain.of(deployment)``.
"""

from __future__ import annotations

from typing import Any

from prime.auth.middleware import SignedService
from prime.auth.signing import Domain, sign_headers

CHAIN_ID = 31337
REGISTRY = "0x" + "ab" * 20
DOMAIN = Domain(CHAIN_ID, REGISTRY)


def signed(account: Any, method: str, path_qs: str, body: bytes = b"", *, to: str, domain: Domain = DOMAIN, **kwargs: Any) -> dict[str, str]:
    """The four X-Prime-* headers of a request by ``account`` to the service whose address is ``to``."""
    return sign_headers(account, method, path_qs, body, audience=to, domain=domain, **kwargs)


def signed_service(account: Any, domain: Domain = DOMAIN, replay: Any = None) -> SignedService:
    """The signing setup of a test app served as ``account``."""
    return SignedService(account, domain, replay)


def peer_client(account: Any, *, to: str, domain: Domain = DOMAIN, **kwargs: Any) -> Any:
    """A SignedClient whose calls are addressed to ``to`` unless a call names another audience."""
    from prime.auth.client import SignedClient

    class AddressedClient(SignedClient):
        async def request(self, method: str, url: Any, *, audience: str | None = None, **kw: Any) -> Any:
            return await super().request(method, url, audience=audience or to, **kw)

        async def request_bytes(self, method: str, url: Any, *, audience: str | None = None, **kw: Any) -> bytes:
            return await super().request_bytes(method, url, audience=audience or to, **kw)

        def stream(self, method: str, url: Any, *, audience: str | None = None, **kw: Any) -> Any:
            return super().stream(method, url, audience=audience or to, **kw)

    return AddressedClient(account, domain=domain, **kwargs)
