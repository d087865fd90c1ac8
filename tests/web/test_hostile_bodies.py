"""Hostile input to every role's real app (issue 11): each answer is a 4xx JSON error, never a
crash or a 500; the app answers afterwards and its records are unchanged.

Requests are signed by the key each route wants (tests/web/roles.py's ``request``), so every
attack reaches the body decoding or the query parsing of the real handlers: bodies nested
100,000 deep (~200 KB, what killed the processes), integers too large for a float or with
5,000 digits, lone UTF-16 surrogates in strings, Unicode digits in query numbers. A real
process receiving the deep body is tests/web/test_hostile_processes.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_asyncio

from tests.web.roles import (
    JSON,
    MASTER,
    NODE,
    OWNER,
    RUN,
    STRANGER,
    VALIDATOR,
    Served,
    close_all,
    discovery_app,
    invite_body,
    master_app,
    miner_app,
    request,
    serve_app,
)

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
DEEP_SMALL = b"[" * 15_000 + b"]" * 15_000  # inside every body limit (discovery's is 64 KiB)
HUGE = "9" * 401  # past any float (1e400)
LONG = "7" * 5000  # past Python's int-from-text limit (4,300 digits)
LONE = '"\\ud800"'  # a lone surrogate, as JSON writes it
UNICODE_DIGITS = ["%D9%A1%D9%A2", "%C2%B2", "%EF%BC%91", "9" * 5000, "-1", "%201", "1e3", "0x10"]  # ١٢, ², full-width 1

MARK = "@@HOSTILE@@"


def with_raw(body: dict[str, Any], path: tuple[Any, ...], raw: str) -> bytes:
    """``body`` as JSON with the value at ``path`` replaced by the raw JSON text ``raw``."""
    def put(value: Any, rest: tuple[Any, ...]) -> Any:
        if not rest:
            return MARK
        copy = dict(value) if isinstance(value, dict) else list(value)
        copy[rest[0]] = put(value[rest[0]], rest[1:])
        return copy

    return json.dumps(put(body, path)).replace(f'"{MARK}"', raw).encode()


async def refused(served: Served, account: Any, method: str, path_qs: str, body: bytes | None = None) -> dict[str, Any]:
    answer = await request(served, account, method, path_qs, body)
    assert 400 <= answer.status < 500, (served.role, method, path_qs, answer.status, answer.raw[:300])
    assert answer.media == JSON, (path_qs, answer.media, answer.raw[:300])
    assert set(answer.body) == {"error", "detail"}, answer.body
    return answer.body  # type: ignore[no-any-return]


async def alive(served: Served) -> None:
    answer = await request(served, None, "GET", "/health")
    assert answer.status == 200, answer.body


def deep_bodies(fields: list[str]) -> list[bytes]:
    """The 100,000-deep body (and one inside every body limit) as the whole body and as the value of each field."""
    return [DEEP, DEEP_OBJECT, DEEP_SMALL] + [b'{"' + f.encode() + b'": ' + deep + b"}" for f in fields
                                              for deep in (DEEP, DEEP_SMALL)]


# --- master -------------------------------------------------------------------------------------

BEAT = {"tasks": [{"id": "t1", "replica": 0, "state": "Running", "exit_code": 0, "error": "e"}],
        "gpus": [{"index": 0, "util": 10.0, "mem_used_mib": 100.0, "temp_c": 40.0}], "load": {"cpu_pct": 0.5}}
SPEC = {"image": "busybox:latest", "command": ["sh", "-c", "echo hi"], "env": {"A": "b"}, "gpus": 0,
        "cpu_limit": 1.0, "replicas": 1, "memory_limit_mib": 64}


@pytest_asyncio.fixture(loop_scope="session")
async def roles(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    miner, executor, converger = miner_app(tmp_path)
    miner_served = await serve_app("miner", miner)
    app, service, closers = master_app(tmp_path, miner_served.url)
    master_served = await serve_app("master", app)
    discovery, close_discovery = discovery_app(tmp_path)
    discovery_served = await serve_app("discovery", discovery)
    try:
        yield {"master": master_served, "service": service, "miner": miner_served, "executor": executor,
               "converger": converger, "discovery": discovery_served}
    finally:
        for served in (master_served, miner_served, discovery_served):
            await served.server.close()
        await converger.close()
        await close_all(closers)
        close_discovery()


def master_records(service: Any) -> str:
    state = service.state
    nodes = {a: n.to_json() for a, n in state.nodes.items()}
    tasks = {i: t.to_json() for i, t in state.tasks.items()}
    return json.dumps({"nodes": nodes, "tasks": tasks}, sort_keys=True)


async def test_the_master_refuses_hostile_bodies_and_keeps_its_records(roles: dict[str, Any]) -> None:
    served, service = roles["master"], roles["service"]
    assert (await request(served, NODE, "POST", "/heartbeat", BEAT)).status == 200
    created = await request(served, OWNER, "POST", "/tasks", SPEC)
    assert created.status == 201, created.body
    task_id = created.body["id"]
    before = master_records(service)

    for body in deep_bodies(["tasks", "gpus", "load"]):
        await refused(served, NODE, "POST", "/heartbeat", body)
        await refused(served, STRANGER, "POST", "/heartbeat", body)  # a key with no role at all
    for body in deep_bodies(["image", "command", "env"]):
        await refused(served, OWNER, "POST", "/tasks", body)
    numbers = [("load", "cpu_pct"), ("gpus", 0, "util"), ("gpus", 0, "mem_used_mib"), ("gpus", 0, "temp_c"),
               ("gpus", 0, "index"), ("tasks", 0, "replica"), ("tasks", 0, "exit_code")]
    for path in numbers:
        for raw in (HUGE, "-" + HUGE, LONG, "1e400"):
            await refused(served, NODE, "POST", "/heartbeat", with_raw(BEAT, path, raw))
    for path in [("tasks", 0, "error"), ("tasks", 0, "id")]:
        await refused(served, NODE, "POST", "/heartbeat", with_raw(BEAT, path, LONE))
    for path in [("cpu_limit",), ("replicas",), ("gpus",), ("memory_limit_mib",)]:
        for raw in (HUGE, LONG, "1e400"):
            await refused(served, OWNER, "POST", "/tasks", with_raw(SPEC, path, raw))
    for path in [("env", "A"), ("command", 0), ("image",)]:
        answer = await refused(served, OWNER, "POST", "/tasks", with_raw(SPEC, path, LONE))
        assert answer["error"] == "invalid_json" and "surrogate" in answer["detail"]["message"], answer
    surrogate_key = json.dumps({**SPEC, "env": {MARK: "b"}}).replace(MARK, "A\\ud800").encode()
    await refused(served, OWNER, "POST", "/tasks", surrogate_key)
    for raw in UNICODE_DIGITS:
        answer = await refused(served, OWNER, "GET", f"/tasks/{task_id}/logs?follow=0&tail={raw}")
        assert answer["detail"]["field"] == "tail", answer
        answer = await refused(served, OWNER, "GET", f"/tasks/{task_id}/files/out/x.txt?replica={raw}")
        assert answer["detail"]["field"] == "replica", answer

    await alive(served)
    assert master_records(service) == before
    assert (await request(served, NODE, "POST", "/heartbeat", BEAT)).status == 200  # still serving its nodes
    assert (await request(served, OWNER, "GET", f"/tasks/{task_id}/logs?follow=0&tail=12")).status == 200


# --- miner --------------------------------------------------------------------------------------

DESIRED = {"id": "t1", "replica": 0, "attempt": 0, "gpu_indices": [], "spec": SPEC}


def miner_records(executor: Any, converger: Any) -> str:
    running = sorted(f"{k[0]}/{k[1]}" for k in executor.running)
    return json.dumps({"running": running, "desired": sorted(map(str, getattr(converger, "desired", {}) or {}))})


async def test_the_miner_refuses_hostile_bodies_and_keeps_its_records(roles: dict[str, Any]) -> None:
    served, executor, converger = roles["miner"], roles["executor"], roles["converger"]
    assert (await request(served, MASTER, "POST", "/tasks", DESIRED)).status == 202
    executor.add("t1", 0)
    before = miner_records(executor, converger)

    for body in deep_bodies(["id", "spec", "gpu_indices"]):
        await refused(served, MASTER, "POST", "/tasks", body)
    for body in deep_bodies(["run_id", "signature"]):
        await refused(served, MASTER, "POST", "/invite", body)
        await refused(served, STRANGER, "POST", "/invite", body)  # no role needed to send it
    for body in deep_bodies(["id", "seed", "n"]):
        await refused(served, VALIDATOR, "POST", "/challenge", body)
    assert (await request(served, VALIDATOR, "POST", "/challenge", {"id": "c1", "seed": 42, "n": 64})).status == 200
    for body in deep_bodies(["rows"]):  # to the committed challenge, so the body is decoded
        answer = await refused(served, VALIDATOR, "POST", "/challenge/c1/open", body)
        assert answer["error"] in ("invalid_body", "request_entity_too_large"), answer
    for raw in (LONG, HUGE, "1e400", LONE):
        await refused(served, VALIDATOR, "POST", "/challenge/c1/open", with_raw({"rows": [0]}, ("rows", 0), raw))
    opened = await request(served, VALIDATOR, "POST", "/challenge/c1/open", {"rows": [0, 5]})
    assert opened.status == 200, opened.body  # the challenge survived every hostile open
    for body in deep_bodies(["approved", "reason"]):
        await refused(served, VALIDATOR, "POST", "/challenge/c1/verdict", body)
    for path in [("attempt",), ("replica",), ("gpu_indices",), ("spec", "cpu_limit"), ("spec", "replicas")]:
        for raw in (HUGE, LONG, "1e400", "[" + LONG + "]"):
            await refused(served, MASTER, "POST", "/tasks", with_raw(DESIRED, path, raw))
    for path in [("spec", "env", "A"), ("spec", "command", 0), ("id",)]:
        await refused(served, MASTER, "POST", "/tasks", with_raw(DESIRED, path, LONE))
    challenge = {"id": "c9", "seed": 1, "n": 64}
    for path in [("n",), ("seed",), ("repeat",)]:
        for raw in (LONG, HUGE, "-" + LONG, "1e400"):
            await refused(served, VALIDATOR, "POST", "/challenge", with_raw({**challenge, "repeat": 1}, path, raw))
    await refused(served, VALIDATOR, "POST", "/challenge", with_raw(challenge, ("id",), LONE))
    invite = invite_body(int(time.time()) + 600)
    for path, raw in [(("run_id",), LONG), (("expiry",), LONG), (("expiry",), HUGE), (("master_url",), LONE)]:
        await refused(served, MASTER, "POST", "/invite", with_raw(invite, path, raw))
    verdict = {"approved": True, "reason": "ok", "report_hash": "0x" + "1" * 64}
    await refused(served, VALIDATOR, "POST", "/challenge/c1/verdict", with_raw(verdict, ("reason",), LONE))
    for raw in UNICODE_DIGITS:
        await refused(served, MASTER, "GET", f"/tasks/t1/logs?follow=0&tail={raw}")
        await refused(served, MASTER, "GET", f"/tasks/t1/logs?follow=0&replica={raw}")
        await refused(served, MASTER, "GET", f"/tasks/t1/manifest?replica={raw}")
        await refused(served, MASTER, "GET", f"/tasks/t1/blobs/{'0' * 64}?replica={raw}")

    await alive(served)
    assert miner_records(executor, converger) == before
    answer = await request(served, VALIDATOR, "POST", "/challenge", {"id": "c2", "seed": 42, "n": 64})
    assert answer.status == 200, answer.body  # still takes a real challenge
    assert (await request(served, MASTER, "GET", "/tasks/t1/logs?follow=0&tail=12&replica=0")).status == 200


# --- discovery ----------------------------------------------------------------------------------


async def test_discovery_refuses_hostile_bodies_and_keeps_its_records(roles: dict[str, Any]) -> None:
    served = roles["discovery"]
    announcement = {"ip": "10.0.0.1", "port": 8001, "run_id": RUN}
    assert (await request(served, NODE, "PUT", "/nodes", announcement)).status == 200
    before = (await request(served, MASTER, "GET", f"/runs/{RUN}/nodes")).body

    for body in deep_bodies(["ip", "port", "run_id"]):
        await refused(served, NODE, "PUT", "/nodes", body)
        await refused(served, STRANGER, "PUT", "/nodes", body)
    for path, raw in [(("port",), LONG), (("run_id",), LONG), (("run_id",), HUGE), (("port",), "1e400"), (("ip",), LONE)]:
        await refused(served, NODE, "PUT", "/nodes", with_raw(announcement, path, raw))
    for raw in UNICODE_DIGITS:
        await refused(served, MASTER, "GET", f"/runs/{raw}/nodes")

    await alive(served)
    assert (await request(served, MASTER, "GET", f"/runs/{RUN}/nodes")).body == before
