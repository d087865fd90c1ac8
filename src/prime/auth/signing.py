"""Signed HTTP requests: the canonical message, signing it, and recovering the signer.

Every role-to-role request carries four headers; the signature is EIP-191
``personal_sign`` over::

    prime-request-v1\\n{METHOD}\\n{path with query}\\n{timestamp}\\n{nonce}\\n{sha256(body) hex}

``path with query`` is the request target exactly as sent on the wire (aiohttp server:
``request.raw_path``; client: ``yarl.URL(...).raw_path_qs`` of the URL actually requested).

Recovery talks to coincurve directly (one keccak, one ECDSA recovery, one keccak) rather
than going through eth-account's generic message objects: a master verifies thousands
of heartbeats per second. Nothing about a request is cached; only the pure
address → checksum mapping is memoised.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coincurve import PrivateKey, PublicKey
from eth_account.messages import encode_defunct
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

PROTOCOL = "prime-request-v1"
HEADER_ADDRESS = "X-Prime-Address"
HEADER_TIMESTAMP = "X-Prime-Timestamp"
HEADER_NONCE = "X-Prime-Nonce"
HEADER_SIGNATURE = "X-Prime-Signature"
SIGNED_HEADERS = (HEADER_ADDRESS, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)

NONCE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}\Z")  # \Z: "$" would let a final newline through
_ADDRESS_PATTERN = re.compile(r"^0x[0-9a-fA-F]{40}\Z")
_SIGNATURE_PATTERN = re.compile(r"^0x[0-9a-fA-F]{130}\Z")
_TIMESTAMP_PATTERN = re.compile(r"^[0-9]{1,12}\Z")
# secp256k1 group order; signatures must use the low-s form (EIP-2) so each has one encoding.
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_EIP191_PREFIX = b"\x19Ethereum Signed Message:\n"


class AuthError(Exception):
    """A request's signature headers are missing, malformed or do not verify."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SignatureHeaders:
    address: str  # as sent (any case)
    timestamp: int
    nonce: str
    signature: bytes  # 65 bytes r || s || v


def new_nonce() -> str:
    """24 url-safe random characters (144 bits)."""
    return secrets.token_urlsafe(18)


def canonical_message(method: str, path_qs: str, timestamp: int, nonce: str, body: bytes = b"") -> str:
    return f"{PROTOCOL}\n{method.upper()}\n{path_qs}\n{timestamp}\n{nonce}\n{hashlib.sha256(body).hexdigest()}"


def _eip191_digest(text: str) -> bytes:
    data = text.encode("utf-8")
    return keccak(_EIP191_PREFIX + str(len(data)).encode() + data)


@functools.lru_cache(maxsize=65536)
def _checksum(address_bytes: bytes) -> str:
    return to_checksum_address(address_bytes)


def _recover_digest(digest: bytes, signature: bytes) -> str:
    """Checksum address that produced ``signature`` (65 bytes, v = 27/28 or 0/1) over ``digest``."""
    if len(signature) != 65:
        raise AuthError("the signature must be 65 bytes")
    v = signature[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        raise AuthError("the signature's recovery id (v) must be 27 or 28")
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < s <= _SECP256K1_N // 2:
        raise AuthError("the signature is not in canonical low-s form")
    try:
        public = PublicKey.from_signature_and_message(signature[:64] + bytes([v]), digest, hasher=None)
    except Exception:
        raise AuthError("the signature does not correspond to any public key") from None
    return _checksum(keccak(public.format(compressed=False)[1:])[-20:])


def sign_message(account: Any, text: str) -> str:
    """EIP-191 personal_sign of ``text`` by ``account``; 0x-prefixed 65-byte hex (v = 27/28).

    A local account (one with a raw ``key``) signs through coincurve directly, which is what
    eth-account does underneath minus its per-call object overhead; anything else that can
    ``sign_message`` (a hardware or remote signer) goes through its own method.
    """
    key = getattr(account, "key", None)
    if isinstance(key, (bytes, bytearray)) and len(key) == 32:
        recoverable = PrivateKey(bytes(key)).sign_recoverable(_eip191_digest(text), hasher=None)
        return "0x" + recoverable[:64].hex() + f"{recoverable[64] + 27:02x}"
    return "0x" + bytes(account.sign_message(encode_defunct(text=text)).signature).hex()


def recover_message(text: str, signature: str | bytes) -> str:
    """Checksum address that personal_signed ``text``; raises AuthError if it does not verify."""
    if isinstance(signature, str):
        if not _SIGNATURE_PATTERN.match(signature):
            raise AuthError("the signature must be 0x followed by 130 hex digits")
        signature = bytes.fromhex(signature[2:])
    return _recover_digest(_eip191_digest(text), bytes(signature))


def sign_headers(
    account: Any,
    method: str,
    path_qs: str,
    body: bytes = b"",
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four ``X-Prime-*`` headers for one request."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    nonce = new_nonce() if nonce is None else nonce
    if not NONCE_PATTERN.match(nonce):
        raise ValueError("a nonce must be 16-64 url-safe characters")
    signature = sign_message(account, canonical_message(method, path_qs, timestamp, nonce, body))
    return {
        HEADER_ADDRESS: account.address,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: signature,
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:  # plain dicts are case-sensitive; HTTP headers are not
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    if value is None or value == "":
        raise AuthError(f"missing header {name}")
    return value


def parse_headers(headers: Mapping[str, str]) -> SignatureHeaders:
    """Syntax check of the four headers (no cryptography)."""
    address = _header(headers, HEADER_ADDRESS)
    timestamp = _header(headers, HEADER_TIMESTAMP)
    nonce = _header(headers, HEADER_NONCE)
    signature = _header(headers, HEADER_SIGNATURE)
    if not _ADDRESS_PATTERN.match(address):
        raise AuthError(f"{HEADER_ADDRESS} must be 0x followed by 40 hex digits")
    if not _TIMESTAMP_PATTERN.match(timestamp):
        raise AuthError(f"{HEADER_TIMESTAMP} must be a unix time in whole seconds")
    if not NONCE_PATTERN.match(nonce):
        raise AuthError(f"{HEADER_NONCE} must be 16-64 url-safe characters (A-Z a-z 0-9 _ -)")
    if not _SIGNATURE_PATTERN.match(signature):
        raise AuthError(f"{HEADER_SIGNATURE} must be 0x followed by 130 hex digits")
    return SignatureHeaders(address, int(timestamp), nonce, bytes.fromhex(signature[2:]))


def verify_parsed(parsed: SignatureHeaders, method: str, path_qs: str, body: bytes) -> str:
    """Checksum address of the signer if it matches the address header; else AuthError."""
    digest = _eip191_digest(canonical_message(method, path_qs, parsed.timestamp, parsed.nonce, body))
    signer = _recover_digest(digest, parsed.signature)
    if signer.lower() != parsed.address.lower():
        # Tampered method/path/body/timestamp/nonce, or someone else's address claimed.
        raise AuthError("the signature does not match the request and the claimed address")
    return signer


def recover_signer(headers: Mapping[str, str], method: str, path_qs: str, body: bytes) -> str:
    """Checksum address that signed this request (headers, method, path+query, body); raises AuthError.

    Freshness (timestamp window) and replay are the middleware's job: this is pure.
    """
    return verify_parsed(parse_headers(headers), method, path_qs, body)
