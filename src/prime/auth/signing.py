"""Signed HTTP requests and answers: the canonical messages, signing them, recovering the signer.

Every role-to-role request carries four headers; the signature is EIP-191
``personal_sign`` over::

    prime-request-v2\\n{METHOD}\\n{path with query}\\n{timestamp}\\n{nonce}\\n{sha256(body) hex}
    \\n{audience}\\n{chain id}\\n{registry}

``path with query`` is the request target exactly as sent on the wire (aiohttp server:
``request.raw_path``; client: ``yarl.URL(...).raw_path_qs`` of the URL actually requested).
``audience`` is the callee's own address (lower-case hex), ``chain id`` and ``registry`` the
network both sides belong to (``Domain``): a request signed for one service, chain or
deployment is refused by every other one, so it cannot be relayed or replayed elsewhere.

Every answer to a signed request is signed back by the callee (two headers, ``X-Prime-Address``
and ``X-Prime-Signature``) over::

    prime-answer-v1\\n{request nonce}\\n{status}\\n{sha256(body) hex}\\n{callee}\\n{chain id}\\n{registry}

so the caller knows the instructions it reads come from the peer it meant to ask, for this
very request (the nonce), not from whoever sits on the path or an earlier answer.

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

PROTOCOL = "prime-request-v2"
ANSWER_PROTOCOL = "prime-answer-v1"
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
class Domain:
    """The network a signature belongs to: the chain and the registry contract deployed on it."""

    chain_id: int
    registry: str  # 0x address, any case

    def __post_init__(self) -> None:
        if not isinstance(self.chain_id, int) or isinstance(self.chain_id, bool) or not 0 < self.chain_id < 2**64:
            raise ValueError(f"a chain id must be a positive 64-bit integer, not {self.chain_id!r}")
        if not isinstance(self.registry, str) or not _ADDRESS_PATTERN.match(self.registry):
            raise ValueError(f"the registry must be a 0x address, not {self.registry!r}")
        object.__setattr__(self, "registry", self.registry.lower())

    @classmethod
    def of(cls, deployment: Any) -> Domain:
        """The domain of a ``prime.chain.deploy.Deployment`` (anything with chain_id and registry)."""
        return cls(int(deployment.chain_id), str(deployment.registry))

    def lines(self) -> str:
        return f"{self.chain_id}\n{self.registry}"


def _audience(address: str) -> str:
    if not isinstance(address, str) or not _ADDRESS_PATTERN.match(address):
        raise ValueError(f"the audience of a signed request is the callee's 0x address, not {address!r}")
    return address.lower()


@dataclass(frozen=True)
class SignatureHeaders:
    address: str  # as sent (any case)
    timestamp: int
    nonce: str
    signature: bytes  # 65 bytes r || s || v


def new_nonce() -> str:
    """24 url-safe random characters (144 bits)."""
    return secrets.token_urlsafe(18)


def canonical_message(
    method: str, path_qs: str, timestamp: int, nonce: str, body: bytes = b"", *, audience: str, domain: Domain
) -> str:
    return (
        f"{PROTOCOL}\n{method.upper()}\n{path_qs}\n{timestamp}\n{nonce}\n{hashlib.sha256(body).hexdigest()}"
        f"\n{_audience(audience)}\n{domain.lines()}"
    )


def answer_message(request_nonce: str, status: int, body: bytes, *, signer: str, domain: Domain) -> str:
    return (
        f"{ANSWER_PROTOCOL}\n{request_nonce}\n{int(status)}\n{hashlib.sha256(body).hexdigest()}"
        f"\n{_audience(signer)}\n{domain.lines()}"
    )


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
    audience: str,
    domain: Domain,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The four ``X-Prime-*`` headers for one request to ``audience`` (the callee's address) in ``domain``."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    nonce = new_nonce() if nonce is None else nonce
    if not NONCE_PATTERN.match(nonce):
        raise ValueError("a nonce must be 16-64 url-safe characters")
    message = canonical_message(method, path_qs, timestamp, nonce, body, audience=audience, domain=domain)
    signature = sign_message(account, message)
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


def verify_parsed(
    parsed: SignatureHeaders, method: str, path_qs: str, body: bytes, *, audience: str, domain: Domain
) -> str:
    """Checksum address of the signer if it matches the address header; else AuthError."""
    message = canonical_message(method, path_qs, parsed.timestamp, parsed.nonce, body, audience=audience, domain=domain)
    signer = _recover_digest(_eip191_digest(message), parsed.signature)
    if signer.lower() != parsed.address.lower():
        # Tampered method/path/body/timestamp/nonce, a request signed for another service, chain or
        # registry, or someone else's address claimed: the message the signer signed is not this one.
        raise AuthError(
            "the signature does not match this request, this service's address, chain and registry, and the claimed address "
            "(a request signed for another service or network is refused)"
        )
    return signer


def recover_signer(
    headers: Mapping[str, str], method: str, path_qs: str, body: bytes, *, audience: str, domain: Domain
) -> str:
    """Checksum address that signed this request (headers, method, path+query, body) for ``audience``; raises AuthError.

    Freshness (timestamp window) and replay are the middleware's job: this is pure.
    """
    return verify_parsed(parse_headers(headers), method, path_qs, body, audience=audience, domain=domain)


def sign_answer(account: Any, request_nonce: str, status: int, body: bytes, domain: Domain) -> dict[str, str]:
    """The two headers that sign an answer of ``account`` to the request that carried ``request_nonce``."""
    message = answer_message(request_nonce, status, body, signer=account.address, domain=domain)
    return {HEADER_ADDRESS: account.address, HEADER_SIGNATURE: sign_message(account, message)}


def verify_answer(
    headers: Mapping[str, str], request_nonce: str, status: int, body: bytes, *, expected: str, domain: Domain
) -> str:
    """Check that ``expected`` signed this answer to the request with ``request_nonce``; its checksum address, else AuthError."""
    try:
        address = _header(headers, HEADER_ADDRESS)
        signature = _header(headers, HEADER_SIGNATURE)
    except AuthError:
        raise AuthError("the answer is not signed (no X-Prime-Address / X-Prime-Signature)") from None
    if not _ADDRESS_PATTERN.match(address) or not _SIGNATURE_PATTERN.match(signature):
        raise AuthError("the answer's signature headers are malformed")
    if address.lower() != _audience(expected):
        raise AuthError(f"the answer is signed by {address}, not by {to_checksum_address(expected)}")
    message = answer_message(request_nonce, status, body, signer=expected, domain=domain)
    signer = _recover_digest(_eip191_digest(message), bytes.fromhex(signature[2:]))
    if signer.lower() != address.lower():
        raise AuthError("the answer's signature does not match its body, this request and the claimed address")
    return signer
