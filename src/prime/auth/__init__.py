"""Signed HTTP requests between prime roles (see DESIGN.md, "Signed HTTP requests").

- ``signing``: the canonical message, ``sign_headers`` / ``recover_signer`` (EIP-191)
- ``replay``: nonce memory for the ±60 s window
- ``middleware``: ``signed_request_middleware`` (401) and ``@require(check)`` (403)
- ``permissions``: ``ChainPermissions`` (on-chain rights, briefly cached)
- ``client``: ``SignedClient`` (signed aiohttp calls with timeout, retry and backoff)
"""

from prime.auth.signing import (
    HEADER_ADDRESS,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    AuthError,
    recover_message,
    recover_signer,
    sign_headers,
    sign_message,
)

__all__ = [
    "HEADER_ADDRESS",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "AuthError",
    "recover_message",
    "recover_signer",
    "sign_headers",
    "sign_message",
]
