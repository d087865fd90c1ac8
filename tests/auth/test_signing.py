"""Canonical message, header signing and signer recovery (real secp256k1 signatures)."""

from __future__ import annotations

import hashlib

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from prime.auth.signing import (
    HEADER_ADDRESS,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    AuthError,
    Domain,
    new_nonce,
    parse_headers,
    recover_message,
    sign_message,
    verify_answer,
)
from prime.auth.signing import canonical_message as _canonical_message
from prime.auth.signing import recover_signer as _recover_signer
from prime.auth.signing import sign_answer as _sign_answer
from prime.auth.signing import sign_headers as _sign_headers
from tests.support.signing import DOMAIN

CALLEE = "0x" + "c0" * 20  # the service every request here is addressed to


def sign_headers(account, method, path, body=b"", **kwargs):  # type: ignore[no-untyped-def]
    return _sign_headers(account, method, path, body, audience=CALLEE, domain=DOMAIN, **kwargs)


def recover_signer(headers, method, path, body):  # type: ignore[no-untyped-def]
    return _recover_signer(headers, method, path, body, audience=CALLEE, domain=DOMAIN)


def canonical_message(method, path, timestamp, nonce, body=b""):  # type: ignore[no-untyped-def]
    return _canonical_message(method, path, timestamp, nonce, body, audience=CALLEE, domain=DOMAIN)

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def test_canonical_message_matches_design() -> None:
    body = b'{"a":1}'
    message = canonical_message("post", "/tasks?x=1", 1700000000, "n" * 16, body)
    assert message == (
        f"prime-request-v2\nPOST\n/tasks?x=1\n1700000000\n{'n' * 16}\n{hashlib.sha256(body).hexdigest()}"
        f"\n{CALLEE}\n{DOMAIN.chain_id}\n{DOMAIN.registry}"
    )


@pytest.mark.parametrize("audience, domain", [
    ("0x" + "c1" * 20, DOMAIN),  # another service
    (CALLEE, Domain(DOMAIN.chain_id + 1, DOMAIN.registry)),  # another chain
    (CALLEE, Domain(DOMAIN.chain_id, "0x" + "99" * 20)),  # another deployment
])
def test_a_request_signed_for_another_audience_or_network_does_not_verify(alice, audience: str, domain: Domain) -> None:
    headers = sign_headers(alice, "GET", "/nodes")
    with pytest.raises(AuthError, match="another service or network"):
        _recover_signer(headers, "GET", "/nodes", b"", audience=audience, domain=domain)


def test_answers_verify_only_for_their_signer_nonce_status_body_and_network(alice, mallory) -> None:
    headers = _sign_answer(alice, "n" * 20, 200, b"{}", DOMAIN)
    assert verify_answer(headers, "n" * 20, 200, b"{}", expected=alice.address, domain=DOMAIN) == alice.address
    for nonce, status, body, expected, domain in (
        ("m" * 20, 200, b"{}", alice.address, DOMAIN),
        ("n" * 20, 201, b"{}", alice.address, DOMAIN),
        ("n" * 20, 200, b"[]", alice.address, DOMAIN),
        ("n" * 20, 200, b"{}", mallory.address, DOMAIN),
        ("n" * 20, 200, b"{}", alice.address, Domain(1, DOMAIN.registry)),
    ):
        with pytest.raises(AuthError):
            verify_answer(headers, nonce, status, body, expected=expected, domain=domain)
    with pytest.raises(AuthError, match="not signed"):
        verify_answer({}, "n" * 20, 200, b"{}", expected=alice.address, domain=DOMAIN)
    # mallory's signature under alice's address header
    forged = {**_sign_answer(mallory, "n" * 20, 200, b"{}", DOMAIN), HEADER_ADDRESS: alice.address}
    with pytest.raises(AuthError):
        verify_answer(forged, "n" * 20, 200, b"{}", expected=alice.address, domain=DOMAIN)


def test_headers_round_trip(alice) -> None:
    headers = sign_headers(alice, "POST", "/heartbeat?x=1", b'{"load": 1}')
    assert set(headers) == {HEADER_ADDRESS, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE}
    assert headers[HEADER_ADDRESS] == alice.address
    assert recover_signer(headers, "POST", "/heartbeat?x=1", b'{"load": 1}') == alice.address


def test_signature_is_plain_personal_sign(alice) -> None:
    """Any EIP-191 tool (eth-account here) verifies our signature over the canonical text."""
    headers = sign_headers(alice, "GET", "/nodes", b"", timestamp=1700000000, nonce="abcdefghijklmnop")
    text = canonical_message("GET", "/nodes", 1700000000, "abcdefghijklmnop", b"")
    assert Account.recover_message(encode_defunct(text=text), signature=headers[HEADER_SIGNATURE]) == alice.address


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/heartbeat?x=1", b'{"load": 1}'),  # method
        ("POST", "/heartbeat?x=2", b'{"load": 1}'),  # query
        ("POST", "/heartbeaT?x=1", b'{"load": 1}'),  # path
        ("POST", "/heartbeat?x=1", b'{"load": 2}'),  # body
    ],
)
def test_any_tampering_fails(alice, method: str, path: str, body: bytes) -> None:
    headers = sign_headers(alice, "POST", "/heartbeat?x=1", b'{"load": 1}')
    with pytest.raises(AuthError, match="does not match"):
        recover_signer(headers, method, path, body)


def test_tampered_timestamp_or_nonce_fails(alice) -> None:
    headers = sign_headers(alice, "GET", "/", b"")
    for name, value in [(HEADER_TIMESTAMP, str(int(headers[HEADER_TIMESTAMP]) + 1)), (HEADER_NONCE, new_nonce())]:
        tampered = {**headers, name: value}
        with pytest.raises(AuthError):
            recover_signer(tampered, "GET", "/", b"")


def test_claiming_someone_elses_address_fails(alice, mallory) -> None:
    headers = {**sign_headers(mallory, "GET", "/", b""), HEADER_ADDRESS: alice.address}
    with pytest.raises(AuthError, match="does not match"):
        recover_signer(headers, "GET", "/", b"")


def test_header_names_are_case_insensitive(alice) -> None:
    headers = {k.lower(): v for k, v in sign_headers(alice, "GET", "/", b"").items()}
    assert recover_signer(headers, "GET", "/", b"") == alice.address


@pytest.mark.parametrize("missing", [HEADER_ADDRESS, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE])
def test_each_missing_header_is_named(alice, missing: str) -> None:
    headers = sign_headers(alice, "GET", "/", b"")
    del headers[missing]
    with pytest.raises(AuthError, match=f"missing header {missing}"):
        parse_headers(headers)


@pytest.mark.parametrize(
    "name, value",
    [
        (HEADER_ADDRESS, "0x1234"),
        (HEADER_ADDRESS, "not an address"),
        (HEADER_TIMESTAMP, "-5"),
        (HEADER_TIMESTAMP, "1.5"),
        (HEADER_TIMESTAMP, "1" * 20),
        (HEADER_NONCE, "short"),
        (HEADER_NONCE, "x" * 65),
        (HEADER_NONCE, "has space in it here"),
        (HEADER_SIGNATURE, "0x1234"),
        (HEADER_SIGNATURE, "zz" * 65),
    ],
)
def test_malformed_headers(alice, name: str, value: str) -> None:
    headers = {**sign_headers(alice, "GET", "/", b""), name: value}
    with pytest.raises(AuthError, match=name):
        parse_headers(headers)


def test_bad_recovery_id_and_high_s_are_rejected(alice) -> None:
    headers = sign_headers(alice, "GET", "/", b"")
    sig = bytes.fromhex(headers[HEADER_SIGNATURE][2:])
    bad_v = sig[:64] + bytes([29])
    with pytest.raises(AuthError, match="recovery id"):
        recover_signer({**headers, HEADER_SIGNATURE: "0x" + bad_v.hex()}, "GET", "/", b"")
    # The same signature in its malleable high-s twin must not verify.
    s = int.from_bytes(sig[32:64], "big")
    twin = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    with pytest.raises(AuthError, match="low-s"):
        recover_signer({**headers, HEADER_SIGNATURE: "0x" + twin.hex()}, "GET", "/", b"")


def test_garbage_signature_of_right_shape_is_rejected(alice) -> None:
    headers = {**sign_headers(alice, "GET", "/", b""), HEADER_SIGNATURE: "0x" + "00" * 64 + "1b"}
    with pytest.raises(AuthError):
        recover_signer(headers, "GET", "/", b"")


def test_sign_and_recover_message(alice) -> None:
    signature = sign_message(alice, "invite 7")
    assert recover_message("invite 7", signature) == alice.address
    assert recover_message("invite 7", bytes.fromhex(signature[2:])) == alice.address
    assert recover_message("invite 8", signature) != alice.address
    with pytest.raises(AuthError):
        recover_message("invite 7", "0xnothex")


def test_nonces_are_fresh_and_valid() -> None:
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert all(16 <= len(n) <= 64 for n in nonces)


def test_sign_headers_refuses_a_bad_nonce(alice) -> None:
    with pytest.raises(ValueError):
        sign_headers(alice, "GET", "/", nonce="short")


def test_fast_local_signing_equals_eth_account_and_other_signers_work(alice) -> None:
    text = canonical_message("POST", "/tasks", 1700000000, "q" * 20, b"{}")
    expected = "0x" + bytes(alice.sign_message(encode_defunct(text=text)).signature).hex()
    assert sign_message(alice, text) == expected  # deterministic RFC 6979: byte-identical

    class RemoteSigner:
        """No raw key: only a sign_message method (hardware wallet, KMS...)."""

        address = alice.address

        def sign_message(self, signable):  # type: ignore[no-untyped-def]
            return alice.sign_message(signable)

    headers = sign_headers(RemoteSigner(), "GET", "/", b"")
    assert recover_signer(headers, "GET", "/", b"") == alice.address
