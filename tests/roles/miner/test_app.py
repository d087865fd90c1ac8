"""The miner's HTTP app on a real miner: challenge routes for validators only, the verdict,
health/metrics/openapi, and an injected (cheating) prover answering a real validator run."""

from __future__ import annotations

from pathlib import Path

import pytest

from prime.auth.signing import Domain
from prime.challenge.runner import run_challenge
from prime.errors import PeerError
from tests.challenge.cheaters import LazyProver
from tests.support.miner_env import (
    MASTER_INDEX,
    VALIDATOR_INDEX,
    create_run,
    running_node,
)
from tests.support.signing import peer_client

pytestmark = pytest.mark.docker

SMALL = {"n": 64, "dtype": "float32", "repeat": 1, "bound_s": 60.0}


async def _call(account, method: str, url: str, *, to: str, domain: Domain, **kwargs) -> tuple[int, object]:
    async with peer_client(account, to=to, domain=domain, retries=0) as client:
        try:
            return 200, await client.request(method, url, **kwargs)
        except PeerError as exc:
            return exc.status or 0, exc.body


async def test_challenge_and_verdict_are_for_validators_only(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    validator, master, stranger = anvil.accounts[VALIDATOR_INDEX], anvil.accounts[MASTER_INDEX], fresh_account(0)
    async with running_node(anvil, deployment, run_id, node, tmp_path / "data") as miner:
        body = {"id": "c-1", "seed": 7, "n": 16, "dtype": "float32", "repeat": 1}
        verdict = {"approved": True, "reason": "all checks passed", "report_hash": "0x" + "cd" * 32}
        for outsider in (master, stranger):
            status, answer = await _call(outsider, "POST", f"{miner.url}/challenge", to=miner.address, domain=Domain.of(deployment), json=body)
            assert status == 403 and answer["error"] == "forbidden"
            status, answer = await _call(outsider, "POST", f"{miner.url}/challenge/c-1/verdict", to=miner.address, domain=Domain.of(deployment), json=verdict)
            assert status == 403
        assert miner.state.verdict is None

        # A real validator run against the honest prover: approved.
        async with peer_client(validator, to=miner.address, domain=Domain.of(deployment)) as client:
            report = await run_challenge(client, miner.url, node=miner.address, specs=miner.specs, params_overrides=SMALL)
        assert report.approved, report.reason

        for bad in ({**verdict, "report_hash": "0x12"}, {**verdict, "approved": "yes"}, {"approved": True}, {**verdict, "reason": "x" * 5000}):
            status, answer = await _call(validator, "POST", f"{miner.url}/challenge/c-1/verdict", to=miner.address, domain=Domain.of(deployment), json=bad)
            assert status == 400, (bad, answer)
        status, answer = await _call(validator, "POST", f"{miner.url}/challenge/c-1/verdict", to=miner.address, domain=Domain.of(deployment), json=verdict)
        assert status == 200 and answer == {"ok": True}
        assert miner.state.verdict.approved and miner.state.verdict.validator == validator.address
        assert miner.state_file.load().verdict.reason == "all checks passed"

        # Public routes: health lists the loops, metrics and the API description are served.
        status, health = await _call(stranger, "GET", f"{miner.url}/health", to=miner.address, domain=Domain.of(deployment))
        assert status == 200 and health["status"] == "ok"
        assert {"announce", "chain", "supervise", "heartbeat"} <= set(health["loops"])
        async with peer_client(stranger, to=miner.address, domain=Domain.of(deployment)) as client:
            async with client.stream("GET", f"{miner.url}/metrics") as response:
                assert b"prime_http_requests" in await response.read()
            paths = (await client.request("GET", f"{miner.url}/openapi.json"))["paths"]
        assert {"/challenge", "/challenge/{id}/open", "/challenge/{id}/verdict", "/invite", "/tasks", "/tasks/{id}/logs"} <= set(paths)


async def test_an_injected_prover_answers_the_challenges(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    async with running_node(anvil, deployment, run_id, node, tmp_path / "data", prover=LazyProver()) as miner:
        async with peer_client(anvil.accounts[VALIDATOR_INDEX], to=miner.address, domain=Domain.of(deployment)) as client:
            report = await run_challenge(client, miner.url, node=miner.address, specs=miner.specs, params_overrides=SMALL)
    assert not report.approved
    assert report.checks.get("merkle")  # the lazy prover's paths do not match its root
