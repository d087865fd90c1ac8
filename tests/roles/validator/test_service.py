"""The validator as a real process against a real anvil, a real discovery process and real miners.

Miners are `prime miner start` processes, honest or with a cheating prover
(tests/support/cheating_miner.py): each cheater must be rejected on chain with a reason that
names the check it failed. The no-stall test uses miners served in the test's own event loop
(support.InProcessMiner) so that one of them can be held mid-challenge deterministically.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from prime.chain.client import RegistryClient
from prime.chain.types import NodeStatus
from prime.challenge.prover import MatmulProver, NumpyBackend
from tests.fixtures.processes import RoleProcess, RoleProcesses, free_port
from tests.roles.validator.conftest import VALIDATOR_ENV, RealMiners, World
from tests.roles.validator.support import (
    HeldProver,
    InProcessMiner,
    announce,
    by_node,
    new_node,
    register,
    reports,
    run_cli,
    wait_for,
    wait_validated,
)

pytestmark = pytest.mark.e2e


def honest() -> MatmulProver:
    return MatmulProver(NumpyBackend())


async def start_validator(world: World, role_processes: RoleProcesses, data_dir: Path, *extra: str) -> RoleProcess:
    """A validator process that reads the chain from the current head (earlier tests' nodes are not its business)."""
    port = free_port()
    head = await world.reader.block_number()
    command = world.validator_command(port, data_dir, "--from-block", str(head + 1), *extra)
    return await role_processes.start_async("validator", command, port=port, env=VALIDATOR_ENV, timeout_s=60)


async def onboard(world: World, miner: InProcessMiner, *, announced: bool = True) -> None:
    await register(world.provider, world.run_id, miner.node)
    if announced:
        await announce(miner.node, world.discovery.base_url, miner.port, world.run_id)


async def metrics(validator: RoleProcess) -> str:
    async with aiohttp.ClientSession() as session, session.get(validator.base_url + "/metrics") as answer:
        assert answer.status == 200
        return await answer.text()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.docker  # real miners run Docker preflight
async def test_honest_miner_is_approved_and_cheaters_are_rejected_by_the_check_they_fail(
        world: World, role_processes: RoleProcesses, real_miners: RealMiners, tmp_path: Path) -> None:
    validator = await start_validator(world, role_processes, tmp_path / "validator", "--challenge-timeout", "30")
    good, garbage, inconsistent = await asyncio.gather(
        real_miners.start(),
        real_miners.start("garbage"),  # 10 % of C's entries wrong, committed consistently
        real_miners.start("inconsistent"),  # openings that do not match its commitment
    )
    miners = (good, garbage, inconsistent)

    on_chain = {m.address: await wait_validated(world.reader, m.address) for m in miners}
    rows = by_node(await reports(tmp_path / "validator"))

    assert on_chain[good.address].status == NodeStatus.APPROVED
    assert on_chain[garbage.address].status == NodeStatus.REJECTED
    assert on_chain[inconsistent.address].status == NodeStatus.REJECTED
    expected = {good.address: None, garbage.address: "entries", inconsistent.address: "merkle"}
    for miner in miners:
        (row,) = rows[miner.address]
        assert row["state"] == "reported" and row["tx_hash"], row
        assert row["failed_check"] == expected[miner.address], row
        # What is on chain is the hash of exactly this report.
        assert on_chain[miner.address].report_hash.hex() == row["report_hash"].removeprefix("0x")
        assert row["report"]["n"] == 64 and row["report"]["checked_rows"] > 0
    assert rows[good.address][0]["reason"] == "all checks passed"
    assert rows[garbage.address][0]["reason"].startswith("entries check failed: ")
    assert "the generator gives" in rows[garbage.address][0]["reason"]
    assert rows[inconsistent.address][0]["reason"].startswith("merkle check failed: ")
    assert "Merkle root" in rows[inconsistent.address][0]["reason"]

    # The honest miner was challenged once and keeps running; it was told its verdict.
    assert await good.challenges_received() == 1
    await wait_for(lambda: "approved the node: all checks passed" in good.process.logs(),
                   timeout_s=30, what="the honest miner to show its verdict")
    # The cheaters stop, showing the validator's reason (which reached them by POST /verdict).
    for miner in (garbage, inconsistent):
        await wait_for(lambda m=miner: not m.process.running, timeout_s=60, what="the rejected miner to stop")
        assert rows[miner.address][0]["reason"] in miner.process.logs()

    async with aiohttp.ClientSession() as session, session.get(validator.base_url + "/health") as answer:
        health = await answer.json()
    assert answer.status == 200 and {"follow", "dispatch"} <= set(health["loops"])
    text = await metrics(validator)
    assert metric(text, 'prime_validator_challenges_total{result="approved"}') == 1
    assert metric(text, 'prime_validator_challenges_total{result="rejected"}') == 2
    assert metric(text, "prime_validator_reports_total") == 3

    code, out, err = await run_cli("validator", "reports", "--data-dir", str(tmp_path / "validator"))
    assert code == 0, err
    lines = out.splitlines()
    for miner, words in ((good, ("approved", "all checks passed")), (garbage, ("rejected", "entries check failed")),
                         (inconsistent, ("rejected", "merkle check failed"))):
        line = next(line for line in lines if miner.address in line)
        assert all(word in line for word in words), line


@pytest.mark.docker  # real miners run Docker preflight
async def test_miner_slower_than_the_time_bound_is_rejected(
        world: World, role_processes: RoleProcesses, real_miners: RealMiners, tmp_path: Path) -> None:
    # The bound is injected small; the miner is honest but commits a second late.
    await start_validator(world, role_processes, tmp_path / "validator", "--challenge-timeout", "0.3")
    slow = await real_miners.start("slow", delay_s=1.0)

    info = await wait_validated(world.reader, slow.address)
    (row,) = by_node(await reports(tmp_path / "validator"))[slow.address]
    assert info.status == NodeStatus.REJECTED
    assert row["failed_check"] == "time"
    assert row["reason"].startswith("time check failed: ")
    assert row["report"]["elapsed_s"] > row["report"]["bound_s"] == 0.3


async def test_unreachable_nodes_are_rejected_after_the_deadline(
        world: World, role_processes: RoleProcesses, tmp_path: Path) -> None:
    validator = await start_validator(world, role_processes, tmp_path / "validator", "--unreachable-after", "3")
    silent, absent = new_node(), new_node()
    await register(world.provider, world.run_id, silent)  # never announces an address
    await register(world.provider, world.run_id, absent)
    await announce(absent, world.discovery.base_url, free_port(), world.run_id)  # nothing listens there

    infos = [await wait_validated(world.reader, node.address, timeout_s=60) for node in (silent, absent)]
    rows = by_node(await reports(tmp_path / "validator"))
    assert [info.status for info in infos] == [NodeStatus.REJECTED, NodeStatus.REJECTED]
    for node in (silent, absent):
        (row,) = rows[node.address]
        assert row["failed_check"] == "unreachable" and row["reason"].startswith("unreachable: ")
        assert row["report"]["reason"] == "unreachable"
        assert row["attempts"] >= 2  # retried with backoff before giving up
    assert "not announced" in rows[silent.address][0]["reason"]
    assert "no answer from" in rows[absent.address][0]["reason"]
    text = await metrics(validator)
    assert metric(text, 'prime_validator_challenges_total{result="unreachable"}') == 2


async def test_one_slow_miner_does_not_stall_the_others(
        world: World, role_processes: RoleProcesses, start_miner, tmp_path: Path) -> None:
    await start_validator(world, role_processes, tmp_path / "validator", "--challenge-timeout", "60", "--concurrency", "2")
    held_prover = HeldProver()
    held = await start_miner(held_prover)
    await onboard(world, held)
    await asyncio.to_thread(held_prover.started.wait, 60)  # the validator is now waiting on it
    quick = [await start_miner(honest()) for _ in range(3)]
    for miner in quick:
        await onboard(world, miner)
    try:
        for miner in quick:
            assert (await wait_validated(world.reader, miner.address)).status == NodeStatus.APPROVED
        # All approved while the first miner still had not answered its challenge.
        assert (await world.reader.node_status(held.address)) == NodeStatus.REGISTERED
    finally:
        held_prover.release.set()
    assert (await wait_validated(world.reader, held.address)).status == NodeStatus.APPROVED


@pytest.mark.docker  # real miners run Docker preflight
async def test_restart_mid_stream_neither_skips_nor_repeats_a_node(
        world: World, role_processes: RoleProcesses, real_miners: RealMiners, anvil, deployment, tmp_path: Path) -> None:
    data_dir = tmp_path / "validator"
    validator = await start_validator(world, role_processes, data_dir, "--challenge-timeout", "30",
                                      "--unreachable-after", "300")
    first = await asyncio.gather(real_miners.start(), real_miners.start())
    for miner in first:
        assert (await wait_validated(world.reader, miner.address)).status == NodeStatus.APPROVED

    # Two more nodes are registered whose miners are not up yet: the validator queues them and
    # keeps retrying (they have announced no address).
    waiting = [real_miners.create(), real_miners.create()]
    for miner in waiting:
        async with await RegistryClient.connect(anvil.rpc_url, deployment, miner.node) as own:
            await register(own, world.run_id, miner.node)

    async def queued() -> bool:
        rows = by_node(await reports(data_dir))
        return all(m.address in rows and rows[m.address][0]["attempts"] >= 1 for m in waiting)

    await wait_for(queued, timeout_s=30, what="the validator to queue the waiting nodes")
    validator.kill()  # a crash mid-stream

    late = real_miners.create()  # registers itself while the validator is down
    await asyncio.gather(*(m.process.start_async(timeout_s=90) for m in (*waiting, late)))
    await validator.start_async(timeout_s=60)

    everyone = [*first, *waiting, late]
    for miner in everyone:
        assert (await wait_validated(world.reader, miner.address)).status == NodeStatus.APPROVED
    rows = by_node(await reports(data_dir))
    for miner in everyone:
        assert await miner.challenges_received() == 1, f"{miner.address} was challenged more than once"
        (row,) = rows[miner.address]
        assert row["state"] == "reported" and row["tx_hash"] and row["result"] == "approved"


async def test_validator_refuses_to_start_without_the_validator_role(world: World, tmp_path: Path) -> None:
    from eth_account import Account

    from prime.keys import create_keystore
    from tests.roles.validator.conftest import FAST_KDF, PASSWORD

    stranger = Account.create()
    key_file = tmp_path / "stranger.json"
    create_keystore(key_file, PASSWORD, stranger.key.hex(), **FAST_KDF)
    command = world.validator_command(free_port(), tmp_path / "data", key_file=key_file)
    code, out, err = await run_cli(*command[3:], env=VALIDATOR_ENV)
    assert code != 0
    assert "does not have the validator role" in err and stranger.address in err
    assert "Traceback" not in err + out


async def test_a_node_address_discovery_did_not_sign_is_never_used(
        world: World, role_processes: RoleProcesses, start_miner, anvil, deployment, tmp_path: Path) -> None:
    """A run whose discovery is reached through something that rewrites the answers: the validator
    refuses the rewritten address (its signature no longer matches) and never challenges there."""
    from aiohttp import web

    from prime.chain.types import Requirements
    from prime.web import bound_port, serve
    from tests.roles.validator.conftest import DISCOVERY_KEY

    async def tamper(request: web.Request) -> web.StreamResponse:
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, world.discovery.base_url + request.path_qs,
                                       headers=request.headers, data=await request.read()) as upstream:
                body = await upstream.read()
                if request.method == "GET":  # where the node is: sent elsewhere
                    body = body.replace(b'"port":', b'"port":1,"x":')
                headers = {k: v for k, v in upstream.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
                return web.Response(status=upstream.status, body=body, headers=headers)

    proxy = web.Application()
    proxy.router.add_route("*", "/{tail:.*}", tamper)
    runner = await serve(proxy, host="127.0.0.1", port=0)
    try:
        proxy_uri = f"http://127.0.0.1:{bound_port(runner)}#{DISCOVERY_KEY.address}"
        async with await RegistryClient.connect(anvil.rpc_url, deployment, anvil.accounts[2]) as owner:
            run_id = await owner.create_run(Requirements(), proxy_uri, [anvil.accounts[3].address])
        validator = await start_validator(world, role_processes, tmp_path / "validator", "--unreachable-after", "3")
        miner = await start_miner(honest())  # would pass, if the validator went to the right address
        await register(world.provider, run_id, miner.node)
        await announce(miner.node, world.discovery.base_url, miner.port, run_id)  # through the real discovery

        info = await wait_validated(world.reader, miner.address, timeout_s=60)
        (row,) = by_node(await reports(tmp_path / "validator"))[miner.address]
        assert info.status == NodeStatus.REJECTED and row["failed_check"] == "unreachable"
        assert "does not match" in row["reason"], row["reason"]
        assert miner.challenges == 0  # nothing was ever sent to the node on the strength of that answer
        assert validator.running
    finally:
        await runner.cleanup()
