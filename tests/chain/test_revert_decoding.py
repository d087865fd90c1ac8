"""Revert data -> one sentence, without a chain (pure decoding of the ABI's custom errors)."""

from __future__ import annotations

from eth_abi import encode
from eth_account import Account
from eth_utils import keccak

from prime.chain.client import (
    VALIDATOR_ROLE,
    decode_revert,
    invite_digest,
    load_artifact,
    recover_digest_signer,
    registration_digest,
    revert_error_name,
    sign_digest,
)

NODE = "0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc"


def error_data(signature: str, types: list[str], values: list) -> bytes:
    return keccak(text=signature)[:4] + encode(types, values)


def test_every_custom_error_has_its_own_sentence():
    for item in load_artifact()["abi"]:
        if item["type"] != "error":
            continue
        types = [i["type"] for i in item["inputs"]]
        values = [{"address": NODE, "bytes32": b"\x00" * 32}.get(t, 1) for t in types]
        data = error_data(f"{item['name']}({','.join(types)})", types, values)
        sentence = decode_revert(data)
        assert revert_error_name(data) == item["name"]
        assert item["name"] not in sentence, f"{item['name']} falls back to the generic sentence"
        assert sentence.endswith(".") and "\n" not in sentence


def test_specific_sentences():
    assert decode_revert(error_data("RequirementsNotMet(address,uint8)", ["address", "uint8"], [NODE, 1])) == (
        f"Node {NODE} does not meet the run's GPU model requirement, so it cannot join."
    )
    assert decode_revert(error_data("AccessControlUnauthorizedAccount(address,bytes32)", ["address", "bytes32"], [NODE, VALIDATOR_ROLE])) == (
        f"Account {NODE} does not have the validator role needed for this."
    )
    assert decode_revert("0x" + error_data("NodeNotApproved(address,uint8)", ["address", "uint8"], [NODE, 3]).hex()) == (
        f"Node {NODE} is not approved by a validator (status rejected); wait for validation before joining."
    )


def test_standard_and_unknown_errors():
    assert decode_revert(error_data("Error(string)", ["string"], ["nope"])) == "The registry rejected the call: nope."
    assert decode_revert(error_data("Panic(uint256)", ["uint256"], [0x11])) == "The registry call failed because an arithmetic overflow or underflow."
    assert decode_revert(b"\xde\xad\xbe\xef") == "The registry rejected the call with an unknown error 0xdeadbeef."
    assert decode_revert(None) == "The registry rejected the call without giving a reason."
    assert decode_revert(keccak(text="NotMaster(uint256,address)")[:4] + b"\x01") .startswith("The registry rejected the call with undecodable error data")


def test_digests_are_the_abi_encoded_tuples_and_signatures_recover():
    registry = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    provider = "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65"
    assert registration_digest(31337, registry, provider, NODE, 7) == keccak(
        encode(["uint256", "address", "address", "address", "uint256"], [31337, registry, provider, NODE, 7])
    )
    assert invite_digest(31337, registry, 7, NODE.lower(), 1_700_000_000) == keccak(
        encode(["uint256", "address", "uint256", "address", "uint256"], [31337, registry, 7, NODE, 1_700_000_000])
    )
    signer = Account.create()
    digest = invite_digest(1, registry, 2, NODE, 3)
    signature = sign_digest(signer, digest)
    assert len(signature) == 65
    assert recover_digest_signer(digest, signature) == signer.address
    assert registration_digest(31337, registry, provider, NODE, 7) != registration_digest(1, registry, provider, NODE, 7)
