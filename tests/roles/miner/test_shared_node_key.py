"""Two real miners with the SAME node key on one Docker engine (two local networks, a test suite
beside ``make up``), each heartbeating its own master: each runs its master's task, and one
whose master stops listing the task stops its own container only (issue 13)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from prime.auth.signing import Domain
from tests.fixtures.docker import remove_prime_containers
from tests.support.miner_env import (
    MASTER_INDEX,
    SLEEPER,
    VALIDATOR_INDEX,
    TestMaster,
    create_run,
    desired_entry,
    running_node,
    sign_invite_body,
    wait_until,
)
from tests.support.signing import peer_client

pytestmark = pytest.mark.docker


def _containers(docker_client, node: str, task_id: str) -> list:
    labels = [f"prime.node={node}", f"prime.task_id={task_id}"]
    return docker_client.containers.list(all=True, filters={"label": labels}, ignore_removed=True)


async def test_miners_sharing_a_node_key_never_stop_each_others_containers(
    discovery, anvil, deployment, chain_client, fresh_account, docker_client, busybox_image, tmp_path: Path
) -> None:
    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    master_account = anvil.accounts[MASTER_INDEX]
    reader = await chain_client()
    domain = Domain.of(deployment)
    masters = [await TestMaster(master_account, domain, interval_s=0.3).start() for _ in range(2)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            miners = []
            for i, master in enumerate(masters):
                miner = await stack.enter_async_context(running_node(anvil, deployment, run_id, node, tmp_path / f"data{i}"))
                if i == 0:
                    await (await chain_client(anvil.accounts[VALIDATOR_INDEX])).report_validation(node.address, True, b"\x0d" * 32)
                async with peer_client(master_account, to=node.address, domain=domain, retries=0) as client:
                    body = await sign_invite_body(reader, master_account, run_id, node.address, master.url)
                    await client.request("POST", f"{miner.url}/invite", json=body)
                miners.append(miner)
            one, two = miners
            assert one.executor.instance != two.executor.instance

            # Both masters want the same task id: each miner runs its own container of it.
            for master in masters:
                master.desired = [desired_entry("sleeper", busybox_image, SLEEPER)]
            for master in masters:
                await master.wait_for(lambda m=master: any(r["state"] == "Running" for r in m.reports("sleeper")))
            containers = _containers(docker_client, node.address, "sleeper")
            assert sorted(c.labels["prime.instance"] for c in containers) == sorted([one.executor.instance, two.executor.instance])
            theirs = next(c for c in containers if c.labels["prime.instance"] == two.executor.instance)

            # The first master stops listing it: the first miner stops its own; the second's keeps running.
            masters[0].desired = []
            await wait_until(
                lambda: [c.labels["prime.instance"] for c in _containers(docker_client, node.address, "sleeper")] == [two.executor.instance],
                what="the first miner's container to stop",
            )
            seen = len(masters[1].heartbeats)  # a few more heartbeats of the first: still nothing of the second's stops
            await masters[1].wait_for(lambda: len(masters[1].heartbeats) >= seen + 3)
            theirs.reload()
            assert theirs.status == "running"
            assert any(r["state"] == "Running" for r in masters[1].reports("sleeper")[-1:])
    finally:
        for master in masters:
            await master.stop()
        remove_prime_containers(docker_client, node.address)
