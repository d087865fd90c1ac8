"""Every role's real app answers what its own /openapi.json says, route by route.

The apps are built by each role's build function and served on 127.0.0.1 (see
tests/web/roles.py for what is real and what stands in for chain and Docker). Each
answer, success and error alike, is validated against the schema its handler declares
for that status; a handler whose answer drifts from its declared type fails here, and so
does a documented success answer that no request below exercised.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from prime.web import endpoint_of
from tests.web.openapi_check import check_document, operation, validate_answer, validate_request
from tests.web.roles import (
    JSON,
    MASTER,
    NDJSON,
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
    validator_app,
    write_data,
)

SIGNED_ERRORS = {401, 403}
PUBLIC = ("/health", "/metrics", "/openapi.json")


async def call(served: Served, account: Any, method: str, template: str, path_qs: str | None = None,
               body: Any = None, *, expect: int) -> Any:
    """Send one request and check its answer against the app's own schema for that status."""
    path_qs = path_qs or template
    if body is not None and not isinstance(body, bytes) and expect < 400:
        validate_request(served.doc, method, template, body)
    answer = await request(served, account, method, path_qs, body)
    assert answer.status == expect, (method, path_qs, answer.status, answer.body)
    op = operation(served.doc, method, template)
    declared = op["responses"].get(str(answer.status), {}).get("content", {})
    assert answer.media in declared, (
        f"{served.role}: {method} {template} answered {answer.status} {answer.media}, its declaration has {sorted(declared)}")
    if answer.media in (JSON, NDJSON):
        validate_answer(served.doc, method, template, answer.status, answer.body, media=answer.media)
    served.seen.add((method.lower(), template, answer.status))
    return answer.body


def assert_every_success_was_checked(served: Served) -> None:
    missing = []
    for path, item in served.doc["paths"].items():
        for method, op in item.items():
            for status in op["responses"]:
                if status.isdigit() and int(status) < 300 and (method, path, int(status)) not in served.seen:
                    missing.append(f"{method.upper()} {path} {status}")
    assert not missing, f"{served.role}: documented answers no request checked: {missing}"


async def shared_routes(served: Served) -> None:
    await call(served, None, "GET", "/health", expect=200)
    await call(served, None, "GET", "/metrics", expect=200)
    await call(served, None, "GET", "/openapi.json", expect=200)


# --- the roles ---------------------------------------------------------------------------------


async def test_discovery(tmp_path: Path) -> None:
    app, close = discovery_app(tmp_path)
    served = await serve_app("discovery", app)
    try:
        check_document(served.doc)
        await shared_routes(served)
        announcement = {"ip": "10.0.0.1", "port": 8001, "run_id": RUN}
        await call(served, NODE, "PUT", "/nodes", body=announcement, expect=200)
        await call(served, None, "PUT", "/nodes", body=announcement, expect=401)
        await call(served, STRANGER, "PUT", "/nodes", body=announcement, expect=403)
        await call(served, NODE, "PUT", "/nodes", body={**announcement, "port": 0}, expect=400)
        await call(served, VALIDATOR, "GET", "/nodes/{address}", f"/nodes/{NODE.address}", expect=200)
        await call(served, VALIDATOR, "GET", "/nodes/{address}", f"/nodes/{STRANGER.address}", expect=404)
        await call(served, STRANGER, "GET", "/nodes/{address}", f"/nodes/{NODE.address}", expect=403)
        await call(served, VALIDATOR, "GET", "/nodes/{address}", "/nodes/0xnope", expect=400)
        await call(served, MASTER, "GET", "/runs/{run_id}/nodes", f"/runs/{RUN}/nodes", expect=200)
        await call(served, STRANGER, "GET", "/runs/{run_id}/nodes", f"/runs/{RUN}/nodes", expect=403)
        assert_every_success_was_checked(served)
    finally:
        await served.server.close()
        close()


async def test_miner(tmp_path: Path) -> None:
    app, executor, converger = miner_app(tmp_path)
    served = await serve_app("miner", app)
    try:
        check_document(served.doc)
        await shared_routes(served)
        # The challenge, as a validator runs it (real numpy prover, a small n).
        challenge = {"id": "c1", "seed": 42, "n": 64}
        await call(served, VALIDATOR, "POST", "/challenge", body=challenge, expect=200)
        await call(served, VALIDATOR, "POST", "/challenge", body=challenge, expect=409)
        await call(served, STRANGER, "POST", "/challenge", body=challenge, expect=403)
        await call(served, VALIDATOR, "POST", "/challenge/{id}/open", "/challenge/c1/open", {"rows": [0, 5, 63]}, expect=200)
        await call(served, VALIDATOR, "POST", "/challenge/{id}/open", "/challenge/c1/open", {"rows": [0]}, expect=404)
        await call(served, VALIDATOR, "POST", "/challenge", body={"id": "c2", "seed": 1, "n": -4}, expect=400)
        verdict = {"approved": True, "reason": "fast enough", "report_hash": "0x" + "1" * 64}
        await call(served, VALIDATOR, "POST", "/challenge/{id}/verdict", "/challenge/c1/verdict", verdict, expect=200)
        await call(served, VALIDATOR, "POST", "/challenge/{id}/verdict", "/challenge/c1/verdict",
                   {**verdict, "report_hash": "x"}, expect=400)
        # The invite, as a master sends it (real signature checks and ack; the chain is a stub).
        body = invite_body(int(time.time()) + 600)
        await call(served, MASTER, "POST", "/invite", body=body, expect=200)
        await call(served, STRANGER, "POST", "/invite", body=body, expect=403)
        # The master's task routes (real TasksApi and Converger; no containers).
        desired = {"id": "t1", "replica": 0, "attempt": 0, "gpu_indices": [],
                   "spec": {"image": "busybox:latest", "command": ["true"], "persistent": True}}
        await call(served, MASTER, "POST", "/tasks", body=desired, expect=202)
        await call(served, MASTER, "POST", "/tasks", body={**desired, "replica": "one"}, expect=400)
        await call(served, STRANGER, "POST", "/tasks", body=desired, expect=403)
        await call(served, MASTER, "GET", "/tasks", expect=200)
        lines = await call(served, MASTER, "GET", "/tasks/{id}/logs", "/tasks/t1/logs?follow=0&tail=5", expect=200)
        assert len(lines) == 3
        await call(served, MASTER, "GET", "/tasks/{id}/logs", "/tasks/t9/logs", expect=404)
        await call(served, MASTER, "GET", "/tasks/{id}/logs", "/tasks/t1/logs?follow=maybe", expect=400)
        sha = write_data(executor.root, "t1", "ckpt/step.txt", b"checkpoint\n")
        manifest = await call(served, MASTER, "GET", "/tasks/{id}/manifest", "/tasks/t1/manifest", expect=200)
        assert [f["sha256"] for f in manifest["files"]] == [sha]
        await call(served, MASTER, "GET", "/tasks/{id}/blobs/{sha256}", f"/tasks/t1/blobs/{sha}", expect=200)
        await call(served, MASTER, "GET", "/tasks/{id}/blobs/{sha256}", f"/tasks/t1/blobs/{'0' * 64}", expect=404)
        await call(served, MASTER, "DELETE", "/tasks/{id}", "/tasks/t1", expect=200)
        await call(served, MASTER, "GET", "/tasks/{id}/manifest", "/tasks/t8/manifest", expect=404)
        assert_every_success_was_checked(served)
    finally:
        await served.server.close()
        await converger.close()


async def test_master(tmp_path: Path) -> None:
    miner, executor, converger = miner_app(tmp_path)
    miner_served = await serve_app("miner", miner)
    app, service, closers = master_app(tmp_path, miner_served.url)
    served = await serve_app("master", app)
    try:
        check_document(served.doc)
        await shared_routes(served)
        beat = {"tasks": [], "gpus": [{"index": 0, "util": 10.0, "mem_used_mib": 100, "temp_c": 40.0}], "load": {"cpu": 0.5}}
        await call(served, NODE, "POST", "/heartbeat", body=beat, expect=200)
        await call(served, STRANGER, "POST", "/heartbeat", body=beat, expect=403)
        await call(served, NODE, "POST", "/heartbeat", body={**beat, "gpus": "none"}, expect=400)
        await call(served, OWNER, "GET", "/nodes", expect=200)
        await call(served, STRANGER, "GET", "/nodes", expect=403)
        spec = {"image": "busybox:latest", "command": ["sh", "-c", "echo hi"], "gpus": 0}
        task = await call(served, OWNER, "POST", "/tasks", body=spec, expect=201)
        await call(served, OWNER, "POST", "/tasks", body={"image": ""}, expect=400)
        await call(served, MASTER, "POST", "/tasks", body=spec, expect=403)
        task_id = task["id"]
        await call(served, OWNER, "GET", "/tasks", expect=200)
        await call(served, OWNER, "GET", "/tasks/{task_id}", f"/tasks/{task_id}", expect=200)
        await call(served, OWNER, "GET", "/tasks/{task_id}", "/tasks/nosuchtask", expect=404)
        await call(served, OWNER, "GET", "/tasks/{task_id}", "/tasks/no%20such", expect=400)
        # Logs: the master's merger reads them from the real miner app.
        executor.add(task_id, 0)
        lines = await call(served, OWNER, "GET", "/tasks/{task_id}/logs", f"/tasks/{task_id}/logs?follow=0", expect=200)
        assert lines and all(line["replica"] == 0 for line in lines), lines
        # Files: one synced file in the master's store.
        await sync_one_file(service, app, task_id)
        files = await call(served, OWNER, "GET", "/tasks/{task_id}/files", f"/tasks/{task_id}/files", expect=200)
        assert [f["path"] for f in files["files"]] == ["out/result.txt"]
        await call(served, OWNER, "GET", "/tasks/{task_id}/files/{path}", f"/tasks/{task_id}/files/out/result.txt", expect=200)
        await call(served, OWNER, "GET", "/tasks/{task_id}/files/{path}", f"/tasks/{task_id}/files/out/none.txt", expect=404)
        # Seed: the node the replica is placed on reads the synced copy; nobody else does.
        seed = await call(served, NODE, "GET", "/tasks/{task_id}/seed", f"/tasks/{task_id}/seed?replica=0", expect=200)
        sha = seed["files"][0]["sha256"]
        await call(served, NODE, "GET", "/tasks/{task_id}/seed/{sha256}", f"/tasks/{task_id}/seed/{sha}?replica=0", expect=200)
        await call(served, NODE, "GET", "/tasks/{task_id}/seed/{sha256}", f"/tasks/{task_id}/seed/{'0' * 64}", expect=404)
        await call(served, STRANGER, "GET", "/tasks/{task_id}/seed", f"/tasks/{task_id}/seed", expect=403)
        await call(served, NODE, "GET", "/tasks/{task_id}/seed", f"/tasks/{task_id}/seed?replica=x", expect=400)
        await call(served, OWNER, "DELETE", "/tasks/{task_id}", f"/tasks/{task_id}", expect=200)
        assert_every_success_was_checked(served)
    finally:
        await served.server.close()
        await miner_served.server.close()
        await converger.close()
        await close_all(closers)


async def sync_one_file(service: Any, app: web.Application, task_id: str) -> None:
    import hashlib

    from prime.protocol.storage import ManifestEntry
    from prime.roles.master.app import BLOBS

    payload = b"42\n"
    sha = hashlib.sha256(payload).hexdigest()

    async def chunks():  # type: ignore[no-untyped-def]
        yield payload

    await app[BLOBS].write(sha, len(payload), chunks())
    service.store.save_manifest(task_id, 0, [ManifestEntry(path="out/result.txt", size=len(payload), sha256=sha)], time.time())


async def test_validator(tmp_path: Path, anvil: Any, deployment: Any) -> None:
    app, closers = await validator_app(tmp_path, anvil, deployment)
    served = await serve_app("validator", app)
    try:
        check_document(served.doc)
        assert not declaration_problems(app)
        await shared_routes(served)
        assert_every_success_was_checked(served)
    finally:
        await served.server.close()
        await close_all(closers)


# --- every route declares its schemas ------------------------------------------------------------


def _apps(tmp: Path) -> dict[str, web.Application]:
    from tests.web.roles import discovery_app as d
    from tests.web.roles import master_app as m
    from tests.web.roles import miner_app as n

    return {"discovery": d(tmp / "d")[0], "miner": n(tmp / "n")[0], "master": m(tmp / "m", "http://127.0.0.1:9")[0]}


@pytest.mark.parametrize("role", ["discovery", "miner", "master"])
def test_every_route_declares_its_request_and_response_schemas(role: str, tmp_path: Path) -> None:
    problems = declaration_problems(_apps(tmp_path)[role])
    assert not problems, "\n".join(problems)


def declaration_problems(app: web.Application) -> list[str]:
    """What is missing from the declarations of ``app``'s routes (nothing, when all is well)."""
    from prime.web import openapi_document

    doc = openapi_document(app)
    check_document(doc)
    problems: list[str] = []
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        name = f"{route.method} {route.resource.canonical}"
        endpoint = endpoint_of(route.handler)
        if endpoint is None:
            problems.append(f"{name}: no @api declaration")
            continue
        op = operation(doc, route.method, _template(route))
        if route.method in ("POST", "PUT", "PATCH") and endpoint.request is None:
            problems.append(f"{name}: takes a body but declares no request type")
        if endpoint.request is not None and not op["requestBody"]["content"][JSON]["schema"]:
            problems.append(f"{name}: the request type has no schema")
        if not endpoint.success:
            problems.append(f"{name}: declares no success answer")
        for status in endpoint.success:
            content = op["responses"].get(str(status), {}).get("content", {})
            if not content or not all(c.get("schema") for c in content.values()):
                problems.append(f"{name} {status}: no response schema")
        if route.resource.canonical not in PUBLIC and not SIGNED_ERRORS <= set(endpoint.errors):
            problems.append(f"{name}: a signed route that does not declare 401 and 403")
    return problems


def _template(route: web.AbstractRoute) -> str:
    info = route.resource.get_info()  # type: ignore[union-attr]
    return info.get("formatter") or info.get("path") or route.resource.canonical  # type: ignore[union-attr]
