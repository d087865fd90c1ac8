"""POST /invite on a real miner (in this event loop) with a real chain and real signatures.

A valid invite from a master of the run joins the run (joinRun by the provider) and is
acknowledged with the node's signature; every forged one is refused with 403 and sends
no transaction, so the node stays Approved.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from prime.auth.signing import Domain, recover_message
from prime.chain.types import NodeStatus
from prime.errors import PeerError
from prime.roles.miner.invite import ack_text
from prime.roles.miner.state import StateFile
from tests.support.miner_env import (
    MASTER_INDEX,
    VALIDATOR_INDEX,
    create_run,
    running_node,
    sign_invite_body,
)
from tests.support.signing import peer_client

pytestmark = pytest.mark.docker


async def _post(account, url: str, body: dict, *, to: str, domain: Domain) -> tuple[int, dict]:
    async with peer_client(account, to=to, domain=domain, retries=0) as client:
        try:
            return 200, await client.request("POST", url, json=body)
        except PeerError as exc:
            return exc.status or 0, exc.body


async def _approve(chain_client, anvil, node) -> None:
    validator = await chain_client(anvil.accounts[VALIDATOR_INDEX])
    await validator.report_validation(node.address, True, b"\x01" * 32)


async def test_valid_invite_joins_the_run_and_is_acknowledged(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node, provider = fresh_account(0), fresh_account()
    master = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    async with running_node(anvil, deployment, run_id, node, tmp_path / "data", provider=provider) as miner:
        await _approve(chain_client, anvil, node)
        body = await sign_invite_body(reader, master, run_id, node.address, "http://127.0.0.1:9/")
        status, answer = await _post(master, f"{miner.url}/invite", body, to=node.address, domain=Domain.of(deployment))
        assert status == 200, answer
        assert answer["node"] == node.address and answer["run_id"] == run_id
        assert answer["master_url"] == "http://127.0.0.1:9" and answer["tx_hash"]
        text = ack_text(reader.chain_id, reader.address, run_id, node.address, body["expiry"])
        assert recover_message(text, answer["ack"]) == node.address

        info = await reader.get_node(node.address)
        assert info.status == NodeStatus.ACTIVE and info.run_id == run_id
        joined = await reader.get_logs(deployment.block, await reader.block_number(), ["NodeJoined"])
        assert [e.args["node"] for e in joined].count(node.address) == 1
        saved = StateFile(tmp_path / "data").load()
        assert saved.master_url == "http://127.0.0.1:9" and saved.master == master.address and saved.run_id == run_id

        # The same invite again: same acknowledgement, no second transaction.
        nonce = await reader.w3.eth.get_transaction_count(provider.address)
        status, again = await _post(master, f"{miner.url}/invite", body, to=node.address, domain=Domain.of(deployment))
        assert status == 200 and again["tx_hash"] is None and again["ack"] == answer["ack"]
        assert await reader.w3.eth.get_transaction_count(provider.address) == nonce
        assert await reader.w3.eth.get_transaction_count(node.address) == 0  # the node key never pays


async def test_forged_invites_are_refused_without_a_transaction(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    other_run = await create_run(chain_client, anvil, discovery.url)  # same master, another run
    node = fresh_account()
    master, stranger = anvil.accounts[MASTER_INDEX], fresh_account(0)
    reader = await chain_client()
    url_of = "http://127.0.0.1:9"
    async with running_node(anvil, deployment, run_id, node, tmp_path / "data") as miner:
        invite_url = f"{miner.url}/invite"

        # Not approved yet: even a real master's invite cannot make it join.
        status, answer = await _post(master, invite_url, await sign_invite_body(reader, master, run_id, node.address, url_of), to=node.address, domain=Domain.of(deployment))
        assert status == 409 and answer["error"] == "not_approved"

        await _approve(chain_client, anvil, node)
        nonce = await reader.w3.eth.get_transaction_count(node.address)
        forged = {
            # Signed (invite and request) by someone who is not a master of the run.
            "not_master": (stranger, await sign_invite_body(reader, stranger, run_id, node.address, url_of)),
            # A real master's invite, but for another run.
            "wrong_run": (master, await sign_invite_body(reader, master, other_run, node.address, url_of)),
            # A real master's invite that has expired.
            "invite_expired": (master, await sign_invite_body(reader, master, run_id, node.address, url_of, expiry=int(time.time()) - 5)),
            # A real master's invite replayed by someone else.
            "signature_mismatch": (stranger, await sign_invite_body(reader, master, run_id, node.address, url_of)),
            # A stranger's invite sent by a master (the request signer and invite signer differ).
            "signature_mismatch ": (master, await sign_invite_body(reader, stranger, run_id, node.address, url_of)),
            # A master's invite for another node.
            "signature_mismatch  ": (master, await sign_invite_body(reader, master, run_id, stranger.address, url_of)),
        }
        for expected, (sender, body) in forged.items():
            status, answer = await _post(sender, invite_url, body, to=node.address, domain=Domain.of(deployment))
            assert status == 403, (expected, answer)
            assert answer["error"] == expected.strip(), (expected, answer)

        # A key with no role sends ~200 KB of nesting: a clean 400, the miner stays up.
        deep = b'{"run_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        async with peer_client(stranger, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
            with pytest.raises(PeerError) as refused:
                await client.request("POST", invite_url, data=deep)
        assert refused.value.status == 400 and refused.value.body["error"] in ("invalid_json", "invalid_body")

        async with aiohttp.ClientSession() as session:  # a request with no signature headers at all
            async with session.post(invite_url, json=await sign_invite_body(reader, master, run_id, node.address, url_of)) as unsigned:
                assert unsigned.status == 401
        for bad in ({"run_id": run_id}, {"run_id": run_id, "master_url": "ftp://x", "expiry": 1, "signature": "0x00"}, []):
            status, answer = await _post(master, invite_url, bad, to=node.address, domain=Domain.of(deployment))
            assert status == 400, (bad, answer)

        assert await reader.node_status(node.address) == NodeStatus.APPROVED
        assert await reader.w3.eth.get_transaction_count(node.address) == nonce
        assert StateFile(tmp_path / "data").load().master_url is None
        assert miner.state.master_url is None
