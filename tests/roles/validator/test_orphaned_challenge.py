"""A validator process killed mid-challenge and restarted (issue 13): the miner's orphaned challenge
is released by the restarted validator's new one, so the node is approved seconds after the
restart (it took 140 s when the miner held the orphan 120 s and answered 409 meanwhile).

Two cases: the orphan's computation ended while the validator was down (a commitment nobody will
open: replaced at once), and it is still computing when the validator asks again (409 until the
thread ends, then freed at once instead of held; the validator's first retries come within seconds)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from prime.chain.types import NodeStatus
from tests.fixtures.processes import RoleProcesses
from tests.roles.validator.conftest import World
from tests.roles.validator.support import HeldProver, wait_for, wait_validated
from tests.roles.validator.test_service import onboard, start_validator

pytestmark = pytest.mark.e2e

# Well under the 30 s the miner holds an unopened commitment at most (and the old 120 s): the
# approval must come from the release, not from the orphan's expiry.
SOON_S = 20.0


@pytest.mark.parametrize("finished_while_down", [True, False], ids=["committed-orphan", "computing-orphan"])
async def test_a_validator_restarted_mid_challenge_approves_the_node_within_seconds(
        world: World, role_processes: RoleProcesses, start_miner, tmp_path: Path, finished_while_down: bool) -> None:
    validator = await start_validator(world, role_processes, tmp_path / "validator", "--challenge-timeout", "60")
    prover = HeldProver()
    miner = await start_miner(prover)
    await onboard(world, miner)
    await asyncio.to_thread(prover.started.wait, 60)  # the validator waits on the node's commitment
    assert miner.challenges == 1
    validator.kill()
    if finished_while_down:
        prover.release.set()

        def committed() -> bool:
            active = miner.service._active
            return active is not None and active.commitment is not None

        await wait_for(committed, timeout_s=30, what="the orphan's commitment")
    await validator.start_async(timeout_s=60)
    restarted = time.monotonic()
    if not finished_while_down:
        await wait_for(lambda: miner.challenges >= 2, timeout_s=SOON_S, what="the restarted validator's challenge")
        assert miner.service.holds_arrays()  # the orphan still computes: 409, marked to be freed
        prover.release.set()
    info = await wait_validated(world.reader, miner.address, timeout_s=SOON_S)
    assert info.status == NodeStatus.APPROVED
    assert time.monotonic() - restarted < SOON_S
    assert not miner.service.holds_arrays()
