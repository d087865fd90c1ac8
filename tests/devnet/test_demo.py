"""`prime devnet demo`: the whole story through real processes, a real chain and real containers."""

from __future__ import annotations

import re
from pathlib import Path

import docker.errors
import pytest

from prime.devnet.images import DEMO_IMAGE, busybox_context, ensure_demo_image
from prime.devnet.processes import scan_processes_mentioning
from prime.errors import PrimeError
from tests.devnet.test_up_down import port_args, prime

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


def test_demo_onboards_a_miner_runs_a_task_and_fetches_its_files(tmp_path: Path, docker_client):
    state = tmp_path / "devnet"
    try:
        up = prime("devnet", "up", "--state-dir", str(state), *port_args())
        assert up.returncode == 0, up.stderr
        result = prime("devnet", "demo", "--state-dir", str(state), "--task-network", "none", "--down-after", timeout=420)
        assert result.returncode == 0, result.stderr + result.stdout
        out = result.stdout
        assert "already up" in out  # it used the devnet that was there
        assert "the master sees the node as Healthy" in out
        assert "[r0] step 5 of 5" in out and "[r0] wrote /data/result.txt" in out
        assert "result.txt says: the answer is 42" in out
        task_id = re.search(r"task ([0-9a-f]{12}) is Completed", out).group(1)
        assert (state / "demo" / task_id / "result.txt").read_text() == "the answer is 42\n"
        assert "is down again" in out
        assert scan_processes_mentioning(str(state.resolve())) == []
        assert not docker_client.containers.list(all=True, filters={"label": f"prime.task_id={task_id}"})
    finally:
        prime("devnet", "down", "--state-dir", str(state))


def test_demo_image_is_built_once_and_runs(docker_client):
    try:
        docker_client.images.remove(DEMO_IMAGE, force=True)
    except docker.errors.ImageNotFound:
        pass
    assert ensure_demo_image(docker_client) == (DEMO_IMAGE, True)
    assert ensure_demo_image(docker_client) == (DEMO_IMAGE, False)
    output = docker_client.containers.run(DEMO_IMAGE, ["sh", "-c", "echo $((6 * 7)); hostname >/dev/null"], remove=True, network_mode="none")
    assert output == b"42\n"


def test_demo_image_needs_busybox(tmp_path: Path):
    with pytest.raises(PrimeError, match="busybox-static"):
        busybox_context(tmp_path / "no-busybox")
