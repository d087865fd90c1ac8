"""Master → miner task routes on a real miner: only a master of the run may use them.

The master pushes a persistent busybox task, reads its logs, its /data manifest and a
blob, and stops it; strangers get 403, unsigned callers 401, bad input 400/404.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
import pytest

from prime.auth.client import SignedClient
from prime.auth.signing import Domain
from prime.errors import PeerError
from tests.fixtures.docker import remove_prime_containers
from tests.support.miner_env import (
    MASTER_INDEX,
    VALIDATOR_INDEX,
    create_run,
    desired_entry,
    running_node,
    wait_until,
)
from tests.support.signing import peer_client

pytestmark = pytest.mark.docker

PAYLOAD = "checkpoint-42\n"
WRITER = ["sh", "-c", f"mkdir -p /data/ckpt && printf '{PAYLOAD}' > /data/ckpt/step.txt && echo wrote && echo oops >&2 && trap 'exit 0' TERM; sleep 300 & wait"]


async def _status_of(client: SignedClient, method: str, url: str, **kwargs) -> tuple[int, object]:
    try:
        return 200, await client.request(method, url, **kwargs)
    except PeerError as exc:
        return exc.status or 0, exc.body


async def test_master_routes_refuse_strangers_and_serve_the_master(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, busybox_image, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master, validator, stranger = anvil.accounts[MASTER_INDEX], anvil.accounts[VALIDATOR_INDEX], fresh_account(0)
    entry = desired_entry("writer", busybox_image, WRITER, persistent=True)
    try:
        async with running_node(anvil, deployment, run_id, node, tmp_path / "data") as miner:
            base = miner.url
            # Unsigned: 401 on every route.
            async with aiohttp.ClientSession() as session:  # no signature headers at all
                for method, path in (("GET", "/tasks"), ("POST", "/tasks"), ("DELETE", "/tasks/writer"),
                                     ("GET", "/tasks/writer/logs"), ("GET", "/tasks/writer/manifest"),
                                     ("GET", f"/tasks/writer/blobs/{'0' * 64}")):
                    async with session.request(method, base + path, json=entry if method == "POST" else None) as answer:
                        assert answer.status == 401, (method, path)
                        assert (await answer.json())["error"] == "unauthorized"
            # Signed by a non-master (a validator, a stranger): 403, and nothing starts.
            for outsider in (validator, stranger):
                async with peer_client(outsider, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
                    for method, path, body in (("GET", "/tasks", None), ("POST", "/tasks", entry), ("DELETE", "/tasks/writer", None),
                                               ("GET", "/tasks/writer/logs", None), ("GET", "/tasks/writer/manifest", None)):
                        status, answer = await _status_of(client, method, base + path, json=body)
                        assert status == 403 and answer["error"] == "forbidden", (outsider.address, method, path, answer)
            assert not docker_client.containers.list(all=True, filters={"label": f"prime.node={node.address}"}, ignore_removed=True)

            async with peer_client(master, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
                status, answer = await _status_of(client, "POST", f"{base}/tasks", json=entry)
                assert status == 200 and answer["id"] == "writer" and answer["replica"] == 0

                async def running() -> bool:
                    tasks = (await client.request("GET", f"{base}/tasks"))["tasks"]
                    return any(t["task_id"] == "writer" and t["state"] == "Running" for t in tasks)

                await wait_until(running, what="the pushed task to run")

                async def logs_complete() -> list[dict]:
                    async with client.stream("GET", f"{base}/tasks/writer/logs", params={"follow": 0, "tail": 10}) as response:
                        assert response.headers["Content-Type"].startswith("application/x-ndjson")
                        lines = [json.loads(line) for line in (await response.read()).decode().splitlines()]
                    return lines if len(lines) >= 2 else []

                lines = await wait_until(logs_complete, what="the task's output")
                assert {(line["stream"], line["line"]) for line in lines} == {("stdout", "wrote"), ("stderr", "oops")}
                assert all(line["ts"] for line in lines)

                manifest = await wait_until(
                    lambda: client.request("GET", f"{base}/tasks/writer/manifest", params={"replica": 0}), what="the manifest"
                )
                digest = hashlib.sha256(PAYLOAD.encode()).hexdigest()
                assert manifest["task_id"] == "writer" and manifest["final"] is False
                assert manifest["files"] == [{"path": "ckpt/step.txt", "size": len(PAYLOAD), "sha256": digest}]
                async with client.stream("GET", f"{base}/tasks/writer/blobs/{digest}") as response:
                    assert await response.read() == PAYLOAD.encode()

                # Bad input: 400; unknown things: 404.
                for method, path, params, expected in (
                    ("GET", "/tasks/bad..id/logs", None, 400),
                    ("GET", "/tasks/writer/logs", {"tail": "-1"}, 400),
                    ("GET", "/tasks/writer/logs", {"follow": "maybe"}, 400),
                    ("GET", f"/tasks/writer/blobs/{'z' * 64}", None, 400),
                    ("GET", f"/tasks/writer/blobs/{'0' * 64}", None, 404),
                    ("GET", "/tasks/nosuch/logs", None, 404),
                    ("GET", "/tasks/nosuch/manifest", None, 404),
                ):
                    status, answer = await _status_of(client, method, base + path, params=params)
                    assert status == expected and "error" in answer, (path, params, answer)
                for bad in ({"id": "x"}, {**entry, "spec": {"image": "Not An Image"}}, {**entry, "gpu_indices": [3]}, [1, 2]):
                    status, answer = await _status_of(client, "POST", f"{base}/tasks", json=bad)
                    assert status == 400 and answer["error"] in ("invalid_request", "invalid_json"), (bad, answer)

                # Stop: the container goes, the data stays for the master's last sync.
                status, answer = await _status_of(client, "DELETE", f"{base}/tasks/writer")
                assert status == 200 and answer == {"id": "writer", "stopped": True}
                assert not docker_client.containers.list(all=True, filters={"label": f"prime.node={node.address}"}, ignore_removed=True)
                final = await client.request("GET", f"{base}/tasks/writer/manifest")
                assert final["final"] is True and final["files"][0]["sha256"] == digest
                status, answer = await _status_of(client, "DELETE", f"{base}/tasks/writer")
                assert status == 200 and answer["stopped"] is False
    finally:
        remove_prime_containers(docker_client, node.address)
