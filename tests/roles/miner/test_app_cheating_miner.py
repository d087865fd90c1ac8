"""`python -m tests.support.cheating_miner --mode …`: a real miner process whose prover cheats,
and a real validator run that catches each kind of cheating by its own check."""

from __future__ import annotations

from pathlib import Path

import pytest

from prime.auth.signing import Domain
from prime.chain.types import NodeStatus
from prime.challenge.runner import run_challenge
from tests.fixtures.processes import free_port
from tests.support.miner_env import (
    VALIDATOR_INDEX,
    create_run,
    miner_args,
    miner_env,
    write_keystore,
)
from tests.support.signing import peer_client

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("mode", "extra", "failed_check"),
    [("garbage", [], "entries"), ("inconsistent", [], "merkle"), ("slow", ["--delay-s", "2"], "time")],
)
async def test_cheating_miner_process_is_caught(
    mode, extra, failed_check, role_processes, discovery, anvil, deployment, chain_client, fresh_account, docker_client, tmp_path: Path
) -> None:
    import sys

    run_id = await create_run(chain_client, anvil, discovery.url)
    node = fresh_account()
    port = free_port()
    args = miner_args(
        run_id=run_id, port=port, key_file=write_keystore(tmp_path / "node.json", node), data_dir=tmp_path / "data",
        anvil=anvil, deployment=deployment,
    )
    command = [sys.executable, "-m", "tests.support.cheating_miner", "--mode", mode, *extra, *args]
    process = await role_processes.start_async(f"cheater-{mode}", command, port=port, env=miner_env(tmp_path / "home"), cwd=REPO, timeout_s=90)
    reader = await chain_client()
    info = await reader.get_node(node.address)
    assert info.status == NodeStatus.REGISTERED  # the rest of the miner is the real one

    overrides = {"n": 64, "dtype": "float32", "repeat": 1, "bound_s": 1.0 if mode == "slow" else 60.0}
    async with peer_client(anvil.accounts[VALIDATOR_INDEX], to=node.address, domain=Domain.of(deployment)) as client:
        report = await run_challenge(client, process.base_url, node=node.address, specs=info.specs, params_overrides=overrides)
    assert not report.approved
    assert report.checks.get(failed_check), report.checks
