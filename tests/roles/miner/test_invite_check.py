"""The pure part of invite checking: every way an invite can be wrong, without a chain."""

from __future__ import annotations

import pytest
from eth_account import Account

from prime.chain.client import invite_digest, sign_digest
from prime.roles.miner.invite import InviteBody, InviteRefused, ack_text, check_invite, valid_master_url

CHAIN_ID, REGISTRY, RUN = 31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3", 4
MASTER, OTHER = Account.create(), Account.create()
NODE = Account.create().address
NOW = 1_700_000_000


def _body(signer=MASTER, *, run_id=RUN, node=NODE, expiry=NOW + 600, url="http://10.0.0.5:8080") -> InviteBody:
    signature = sign_digest(signer, invite_digest(CHAIN_ID, REGISTRY, run_id, node, expiry))
    return InviteBody(run_id=run_id, master_url=url, expiry=expiry, signature="0x" + signature.hex())


def _check(body: InviteBody, signer: str = MASTER.address) -> None:
    check_invite(body, signer=signer, node=NODE, run_id=RUN, chain_id=CHAIN_ID, registry=REGISTRY, now=NOW)


def test_a_good_invite_passes() -> None:
    _check(_body())
    _check(_body(), signer=MASTER.address.lower())


@pytest.mark.parametrize(
    ("body", "signer", "status", "error"),
    [
        (_body(run_id=RUN + 1), MASTER.address, 403, "wrong_run"),
        (_body(expiry=NOW), MASTER.address, 403, "invite_expired"),
        (_body(), OTHER.address, 403, "signature_mismatch"),
        (_body(OTHER), MASTER.address, 403, "signature_mismatch"),
        (_body(node=OTHER.address), MASTER.address, 403, "signature_mismatch"),
        (_body(url="ftp://x"), MASTER.address, 400, "invalid_invite"),
        (_body(url="http://x/?q=1"), MASTER.address, 400, "invalid_invite"),
        (InviteBody(RUN, "http://x", -1, _body().signature), MASTER.address, 400, "invalid_invite"),
        (InviteBody(RUN, "http://x", 2**64, _body().signature), MASTER.address, 400, "invalid_invite"),
        (InviteBody(RUN, "http://x", NOW + 5, "0x1234"), MASTER.address, 400, "invalid_invite"),
        (InviteBody(RUN, "http://x", NOW + 5, "0x" + "00" * 65), MASTER.address, 403, "invalid_signature"),
    ],
)
def test_bad_invites_are_refused(body, signer, status, error) -> None:
    with pytest.raises(InviteRefused) as refused:
        _check(body, signer)
    assert (refused.value.status, refused.value.error) == (status, error)


def test_master_urls() -> None:
    assert valid_master_url("http://127.0.0.1:8080") and valid_master_url("https://master.example/prefix")
    for bad in ("", "127.0.0.1:80", "http://", "http://x:99999", "http://a b", "http://x#f", "x" * 3000):
        assert not valid_master_url(bad), bad


def test_ack_text_is_canonical() -> None:
    text = ack_text(CHAIN_ID, REGISTRY.lower(), RUN, NODE.lower(), 99)
    assert text == f"prime-invite-ack-v1\n{CHAIN_ID}\n{REGISTRY}\n{RUN}\n{NODE}\n99"
