"""`prime validator challenge NODE`: one dry-run challenge of a real (in-process) miner, watched stage
by stage; nothing is reported on chain, and a log or pipe gets a few plain lines, never a bar."""

from __future__ import annotations

import asyncio
import io
import json

from rich.console import Console

from prime.chain.types import NodeStatus
from prime.challenge.params import plan_challenge
from prime.challenge.prover import MatmulProver, NumpyBackend
from prime.roles.validator.probe import ChallengeView
from tests.challenge.cheaters import CorruptingProver
from tests.roles.validator.conftest import VALIDATOR_ENV, World
from tests.roles.validator.support import CPU_SPECS, announce, new_node, register, run_cli


def _args(world: World, *extra: str) -> list[str]:
    return ["validator", "challenge", *extra, "--rpc-url", world.rpc_url, "--deployment", str(world.deployment_path),
            "--key-file", str(world.validator_key_file), "--challenge-n", "64"]


async def test_an_honest_node_found_through_discovery_passes_and_nothing_goes_on_chain(world: World, start_miner) -> None:
    miner = await start_miner(MatmulProver(NumpyBackend()))
    await register(world.provider, world.run_id, miner.node)
    await announce(miner.node, world.discovery.base_url, miner.port, world.run_id)

    code, out, err = await run_cli(*_args(world, miner.address, "--json"), env=VALIDATOR_ENV)
    assert code == 0, err
    result = json.loads(out)
    assert result["url"] == miner.url and result["report"]["approved"] is True and result["report"]["n"] == 64
    assert result["report"]["checked_rows"] > 0 and err == ""  # --json: no live view at all
    assert miner.challenges == 1
    assert (await world.reader.get_node(miner.address)).status is NodeStatus.REGISTERED  # a dry run


async def test_a_cheater_fails_and_a_pipe_gets_one_line_per_stage(world: World, start_miner) -> None:
    miner = await start_miner(CorruptingProver(fraction=0.5, seed=1))
    await register(world.provider, world.run_id, miner.node)

    code, out, err = await run_cli(*_args(world, miner.address, "--url", miner.url), env=VALIDATOR_ENV)
    assert code == 0, err
    assert f"Node {miner.address} failed the challenge's entries check: C[" in out and "nothing was reported on chain" in out
    stages = err.strip().splitlines()
    assert stages[0].startswith(f"Challenging node {miner.address} at {miner.url}: n=64"), err
    assert [line.split()[0] for line in stages[1:]] == ["Challenge", "Commitment", "Opening"], err
    assert "\r" not in err and "\x1b" not in err  # no bar, no cursor movement in a log


async def test_an_unknown_node_is_one_sentence(world: World) -> None:
    stranger = new_node()
    code, out, err = await run_cli(*_args(world, stranger.address, "--url", "http://127.0.0.1:1"), env=VALIDATOR_ENV)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == f"Error: Node {stranger.address} is not registered with the registry at {world.reader.address}; check the address and --deployment."


async def test_on_a_terminal_the_commitment_is_a_bar_against_the_time_bound() -> None:
    plan = plan_challenge(CPU_SPECS, {"n": 64, "bound_s": 5.0})
    out = io.StringIO()
    with ChallengeView(Console(file=out, force_terminal=True, width=120), plan, "0xNODE", "http://127.0.0.1:1") as view:
        view.stage("commit", True)
        (bar,) = view.progress.tasks
        assert bar.total == 5.0
        await asyncio.sleep(0.2)  # the ticker moves the bar with the time spent
        assert 0 < bar.completed <= 5.0
        view.stage("commit", False)
        view.stage("open", True)
        (opening,) = view.progress.tasks
        assert opening.total is None and "opening" in opening.description
        view.stage("open", False)
        assert view.progress.tasks == []
    assert view.progress is None
    assert "Commitment after" in out.getvalue() and "Challenging node 0xNODE" in out.getvalue()
