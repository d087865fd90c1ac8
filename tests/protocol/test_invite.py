"""The invite wire (prime.protocol.invite): strict bodies, the ack text, the digest the registry checks."""

from __future__ import annotations

import pytest
from eth_account import Account

from prime.chain.client import invite_digest as chain_invite_digest
from prime.protocol.errors import ValidationError
from prime.protocol.invite import ACK_PROTOCOL, InviteAnswer, InviteBody, ack_text, invite_digest

REGISTRY = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
NODE = Account.from_key("0x" + "11" * 32).address
SIG = "0x" + "ab" * 65
GOOD = {"run_id": 3, "master_url": "http://10.0.0.5:8070", "expiry": 1_700_000_600, "signature": SIG}


def test_invite_body_round_trips() -> None:
    body = InviteBody.from_json(GOOD)
    assert body == InviteBody(3, "http://10.0.0.5:8070", 1_700_000_600, SIG)
    assert body.to_json() == GOOD


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"run_id": -1}, "run_id"),
        ({"run_id": True}, "run_id"),
        ({"expiry": 1.5}, "expiry"),
        ({"expiry": 2**63}, "expiry"),
        ({"expiry": "600"}, "expiry"),
        ({"signature": "0x1234"}, "signature"),
        ({"signature": "ab" * 66}, "signature"),
        ({"master_url": ""}, "master_url"),
        ({"master_url": "http://x/" + "a" * 3000}, "master_url"),
        ({"extra": 1}, "extra"),
    ],
)
def test_invite_body_refuses_bad_fields_naming_them(change: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        InviteBody.from_json({**GOOD, **change})
    assert err.value.field == field


@pytest.mark.parametrize("missing", sorted(GOOD))
def test_invite_body_needs_every_field(missing: str) -> None:
    data = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ValidationError) as err:
        InviteBody.from_json(data)
    assert err.value.field == missing


@pytest.mark.parametrize("data", [None, [], "x", 5])
def test_invite_body_must_be_an_object(data: object) -> None:
    with pytest.raises(ValidationError):
        InviteBody.from_json(data)


def test_invite_answer_round_trips_with_and_without_a_transaction() -> None:
    answer = {"node": NODE, "run_id": 3, "master_url": "http://m:1", "tx_hash": "0x" + "cd" * 32, "ack": SIG}
    assert InviteAnswer.from_json(answer).to_json() == answer
    assert InviteAnswer.from_json({**answer, "tx_hash": None}).tx_hash is None
    with pytest.raises(ValidationError) as err:
        InviteAnswer.from_json({**answer, "tx_hash": "0x12"})
    assert err.value.field == "tx_hash"
    with pytest.raises(ValidationError) as err:
        InviteAnswer.from_json({**answer, "node": "somebody"})
    assert err.value.field == "node"


def test_ack_text_is_canonical_whatever_the_case_of_the_addresses() -> None:
    text = ack_text(31337, REGISTRY.lower(), 3, NODE.lower(), 99)
    assert text == f"{ACK_PROTOCOL}\n31337\n{REGISTRY}\n3\n{NODE}\n99"
    assert text == ack_text(31337, REGISTRY, 3, NODE, 99)


def test_digest_is_the_one_the_registry_checks() -> None:
    digest = invite_digest(31337, REGISTRY, 3, NODE, 99)
    assert len(digest) == 32
    assert digest == chain_invite_digest(31337, REGISTRY, 3, NODE, 99)
    assert digest != invite_digest(31337, REGISTRY, 4, NODE, 99)
