"""Heartbeats from a real miner to a test master, and the containers they make it run.

The test master is a small aiohttp server behind the real signature middleware; it
answers each heartbeat with the desired list the test sets (a busybox task), and the
miner starts, reports and stops real Docker containers accordingly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import pytest

from prime.auth.signing import Domain
from prime.errors import PeerError
from prime.protocol.heartbeat import HeartbeatRequest
from prime.roles.miner.state import StateFile
from tests.fixtures.docker import remove_prime_containers
from tests.support.miner_env import (
    MASTER_INDEX,
    SLEEPER,
    VALIDATOR_INDEX,
    TestMaster,
    create_run,
    desired_entry,
    free_port_range,
    running_node,
    sign_invite_body,
    wait_until,
)
from tests.support.signing import peer_client

pytestmark = pytest.mark.docker


def _containers(docker_client, node: str, task_id: str) -> list:
    # ignore_removed: the miner may remove a container between Docker's list and its inspect.
    labels = [f"prime.node={node}", f"prime.task_id={task_id}"]
    return docker_client.containers.list(all=True, filters={"label": labels}, ignore_removed=True)


async def test_heartbeats_reach_the_master_and_run_its_desired_tasks(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, busybox_image, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    master = await TestMaster(anvil.accounts[MASTER_INDEX], Domain.of(deployment), interval_s=0.3).start()
    try:
        task_ports = free_port_range(4)  # checked free at start, then offered in every beat
        async with running_node(anvil, deployment, run_id, node, tmp_path / "data", task_ports=task_ports) as miner:
            await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x02" * 32)
            async with peer_client(master_account, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
                await client.request("POST", f"{miner.url}/invite", json=await sign_invite_body(reader, master_account, run_id, node.address, master.url))

            await master.wait_for(lambda: len(master.heartbeats) >= 2)
            signer, body = master.heartbeats[-1]
            assert signer == node.address
            parsed = HeartbeatRequest.from_json(body)  # the master's own strict parser accepts it
            assert parsed.tasks == () and parsed.gpus == () and "cpu_pct" in parsed.load
            assert parsed.task_ports == task_ports

            # The master wants a long task: the miner starts its container and reports it Running.
            master.desired = [desired_entry("sleeper", busybox_image, SLEEPER)]
            await master.wait_for(lambda: any(r["state"] == "Running" for r in master.reports("sleeper")))
            (container,) = _containers(docker_client, node.address, "sleeper")
            container.reload()
            assert container.status == "running" and container.name == f"prime-{miner.executor.instance[:8]}-sleeper-r0-a0"
            assert container.labels["prime.instance"] == miner.executor.instance
            assert container.attrs["HostConfig"]["NetworkMode"] == "none"

            # A short task next to it: reported Completed with its exit code.
            master.desired.append(desired_entry("hello", busybox_image, ["echo", "hello"]))
            await master.wait_for(lambda: any(r["state"] == "Completed" and r["exit_code"] == 0 for r in master.reports("hello")))

            # A group member (issue 15) with the master's env and ports: on the host's network; one on a port
            # outside --task-ports is refused, in the report.
            first, last = task_ports
            for task_id, ports in (("member", [first, first + 1]), ("stray", [last + 1])):
                member = desired_entry(task_id, busybox_image, ["sh", "-c", "echo rank=$NODE_RANK"])
                member["spec"]["group"] = {"nodes": 2}
                master.desired.append({**member, "env": {"NODE_RANK": "1"}, "ports": ports})
            await master.wait_for(lambda: any(r["state"] == "Completed" for r in master.reports("member")))
            (container,) = _containers(docker_client, node.address, "member")
            assert container.attrs["HostConfig"]["NetworkMode"] == "host" and container.logs().decode() == "rank=1\n"
            stray = master.reports("stray")[-1]
            assert stray["state"] == "Failed" and f"port {last + 1}, outside this node's --task-ports" in stray["error"]
            master.desired = master.desired[:2]

            # The master stops listing both: the running one is stopped, the finished one kept (its logs stay readable).
            master.desired = []
            await wait_until(lambda: not _containers(docker_client, node.address, "sleeper"), what="the undesired task to stop")
            assert len(_containers(docker_client, node.address, "hello")) == 1

            saved = StateFile(tmp_path / "data").load()
            assert saved.last_heartbeat_at is not None and saved.heartbeat_interval_s == pytest.approx(0.3)
            assert miner.heartbeat.beats >= 3
    finally:
        await master.stop()
        remove_prime_containers(docker_client, node.address)


async def test_heartbeat_failures_are_recorded_and_heartbeats_resume(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    master = await TestMaster(anvil.accounts[MASTER_INDEX], Domain.of(deployment), interval_s=0.3).start()
    async with running_node(anvil, deployment, run_id, node, tmp_path / "data") as miner:
        await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x03" * 32)
        async with peer_client(master_account, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
            await client.request("POST", f"{miner.url}/invite", json=await sign_invite_body(reader, master_account, run_id, node.address, master.url))
        await master.wait_for(lambda: len(master.heartbeats) >= 1)

        await master.stop()  # the master goes away: heartbeats fail, the miner records it and stays up
        await wait_until(lambda: miner.state.last_heartbeat_error is not None, what="a failed heartbeat")
        async with peer_client(node, to=miner.address, domain=Domain.of(deployment)) as client:
            health = await client.request("GET", f"{miner.url}/health")
        assert health["loops"]["heartbeat"]["consecutive_failures"] >= 1
        assert StateFile(tmp_path / "data").load().last_heartbeat_error

        back = await TestMaster(anvil.accounts[MASTER_INDEX], Domain.of(deployment), interval_s=0.3).start(port=master.port)  # restarted on the same URL
        try:
            await back.wait_for(lambda: len(back.heartbeats) >= 1)
            await wait_until(lambda: miner.state.last_heartbeat_error is None, what="the error to clear")

            async def healthy() -> bool:  # the loop ticks /health just after the beat that cleared the error
                async with peer_client(node, to=miner.address, domain=Domain.of(deployment)) as client:
                    health = await client.request("GET", f"{miner.url}/health")
                return health["status"] == "ok" and health["loops"]["heartbeat"]["consecutive_failures"] == 0

            await wait_until(healthy, what="/health to show the heartbeat loop recovered")
        finally:
            await back.stop()


def _image_only_in_registry(docker_client, busybox_image: str, local_registry: str) -> str:
    """An image that exists only in the local registry (so the miner must really pull it)."""
    payload = os.urandom(256 * 1024)
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", f"FROM {busybox_image}\nCOPY payload /payload\n".encode()), ("payload", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    repository, tag = f"{local_registry}/prime-miner-pull", uuid.uuid4().hex[:12]
    built, _ = docker_client.images.build(fileobj=context, custom_context=True, tag=f"{repository}:{tag}", network_mode="none", rm=True)
    for event in docker_client.images.push(repository, tag=tag, stream=True, decode=True):
        assert "error" not in event, event
    docker_client.images.remove(built.id, force=True)
    return f"{repository}:{tag}"


async def test_a_desired_task_with_a_missing_image_is_pulled_with_progress_shown(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, busybox_image, local_registry, tmp_path: Path
) -> None:
    image = _image_only_in_registry(docker_client, busybox_image, local_registry)
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    master = await TestMaster(anvil.accounts[MASTER_INDEX], Domain.of(deployment), interval_s=0.3).start()
    master.desired = [desired_entry("pulled", image, ["sh", "-c", "test -f /payload"])]
    try:
        async with running_node(anvil, deployment, run_id, node, tmp_path / "data", allow_registries=(local_registry,)) as miner:
            await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x06" * 32)
            async with peer_client(master_account, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
                await client.request("POST", f"{miner.url}/invite", json=await sign_invite_body(reader, master_account, run_id, node.address, master.url))
            await master.wait_for(lambda: any(r["state"] == "Completed" for r in master.reports("pulled")), timeout_s=60)
            output = miner.console.file.getvalue()
            assert f"Pulling {image}" in output, output
            # not a terminal: a start line and an end line with the bytes and layers pulled (no bar)
            assert f"Pulled {image} (" in output and " layers)" in output, output
            assert "\x1b[" not in output, output
    finally:
        await master.stop()
        remove_prime_containers(docker_client, node.address)
        with contextlib.suppress(Exception):
            docker_client.images.remove(image, force=True)


async def test_the_miner_obeys_only_answers_its_master_signed(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, busybox_image, tmp_path: Path
) -> None:
    """Whoever answers the heartbeat (an unsigned server, another key, a master removed on chain)
    cannot make the node run a container: only answers signed by the master it joined count."""
    from aiohttp import web

    from prime.auth.signing import HEADER_NONCE, sign_answer
    from prime.web import bound_port, serve

    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    domain = Domain.of(deployment)
    impostor = fresh_account(0)
    evil = {"interval_s": 0.3, "desired": [desired_entry("evil", busybox_image, SLEEPER)]}
    seen: list[str] = []
    mode = {"sign_as": None}

    async def heartbeat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Prime-Address", ""))
        body = json.dumps(evil).encode()
        headers = {}
        if mode["sign_as"] is not None:  # signed properly, for this very request, but by the wrong key
            headers = sign_answer(mode["sign_as"], request.headers[HEADER_NONCE], 200, body, domain)
        return web.Response(body=body, content_type="application/json", headers=headers)

    app = web.Application()
    app.router.add_post("/heartbeat", heartbeat)
    runner = await serve(app, host="127.0.0.1", port=0)
    fake_url = f"http://127.0.0.1:{bound_port(runner)}"
    reader = await chain_client()
    try:
        async with running_node(anvil, deployment, run_id, node, tmp_path / "data") as miner:
            await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x05" * 32)
            # The real master invites the node, but names a URL where something else answers.
            async with peer_client(master_account, to=miner.address, domain=domain, retries=0) as client:
                await client.request("POST", f"{miner.url}/invite", json=await sign_invite_body(reader, master_account, run_id, node.address, fake_url))
            await wait_until(lambda: len(seen) >= 2, what="heartbeats to the unsigned server")
            await wait_until(lambda: "not signed" in (miner.store.state.last_heartbeat_error or ""), what="the refusal")
            mode["sign_as"] = impostor
            count = len(seen)
            await wait_until(lambda: len(seen) >= count + 2, timeout_s=60, what="heartbeats to the impostor")
            await wait_until(lambda: f"signed by {impostor.address}" in (miner.store.state.last_heartbeat_error or ""), timeout_s=60,
                             what="the impostor's answer refused")
            assert miner.heartbeat.beats == 0  # no answer was taken
            assert not _containers(docker_client, node.address, "evil")
    finally:
        await runner.cleanup()
        remove_prime_containers(docker_client, node.address)


async def test_a_master_removed_on_chain_is_no_longer_obeyed(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, busybox_image, tmp_path: Path
) -> None:
    from tests.support.miner_env import BUYER_INDEX

    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    master = await TestMaster(master_account, Domain.of(deployment), interval_s=0.3).start()
    try:
        async with running_node(anvil, deployment, run_id, node, tmp_path / "data") as miner:
            await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x06" * 32)
            async with peer_client(master_account, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
                await client.request("POST", f"{miner.url}/invite", json=await sign_invite_body(reader, master_account, run_id, node.address, master.url))
            await master.wait_for(lambda: len(master.heartbeats) >= 2)
            await (await chain_client(anvil.accounts[BUYER_INDEX])).remove_master(run_id, master_account.address)
            master.desired = [desired_entry("after-removal", busybox_image, SLEEPER)]
            # Its next answer is refused and the miner forgets it (issue 14): no more heartbeats to it, its
            # pushes refused, the node waits for another master of the run to adopt it.
            await wait_until(lambda: miner.store.state.master is None, timeout_s=60, what="the removed master forgotten")
            assert "no longer a master" in (miner.store.state.last_heartbeat_error or "") \
                or "no master of run" in miner.console.file.getvalue()
            assert await miner.heartbeat.beat() is None  # idle: nothing goes to the removed master
            async with peer_client(master_account, to=miner.address, domain=Domain.of(deployment), retries=0) as client:
                with pytest.raises(PeerError) as refused:
                    await client.request("POST", f"{miner.url}/tasks", json=master.desired[0])
            assert refused.value.status == 403
            assert not _containers(docker_client, node.address, "after-removal")
    finally:
        await master.stop()
        remove_prime_containers(docker_client, node.address)
