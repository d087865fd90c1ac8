"""The validator's runner against miners that answer with anything: every bad answer is a
rejecting report (the miner's failure), never an exception of the validator's."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from prime.challenge.prover import MatmulProver, NumpyBackend
from prime.challenge.runner import ChallengeReport, run_challenge
from prime.challenge.service import ChallengeService, add_challenge_routes
from prime.errors import PeerError
from prime.protocol.challenge import ChallengeRequest, OpeningAnswer, decode, encode
from prime.web import make_app
from tests.challenge.test_service import NODE_ADDRESS, PlainClient

N = 64
CPU = {"gpu_count": 0, "ram_mib": 4096}
Answer = Callable[[dict[str, Any]], bytes]  # the challenge's JSON → the body to answer with


async def against(commit: Answer | None = None, open_: Answer | None = None) -> ChallengeReport:
    """Run a challenge against a real ChallengeService whose answers ``commit``/``open_`` replace."""
    service = ChallengeService(MatmulProver(NumpyBackend()))
    app = make_app(name="hostile-miner")
    add_challenge_routes(app, service)
    sent: dict[str, Any] = {}

    @web.middleware
    async def rewrite(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        body = await request.read()
        answer = await handler(request)
        if request.path == "/challenge":
            sent.update(json.loads(body))
            if commit is not None:
                return web.Response(body=commit(dict(sent)), content_type="application/json")
        elif open_ is not None:
            assert isinstance(answer, web.Response) and isinstance(answer.body, bytes)
            return web.Response(body=open_({**sent, "honest": answer.body}), content_type="application/json")
        return answer

    app.middlewares.append(rewrite)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            return await run_challenge(PlainClient(session), str(server.make_url("")), node=NODE_ADDRESS, specs=CPU,
                                       params_overrides={"n": N, "bound_s": 30})
    finally:
        await server.close()


def commitment(sent: dict[str, Any], **change: Any) -> bytes:
    body = {"id": sent["id"], "root": base64.b64encode(bytes(32)).decode(), "n": sent["n"],
            "dtype": sent["dtype"], "repeat": sent["repeat"], "elapsed_s": 0.1, "backend": "numpy", **change}
    return json.dumps(body).encode()


def rejected_for_its_answer(report: ChallengeReport, words: str) -> None:
    assert not report.approved and report.checks["response"] is not None, report.checks
    assert words in report.checks["response"], report.checks["response"]
    assert "entries" not in report.checks


async def test_the_honest_miner_through_the_rewriting_app_is_approved() -> None:
    report = await against()
    assert report.approved, report.reason


@pytest.mark.parametrize("answer, words", [
    (lambda s: b"", "malformed"),
    (lambda s: b"not json", "malformed"),
    (lambda s: b"[" * 3000, "malformed"),
    (lambda s: commitment(s, root="00" * 32), "malformed"),
    (lambda s: commitment(s, elapsed_s="fast"), "malformed"),
    (lambda s: commitment(s, n=True), "malformed"),
    (lambda s: commitment(s, id="someone-else"), "different challenge id"),
    (lambda s: commitment(s, n=s["n"] * 2), "not the n=64"),
    (lambda s: commitment(s, backend="[" * 2000), "malformed"),
    (lambda s: b" " * 5000 + commitment(s), "longer than the 4096 bytes"),
])
async def test_a_bad_commitment_is_the_miners_failure(answer: Answer, words: str) -> None:
    rejected_for_its_answer(await against(commit=answer), words)


def opening(sent: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> bytes:
    honest = json.loads(sent["honest"])
    change(honest)
    return json.dumps(honest).encode()


def shorten_a_row(body: dict[str, Any]) -> None:
    row = body["rows"][0]
    row["values"] = base64.b64encode(base64.b64decode(row["values"])[:-4]).decode()


def lengthen_a_row(body: dict[str, Any]) -> None:
    row = body["rows"][0]
    row["values"] = base64.b64encode(base64.b64decode(row["values"]) + b"\0\0").decode()


@pytest.mark.parametrize("answer, words", [
    (lambda s: opening(s, shorten_a_row), "must be 256 bytes (64 float32), not 252"),
    (lambda s: opening(s, lengthen_a_row), "not 258"),
    (lambda s: opening(s, lambda b: b["rows"][0].update(values="@@@@")), "malformed"),
    (lambda s: opening(s, lambda b: b["rows"][0].update(values=[1.0] * N)), "malformed"),
    (lambda s: opening(s, lambda b: b["rows"].append(b["rows"][0])), "opened twice"),
    (lambda s: opening(s, lambda b: b.update(id="other")), "different challenge id"),
    (lambda s: opening(s, lambda b: b.update(extra=1)), "unknown field"),
    (lambda s: b'{"id": "x", "rows": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "malformed"),
    (lambda s: b"{}", "malformed"),
    (lambda s: b"\xff" * 100, "malformed"),
    (lambda s: s["honest"] + b" " * 2_000_000, "longer than"),
])
async def test_a_bad_opening_is_the_miners_failure(answer: Answer, words: str) -> None:
    rejected_for_its_answer(await against(open_=answer), words)


async def test_an_error_instead_of_an_opening_is_a_failure_and_busy_is_a_retry() -> None:
    def refuse(_: dict[str, Any]) -> bytes:
        raise web.HTTPBadRequest(text="no")

    def busy(_: dict[str, Any]) -> bytes:
        raise web.HTTPConflict(text="another challenge runs")

    rejected_for_its_answer(await against(open_=refuse), "failed to open its rows")
    with pytest.raises(PeerError) as caught:
        await against(commit=busy)
    assert caught.value.status == 409


def test_the_wire_helpers_used_here_agree_with_the_protocol() -> None:
    sent = {"id": "abc", "seed": 1, "n": N, "dtype": "float32", "repeat": 1}
    assert decode(ChallengeRequest, json.dumps(sent).encode()).n == N
    assert decode(OpeningAnswer, encode(OpeningAnswer(id="abc", rows=[]))).rows == []
    assert json.loads(commitment(sent))["id"] == "abc"
