"""The GPUs a miner proves with reach the validator's report: the commitment names their UUIDs (the --gpu
selection, in order) and the driver; the runner records them (`gpu_uuids`, `driver`), and
`prime validator reports --json` shows them. CPU nodes and older miners name none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from prime.challenge.prover import MatmulProver, NumpyBackend
from prime.challenge.runner import ChallengeReport, run_challenge
from prime.challenge.service import ChallengeService
from prime.cli import app
from prime.protocol.challenge import CommitmentAnswer, DriverIdentity, decode
from prime.roles.validator.store import Registration, ValidatorStore
from prime.roles.validator.verdict import from_challenge
from tests.challenge.test_service import CPU, NODE_ADDRESS, N, PlainClient, challenge, post, serve

UUIDS = ["GPU-00000003-1111-2222-3333-444444444444", "GPU-00000001-1111-2222-3333-444444444444"]
DRIVER = DriverIdentity(version="550.54.15", cuda="12.4")


async def _run(service: ChallengeService) -> ChallengeReport:
    async with serve(service) as (url, session):
        return await run_challenge(PlainClient(session), url, node=NODE_ADDRESS, specs=CPU,
                                   params_overrides={"n": N, "bound_s": 30})


async def test_the_commitment_names_the_gpus_and_driver_it_was_given() -> None:
    service = ChallengeService(MatmulProver(NumpyBackend()), gpu_uuids=UUIDS, driver=DRIVER)
    async with serve(service) as (url, session):
        async with session.post(f"{url}/challenge", json=challenge()) as resp:
            assert resp.status == 200
            answer = decode(CommitmentAnswer, await resp.read())
    assert answer.gpu_uuids == UUIDS and answer.driver == DRIVER
    service.release()


async def test_a_cpu_node_names_nothing_and_sends_the_fields_not_at_all() -> None:
    service = ChallengeService(MatmulProver(NumpyBackend()), driver=DRIVER)  # a driver without GPUs: not sent
    async with serve(service) as (url, session):
        status, body = await post(session, f"{url}/challenge", json=challenge())
    assert status == 200 and "gpu_uuids" not in body and "driver" not in body
    service.release()


async def test_the_report_records_the_gpus_and_the_driver() -> None:
    report = await _run(ChallengeService(MatmulProver(NumpyBackend()), gpu_uuids=UUIDS, driver=DRIVER))
    assert report.approved, report.reason
    assert report.gpu_uuids == UUIDS  # the miner's order: its --gpu selection
    assert report.driver == {"version": "550.54.15", "cuda": "12.4"}
    data = report.to_json()
    assert data["gpu_uuids"] == UUIDS and data["driver"] == {"version": "550.54.15", "cuda": "12.4"}
    assert json.loads(report.canonical_bytes())["gpu_uuids"] == UUIDS  # covered by the on-chain report hash


async def test_a_cpu_node_report_has_empty_identity() -> None:
    report = await _run(ChallengeService(MatmulProver(NumpyBackend())))
    assert report.approved, report.reason
    assert (report.gpu_uuids, report.driver) == ([], None)
    assert report.to_json()["gpu_uuids"] == [] and report.to_json()["driver"] is None


HOSTILE = [["GPU-AAAA"], ["GPU-00000003-1111-2222-3333-444444444444\u00e9"],
           [f"GPU-{i:08x}-1111-2222-3333-444444444444" for i in range(65)]]


@pytest.mark.parametrize("uuids", HOSTILE + [UUIDS[:1] * 2])
def test_the_service_refuses_an_identity_no_commitment_could_carry(uuids: list[str]) -> None:
    with pytest.raises(ValueError):  # msgspec.ValidationError is one
        ChallengeService(MatmulProver(NumpyBackend()), gpu_uuids=uuids, driver=DRIVER)


@pytest.mark.parametrize("uuids", HOSTILE)
async def test_a_commitment_naming_gpus_wrongly_is_the_miners_failure(uuids: list[str]) -> None:
    service = ChallengeService(MatmulProver(NumpyBackend()), driver=DRIVER)
    service.gpu_uuids, service.driver = uuids, DRIVER  # a modified miner: past the service's own check
    report = await _run(service)
    assert not report.approved and report.checks["response"] is not None
    assert "malformed" in report.reason or "longer than" in report.reason
    assert report.gpu_uuids == [] and report.driver is None  # nothing recorded from an unreadable answer


async def test_prime_validator_reports_json_shows_them(tmp_path: Path) -> None:
    report = await _run(ChallengeService(MatmulProver(NumpyBackend()), gpu_uuids=UUIDS, driver=DRIVER))
    store = ValidatorStore.open(tmp_path)
    registration = Registration(NODE_ADDRESS, 1, 5, 0, "0x" + "01" * 32)
    store.enqueue([registration], 9, now=1.7e9, deadline_s=60)
    store.decide(registration.id, from_challenge(report), now=1.7e9, miner_url="http://127.0.0.1:1")
    store.close()
    result = CliRunner().invoke(app, ["validator", "reports", "--json", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, Any]] = json.loads(result.output)
    assert rows[0]["report"]["gpu_uuids"] == UUIDS
    assert rows[0]["report"]["driver"] == {"version": "550.54.15", "cuda": "12.4"}
