"""Miner routes over a real aiohttp server on loopback, and the validator's runner against them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from prime.auth.client import AnswerTooLarge, ReplyTooLarge, read_bounded
from prime.challenge.params import ChallengeParams
from prime.challenge.prover import Commitment, MatmulProver, NumpyBackend
from prime.challenge.runner import run_challenge
from prime.challenge.service import MIN_OPEN_HOLD_S, ChallengeService, add_challenge_routes
from prime.errors import PeerError
from prime.protocol.challenge import MAX_ROWS, CommitmentAnswer, OpeningAnswer, decode
from prime.web import make_app
from tests.challenge.cheaters import CorruptingProver, LazyProver, SlowProver

N = 64
CPU = {"gpu_count": 0, "ram_mib": 4096}


class CountingProver(MatmulProver):
    """Honest prover that counts commits and can be held inside commit() until released."""

    def __init__(self, *, hold: bool = False, fail: bool = False) -> None:
        super().__init__(NumpyBackend())
        self.commits = 0
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail = fail

    def commit(self, params: ChallengeParams) -> Commitment:
        self.commits += 1
        self.started.set()
        self.release.wait(timeout=20)
        if self.fail:
            raise RuntimeError("GPU fell off the bus")
        return super().commit(params)


NODE_ADDRESS = "0x" + "5a" * 20  # whose answers the runner expects (PlainClient does not check)


class PlainClient:
    """The part of SignedClient the runner uses (``request_bytes``), minus signatures (auth is tested in tests/auth)."""

    def __init__(self, session: aiohttp.ClientSession, signer: str | None = None) -> None:
        self.session = session
        self.headers = {"X-Test-Signer": signer} if signer else {}

    async def request_bytes(self, method: str, url: str, *, audience: str, json: Any = None,
                            max_response_bytes: int | None = None) -> bytes:
        async with self.session.request(method, url, json=json, headers=self.headers) as resp:
            if resp.status >= 400:
                body = await resp.json(content_type=None)
                raise PeerError(f"{method} {url} answered {resp.status}", status=resp.status, body=body)
            limit = max_response_bytes if max_response_bytes is not None else 8 << 20
            try:
                return await read_bounded(resp, limit)
            except ReplyTooLarge:
                raise AnswerTooLarge(f"{url} answered with more than {limit} bytes", limit=limit, status=resp.status) from None


@web.middleware
async def signer_from_header(request: web.Request, handler: Any) -> web.StreamResponse:
    """Stands in for the signed-request middleware: trusts a header as the signer."""
    if "X-Test-Signer" in request.headers:
        request["signer"] = request.headers["X-Test-Signer"]
    return await handler(request)


@contextlib.asynccontextmanager
async def serve(service: ChallengeService, require_validator: Any = None,
                **server_options: Any) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    app = make_app(name="test-challenge", middlewares=[signer_from_header])  # JSON errors, as a miner's app
    add_challenge_routes(app, service, require_validator)

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/ping", ping)
    server = TestServer(app, host="127.0.0.1", **server_options)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield str(server.make_url("")).rstrip("/"), session
    finally:
        await server.close()


def challenge(**change: Any) -> dict[str, Any]:
    return {"id": "c1", "seed": 42, "n": N, "dtype": "float32", "repeat": 1, **change}


async def post(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.post(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


# ---------------------------------------------------------------- bad input: 4xx JSON, nothing held
@pytest.mark.parametrize("kwargs, error", [
    ({"json": challenge(n=0)}, "invalid_body"),
    ({"json": challenge(n=-5)}, "invalid_body"),
    ({"json": challenge(n=10**9)}, "invalid_body"),
    ({"json": challenge(n=4096)}, "challenge_too_large"),  # beyond the 1 MiB this node allows
    ({"json": challenge(dtype="float64")}, "invalid_body"),
    ({"json": challenge(dtype="int8")}, "invalid_body"),
    ({"json": challenge(id="no spaces")}, "invalid_body"),
    ({"json": challenge(seed=1 << 64)}, "invalid_body"),
    ({"json": challenge(n=32768, repeat=128)}, "invalid_body"),  # n·repeat = 2**22 > MAX_INNER
    ({"json": challenge(extra=1)}, "invalid_body"),
    ({"json": {"id": "c1", "n": 8}}, "invalid_body"),
    ({"json": [1, 2, 3]}, "invalid_body"),
    ({"data": b"{not json"}, "invalid_body"),
    ({"data": b""}, "invalid_body"),
    ({"data": b'{"id": "c1", "seed": 1, "n": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"}, "invalid_body"),
])
async def test_invalid_challenges_get_4xx_json_and_allocate_nothing(kwargs: dict[str, Any], error: str) -> None:
    prover = CountingProver()
    service = ChallengeService(prover, memory_limit_bytes=1 << 20)
    async with serve(service) as (url, session):
        status, body = await post(session, f"{url}/challenge", **kwargs)
    assert status == 400 and body["error"] == error and body["detail"]
    assert prover.commits == 0 and not service.holds_arrays()


async def test_open_rejects_bad_ids_and_rows_but_keeps_the_challenge() -> None:
    service = ChallengeService(CountingProver())
    async with serve(service) as (url, session):
        async with session.post(f"{url}/challenge", json=challenge()) as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            commitment = decode(CommitmentAnswer, await resp.read())
        assert (commitment.id, commitment.n, len(commitment.root)) == ("c1", N, 32)
        bad = [
            ("other", {"rows": [1]}, 404, "unknown_challenge"),
            ("c1", {"rows": [N]}, 400, "invalid_rows"),  # a valid index, but not of this challenge
            ("c1", {"rows": list(range(N + 1))}, 400, "invalid_rows"),
            ("c1", {"rows": [-1]}, 400, "invalid_body"),
            ("c1", {"rows": [40000]}, 400, "invalid_rows"),  # a row of a 2-part challenge, not of this one
            ("c1", {"rows": [MAX_ROWS]}, 400, "invalid_body"),  # past any challenge
            ("c1", {"rows": []}, 400, "invalid_body"),
            ("c1", {"rows": [1, 1]}, 400, "invalid_body"),
            ("c1", {"rows": ["1"]}, 400, "invalid_body"),
            ("c1", {"rows": [True]}, 400, "invalid_body"),
            ("c1", {"rows": [1.0]}, 400, "invalid_body"),
            ("c1", {"rows": list(range(4097))}, 400, "invalid_body"),
            ("c1", {"nope": 1}, 400, "invalid_body"),
            ("c1", {"rows": [1], "nope": 1}, 400, "invalid_body"),
        ]
        for ident, payload, want_status, want_error in bad:
            status, body = await post(session, f"{url}/challenge/{ident}/open", json=payload)
            assert (status, body["error"]) == (want_status, want_error), payload
            assert body["detail"] and service.holds_arrays()
        status, body = await post(session, f"{url}/challenge/c1/open", data=b"][")
        assert (status, body["error"]) == (400, "invalid_body")
        async with session.post(f"{url}/challenge/c1/open", json={"rows": [0, N - 1]}) as resp:
            assert resp.status == 200
            answer = decode(OpeningAnswer, await resp.read())
        assert answer.id == "c1" and [r.index for r in answer.rows] == [0, N - 1]
        assert all(len(r.values) == 4 * N and len(r.path) == 6 for r in answer.rows)
        assert not service.holds_arrays()  # memory released after the opening
        status, body = await post(session, f"{url}/challenge/c1/open", json={"rows": [0]})
        assert (status, body["error"]) == (404, "unknown_challenge")  # one opening per challenge


async def test_second_challenge_while_one_runs_is_409_and_the_loop_stays_live() -> None:
    prover = CountingProver(hold=True)
    service = ChallengeService(prover)
    async with serve(service) as (url, session):
        first = asyncio.create_task(post(session, f"{url}/challenge", json=challenge()))
        await asyncio.to_thread(prover.started.wait, 10)
        async with session.get(f"{url}/ping") as resp:  # the matmul runs off the event loop
            assert resp.status == 200
        status, body = await post(session, f"{url}/challenge", json=challenge(id="c2"))
        assert (status, body["error"]) == (409, "challenge_in_progress")
        status, body = await post(session, f"{url}/challenge/c1/open", json={"rows": [0]})
        assert (status, body["error"]) == (409, "challenge_not_committed")
        prover.release.set()
        status, _ = await first
        assert status == 200 and prover.commits == 1
        # still busy until the first one is opened
        status, body = await post(session, f"{url}/challenge", json=challenge(id="c2"))
        assert status == 409 and prover.commits == 1
        await post(session, f"{url}/challenge/c1/open", json={"rows": [3]})
        status, _ = await post(session, f"{url}/challenge", json=challenge(id="c2"))
        assert status == 200 and prover.commits == 2


async def test_unopened_challenge_is_freed_after_the_timeout() -> None:
    service = ChallengeService(CountingProver(), open_timeout_s=0.2)
    async with serve(service) as (url, session):
        status, _ = await post(session, f"{url}/challenge", json=challenge())
        assert status == 200 and service.holds_arrays()
        for _ in range(50):
            if not service.holds_arrays():
                break
            await asyncio.sleep(0.05)
        assert not service.holds_arrays()
        status, body = await post(session, f"{url}/challenge/c1/open", json={"rows": [0]})
        assert (status, body["error"]) == (404, "unknown_challenge")


async def test_a_validator_hanging_up_mid_compute_frees_the_node_when_the_work_ends() -> None:
    prover = CountingProver(hold=True)
    service = ChallengeService(prover)
    async with serve(service, handler_cancellation=True) as (url, session):
        async with aiohttp.ClientSession() as impatient:  # closing it drops the connection
            with pytest.raises(asyncio.TimeoutError):
                await post(impatient, f"{url}/challenge", json=challenge(),
                           timeout=aiohttp.ClientTimeout(total=0.3))
        await asyncio.sleep(0.2)
        assert service.holds_arrays()  # the thread is still computing: still busy
        prover.release.set()
        for _ in range(100):
            if not service.holds_arrays():
                break
            await asyncio.sleep(0.05)
        assert not service.holds_arrays()
        status, _ = await post(session, f"{url}/challenge", json=challenge(id="c2"))
        assert status == 200


async def test_prover_failure_is_a_json_500_and_frees_the_node() -> None:
    prover = CountingProver(fail=True)
    service = ChallengeService(prover)
    async with serve(service) as (url, session):
        status, body = await post(session, f"{url}/challenge", json=challenge())
        assert (status, body["error"]) == (500, "prover_failed")
        assert not service.holds_arrays()
        prover.fail = False
        status, _ = await post(session, f"{url}/challenge", json=challenge())
        assert status == 200


async def test_only_the_challenging_validator_may_open() -> None:
    service = ChallengeService(CountingProver())
    async with serve(service) as (url, session):
        status, _ = await post(session, f"{url}/challenge", json=challenge(), headers={"X-Test-Signer": "0xA"})
        assert status == 200
        status, body = await post(session, f"{url}/challenge/c1/open", json={"rows": [0]},
                                  headers={"X-Test-Signer": "0xB"})
        assert (status, body["error"]) == (403, "not_your_challenge") and service.holds_arrays()
        status, _ = await post(session, f"{url}/challenge/c1/open", json={"rows": [0]},
                               headers={"X-Test-Signer": "0xA"})
        assert status == 200


async def test_routes_are_wrapped_by_the_validator_check() -> None:
    def require_validator(handler: Any) -> Any:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if request.get("signer") != "0xVALIDATOR":
                return web.json_response({"error": "forbidden", "detail": None}, status=403)
            return await handler(request)
        return wrapped

    prover = CountingProver()
    service = ChallengeService(prover)
    async with serve(service, require_validator) as (url, session):
        status, _ = await post(session, f"{url}/challenge", json=challenge(), headers={"X-Test-Signer": "0xB"})
        assert status == 403 and prover.commits == 0
        status, _ = await post(session, f"{url}/challenge/c1/open", json={"rows": [0]})
        assert status == 403
        status, _ = await post(session, f"{url}/challenge", json=challenge(),
                               headers={"X-Test-Signer": "0xVALIDATOR"})
        assert status == 200


# ---------------------------------------------------------------- the runner against real routes
async def run_against(prover: Any, overrides: dict[str, Any]) -> tuple[Any, ChallengeService]:
    service = ChallengeService(prover)
    async with serve(service) as (url, session):
        report = await run_challenge(PlainClient(session), url, node=NODE_ADDRESS, specs=CPU,
                                     params_overrides={"n": N, **overrides})
    return report, service


async def test_honest_miner_is_approved_and_frees_its_memory() -> None:
    report, service = await run_against(MatmulProver(NumpyBackend()), {"bound_s": 30})
    assert report.approved, report.reason
    assert all(problem is None for problem in report.checks.values())
    assert report.checked_entries == report.k * report.m and 0 < report.checked_rows <= N
    assert report.miner_elapsed_s is not None and report.elapsed_s <= report.bound_s
    assert not service.holds_arrays()


@pytest.mark.parametrize("make_prover, overrides, failing_check", [
    (lambda: CorruptingProver(fraction=0.10), {"bound_s": 30}, "entries"),
    (LazyProver, {"bound_s": 30}, "merkle"),
    (lambda: SlowProver(delay_s=0.8), {"bound_s": 0.3}, "time"),
])
async def test_each_cheater_is_rejected_by_exactly_its_check(make_prover: Any, overrides: dict[str, Any],
                                                            failing_check: str) -> None:
    report, service = await run_against(make_prover(), overrides)
    assert not report.approved
    # Only this check fails: were it removed, the cheater would be approved.
    assert [name for name, problem in report.checks.items() if problem] == [failing_check]
    assert report.reason == report.checks[failing_check]
    assert not service.holds_arrays()


async def test_runner_raises_when_the_miner_is_busy_and_rejects_a_refusal() -> None:
    prover = CountingProver(hold=True)
    service = ChallengeService(prover)
    async with serve(service) as (url, session):
        first = asyncio.create_task(post(session, f"{url}/challenge", json=challenge(id="busy")))
        await asyncio.to_thread(prover.started.wait, 10)
        with pytest.raises(PeerError) as caught:
            await run_challenge(PlainClient(session), url, node=NODE_ADDRESS, specs=CPU, params_overrides={"n": N})
        assert caught.value.status == 409
        prover.release.set()
        await first
    small = ChallengeService(CountingProver(), memory_limit_bytes=1024)
    async with serve(small) as (url, session):
        report = await run_challenge(PlainClient(session), url, node=NODE_ADDRESS, specs=CPU, params_overrides={"n": N})
    assert not report.approved and "refused" in report.reason


# ---------------------------------------------------------------- orphaned challenges (issue 13)
async def test_the_same_validator_asking_again_replaces_its_committed_challenge(caplog: Any) -> None:
    prover = CountingProver()
    service = ChallengeService(prover)
    a, b = {"X-Test-Signer": "0xAbC"}, {"X-Test-Signer": "0xB"}
    async with serve(service) as (url, session):
        status, _ = await post(session, f"{url}/challenge", json=challenge(), headers=a)
        assert status == 200 and service.active_id == "c1"
        # Another validator: still 409, and it reads no body (it cannot push the first aside).
        status, body = await post(session, f"{url}/challenge", json=challenge(id="c2"), headers=b)
        assert (status, body["error"], body["detail"]) == (409, "challenge_in_progress", {"id": "c1"})
        status, _ = await post(session, f"{url}/challenge", data=b"{not json", headers=b)
        assert status == 409
        # Unsigned, or the same validator with the same id: no replacement either.
        assert (await post(session, f"{url}/challenge", json=challenge(id="c2")))[0] == 409
        assert (await post(session, f"{url}/challenge", json=challenge(), headers=a))[0] == 409
        assert prover.commits == 1
        # The same validator (any spelling of its address) with a new id: replaced at once.
        with caplog.at_level("WARNING", logger="prime.challenge.service"):
            status, body = await post(session, f"{url}/challenge", json=challenge(id="c2"),
                                      headers={"X-Test-Signer": "0xabc"})
        assert status == 200 and body["id"] == "c2" and prover.commits == 2 and service.active_id == "c2"
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "replaced" in warnings[0].getMessage() and warnings[0].exc_info is None
        status, body = await post(session, f"{url}/challenge/c1/open", json={"rows": [0]}, headers=a)
        assert (status, body["error"]) == (404, "unknown_challenge")
        status, _ = await post(session, f"{url}/challenge/c2/open", json={"rows": [0]}, headers=a)
        assert status == 200 and not service.holds_arrays()


async def test_the_same_validator_asking_again_orphans_a_challenge_still_computing(caplog: Any) -> None:
    prover = CountingProver(hold=True)
    service = ChallengeService(prover)  # holds a commitment 10 s at least: the orphan must not wait for that
    a, b = {"X-Test-Signer": "0xA"}, {"X-Test-Signer": "0xB"}
    async with serve(service) as (url, session):
        first = asyncio.create_task(post(session, f"{url}/challenge", json=challenge(), headers=a))
        await asyncio.to_thread(prover.started.wait, 10)
        with caplog.at_level("WARNING", logger="prime.challenge.service"):
            for _ in range(3):  # the restarted validator retries: one WARNING, not one per retry
                status, body = await post(session, f"{url}/challenge", json=challenge(id="c2"), headers=a)
                assert (status, body["error"], body["detail"]) == (409, "challenge_in_progress",
                                                                   {"id": "c1", "orphaned": True})
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "orphaned" in warnings[0].getMessage() and warnings[0].exc_info is None
        status, body = await post(session, f"{url}/challenge", json=challenge(id="c3"), headers=b)
        assert (status, body["detail"]) == (409, {"id": "c1"})  # another validator: plain busy
        assert prover.commits == 1  # never two computations at once
        prover.release.set()
        status, body = await first
        assert (status, body["error"]) == (409, "challenge_cancelled")  # its result is discarded ...
        assert not service.holds_arrays()                                # ... and freed at once
        status, body = await post(session, f"{url}/challenge", json=challenge(id="c2"), headers=a)
        assert status == 200 and body["id"] == "c2"
        status, _ = await post(session, f"{url}/challenge/c2/open", json={"rows": [1]}, headers=a)
        assert status == 200


def test_an_unopened_commitment_is_held_twice_its_compute_time_within_stated_bounds() -> None:
    service = ChallengeService(CountingProver())
    assert (service.open_timeout_s, MIN_OPEN_HOLD_S) == (30.0, 10.0)
    assert [service.hold_s(t) for t in (0.0, 1.0, 7.0, 15.0, 600.0)] == [10.0, 10.0, 14.0, 30.0, 30.0]
    assert ChallengeService(CountingProver(), open_timeout_s=0.2).hold_s(5.0) == 0.2


async def test_an_expired_commitment_is_logged_once_at_warning(caplog: Any) -> None:
    service = ChallengeService(CountingProver(), open_timeout_s=0.1)
    async with serve(service) as (url, session):
        with caplog.at_level("INFO", logger="prime.challenge.service"):
            status, _ = await post(session, f"{url}/challenge", json=challenge())
            assert status == 200
            for _ in range(50):
                if not service.holds_arrays():
                    break
                await asyncio.sleep(0.05)
    assert not service.holds_arrays()
    records = [r for r in caplog.records if r.name == "prime.challenge.service"]
    assert [r.levelname for r in records] == ["WARNING"] and records[0].exc_info is None
    assert "not opened within 0.1 s" in records[0].getMessage()
